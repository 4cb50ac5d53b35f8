"""SpeculativeConfig: `speculative_config={...}` of `LLM(...)` and `--speculative-config JSON`."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

METHODS = ("ngram", "suffix", "draft_model")


@dataclass
class SpeculativeConfig:
    """vLLM's names. `num_speculative_tokens` is the most drafts one sequence verifies per step;
    with `adaptive` (the default) the engine proposes fewer, or none, when its cost model says
    the step would not pay for them."""

    method: str = "ngram"
    num_speculative_tokens: int = 5
    # ngram: the longest and shortest suffix of the sequence looked up in its own tokens.
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # draft_model: the draft's weights (a bundled name, an HF folder or a GGUF file).
    model: str | None = None
    # suffix: how many finished requests' outputs the shared suffix tree keeps.
    suffix_cache_requests: int = 64
    adaptive: bool = True
    # Speculation is off for a step with more decoding sequences than this (vLLM's
    # disable_by_batch_size); None leaves it to the adaptive cost model alone.
    disable_by_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(
                f"speculative_config.method must be one of {', '.join(METHODS)}, "
                f"got {self.method!r}"
            )
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ValueError("speculative_config.num_speculative_tokens must be in 1..32")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                "speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                f"{self.prompt_lookup_min} and {self.prompt_lookup_max}"
            )
        if self.method == "draft_model" and not self.model:
            raise ValueError('speculative_config.model is required with method "draft_model"')
        if self.suffix_cache_requests < 0:
            raise ValueError("speculative_config.suffix_cache_requests must be >= 0")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError("speculative_config.disable_by_batch_size must be at least 1")

    @classmethod
    def parse(
        cls, value: SpeculativeConfig | dict[str, Any] | str | None
    ) -> SpeculativeConfig | None:
        """A config, a dict or a JSON object string (the CLI's); None or {} mean off."""
        if value is None or isinstance(value, SpeculativeConfig):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"--speculative-config is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object")
        if not value:
            return None
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"speculative_config has unknown keys {unknown}; known: {sorted(known)}"
            )
        return cls(**value)
