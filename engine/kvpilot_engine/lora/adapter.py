"""Reading a PEFT LoRA adapter from its folder into CPU tensors, checked against the base model.

`load_adapter` is pure (no engine state), so a server can call it on any thread and hand the
result to `LLMEngine.add_lora`, and the engine's own loader thread calls it for requests whose
adapter is not loaded yet. Everything wrong with an adapter is a LoRAError with a reason.

What is read: `adapter_config.json` (peft_type LORA, `r`, `lora_alpha`, `use_rslora`) and
`adapter_model.safetensors`, whose keys say which layers and modules are adapted
(`...layers.{i}.self_attn.q_proj.lora_A.weight`). The scaling (lora_alpha / r, or
lora_alpha / sqrt(r) with rslora) is folded into B, so applying an adapter is x @ A^T @ B^T.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvpilot_engine.lora.request import LoRAError, LoRARequest

if TYPE_CHECKING:
    import torch

    from kvpilot_engine.config import ModelConfig

# The projections an adapter may target, in the order the engine's fused layers hold them.
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
TARGET_MODULES = ATTENTION_MODULES + MLP_MODULES

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

_KEY = re.compile(
    r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_(A|B)(?:\.[\w-]+)?\.weight$"
)


@dataclass
class LoRAAdapter:
    """One adapter's weights on the host: per (layer, module), A [r, in] and B [out, r] in
    float32, B already multiplied by the scaling."""

    lora_request: LoRARequest
    rank: int
    scaling: float
    target_modules: frozenset[str]
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)

    @property
    def name(self) -> str:
        return self.lora_request.lora_name

    @property
    def lora_int_id(self) -> int:
        return self.lora_request.lora_int_id


def module_shape(config: ModelConfig, module: str) -> tuple[int, int]:
    """(in_features, out_features) of a projection of the whole (unsharded) model."""
    h, i = config.hidden_size, config.intermediate_size
    return {
        "q_proj": (h, config.q_size),
        "k_proj": (h, config.kv_size),
        "v_proj": (h, config.kv_size),
        "o_proj": (config.q_size, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }[module]


def read_config(lora_request: LoRARequest, max_lora_rank: int) -> dict:
    """The adapter's config, checked (NotFound, MissingConfig, Corrupt, RankTooLarge,
    UnsupportedModule). Reads one small file."""
    path = Path(lora_request.lora_path) if lora_request.lora_path else None
    name = lora_request.lora_name
    if path is None or not path.is_dir():
        raise LoRAError(
            "NotFound", f"LoRA adapter {name!r}: no folder at {lora_request.lora_path!r}"
        )
    cfg_path = path / CONFIG_NAME
    if not cfg_path.is_file():
        raise LoRAError("MissingConfig", f"LoRA adapter {name!r}: no {CONFIG_NAME} in {path}")
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise LoRAError(
            "Corrupt", f"LoRA adapter {name!r}: unreadable {CONFIG_NAME}: {e}"
        ) from None
    peft_type = str(cfg.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise LoRAError(
            "UnsupportedModule", f"LoRA adapter {name!r}: peft_type {peft_type} is not LORA"
        )
    try:
        r = int(cfg["r"])
        float(cfg.get("lora_alpha", r))
    except (KeyError, TypeError, ValueError):
        raise LoRAError("Corrupt", f"LoRA adapter {name!r}: {CONFIG_NAME} has no valid r") from None
    if r < 1:
        raise LoRAError("Corrupt", f"LoRA adapter {name!r}: r={r}")
    if r > max_lora_rank:
        raise LoRAError(
            "RankTooLarge",
            f"LoRA adapter {name!r} has rank {r}, above this engine's max_lora_rank "
            f"{max_lora_rank} (raise --max-lora-rank)",
        )
    unsupported = []
    if cfg.get("use_dora"):
        unsupported.append("use_dora")
    if cfg.get("lora_bias"):
        unsupported.append("lora_bias")
    if cfg.get("bias", "none") not in (None, "none"):
        unsupported.append(f"bias={cfg['bias']!r}")
    if cfg.get("modules_to_save"):
        unsupported.append(f"modules_to_save={cfg['modules_to_save']!r}")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        unsupported.append("rank_pattern/alpha_pattern (per-module ranks)")
    if unsupported:
        raise LoRAError(
            "UnsupportedModule",
            f"LoRA adapter {name!r} uses what the engine cannot apply: {', '.join(unsupported)}",
        )
    return cfg


def load_adapter(
    lora_request: LoRARequest, model_config: ModelConfig, max_lora_rank: int
) -> LoRAAdapter:
    """Read, check and return the adapter's weights (CPU, float32, scaling folded into B).

    Raises LoRAError: NotFound, MissingConfig, Corrupt, RankTooLarge, BaseModelMismatch (a layer
    or a shape this model does not have), UnsupportedModule (a module other than the seven
    projections, DoRA, trained biases, modules_to_save)."""
    import torch
    from safetensors.torch import load_file

    cfg = read_config(lora_request, max_lora_rank)
    name = lora_request.lora_name
    r = int(cfg["r"])
    alpha = float(cfg.get("lora_alpha", r))
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    weights_path = Path(lora_request.lora_path) / WEIGHTS_NAME
    if not weights_path.is_file():
        raise LoRAError("Corrupt", f"LoRA adapter {name!r}: no {WEIGHTS_NAME} in its folder")
    try:
        tensors = load_file(str(weights_path), device="cpu")
    except Exception as e:  # safetensors raises its own error types, and OSError
        raise LoRAError(
            "Corrupt", f"LoRA adapter {name!r}: unreadable {WEIGHTS_NAME}: {e}"
        ) from None

    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.search(key)
        if m is None:
            raise LoRAError(
                "UnsupportedModule",
                f"LoRA adapter {name!r}: tensor {key!r} is not a LoRA A/B of "
                f"{', '.join(TARGET_MODULES)}",
            )
        layer, module, half = int(m.group(1)), m.group(2), m.group(3)
        if module not in TARGET_MODULES:
            raise LoRAError(
                "UnsupportedModule",
                f"LoRA adapter {name!r} targets {module!r}; the engine applies "
                f"{', '.join(TARGET_MODULES)}",
            )
        if layer >= model_config.num_hidden_layers:
            raise LoRAError(
                "BaseModelMismatch",
                f"LoRA adapter {name!r} adapts layer {layer}; the model has "
                f"{model_config.num_hidden_layers}",
            )
        halves.setdefault((layer, module), {})[half] = tensor
    if not halves:
        raise LoRAError("Corrupt", f"LoRA adapter {name!r}: {WEIGHTS_NAME} holds no LoRA tensors")

    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise LoRAError(
                "Corrupt", f"LoRA adapter {name!r}: layer {layer} {module} lacks lora_A or lora_B"
            )
        a, b = pair["A"], pair["B"]
        d_in, d_out = module_shape(model_config, module)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape[0] != d_out:
            raise LoRAError(
                "BaseModelMismatch",
                f"LoRA adapter {name!r}: layer {layer} {module} has A {tuple(a.shape)} and "
                f"B {tuple(b.shape)}; this model needs A (r, {d_in}) and B ({d_out}, r)",
            )
        if a.shape[0] != r or b.shape[1] != r:
            raise LoRAError(
                "Corrupt",
                f"LoRA adapter {name!r}: layer {layer} {module} has rank "
                f"{a.shape[0]}/{b.shape[1]}, its config says r={r}",
            )
        a32, b32 = a.to(torch.float32).contiguous(), (b.to(torch.float32) * scaling).contiguous()
        if not (torch.isfinite(a32).all() and torch.isfinite(b32).all()):
            raise LoRAError("Corrupt", f"LoRA adapter {name!r}: layer {layer} {module} has NaN/inf")
        weights[(layer, module)] = (a32, b32)
    return LoRAAdapter(
        lora_request=lora_request,
        rank=r,
        scaling=scaling,
        target_modules=frozenset(m for _, m in weights),
        weights=weights,
    )
