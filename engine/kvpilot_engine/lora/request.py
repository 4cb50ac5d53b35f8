"""What a caller names to run a request on a LoRA adapter, and the one error adapters raise.

The names follow vLLM (`vllm.lora.request.LoRARequest`) so code written against it runs here
unchanged: `LoRARequest(lora_name, lora_int_id, lora_path)`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """A PEFT adapter (`adapter_config.json` + `adapter_model.safetensors` in `lora_path`).

    `lora_int_id` is the caller's key for the adapter (> 0; 0 means the base model): two
    requests with the same id share one loaded copy, so an id must always name the same path.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str = ""
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be > 0, got {self.lora_int_id}")
        if not self.lora_name:
            raise ValueError("lora_name must not be empty")

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def adapter_id(self) -> int:
        return self.lora_int_id

    @property
    def path(self) -> str:
        return self.lora_path


class LoRAError(ValueError):
    """An adapter that cannot be served, with a machine-readable `reason`:

    NotFound (no such folder or adapter), MissingConfig (no adapter_config.json), Corrupt
    (unreadable safetensors or config), RankTooLarge (r above max_lora_rank),
    BaseModelMismatch (its shapes do not fit this model), UnsupportedModule (targets a module
    the engine cannot apply), Disabled (the engine was started without enable_lora).

    Servers answer it with a 400 (404 for NotFound), the operator reports it as Degraded.
    """

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
