"""PEFT-format LoRA adapters for SmolLM2, written directly (adapter_config.json and
adapter_model.safetensors with peft's key names): random A and B (B not zero, so each adapter
changes the output), in a second rather than the half minute that building a peft model takes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

# SmolLM2-135M's projections: (in, out) features.
LAYERS = 30
SHAPES = {
    "q_proj": (576, 576),
    "k_proj": (576, 192),
    "v_proj": (576, 192),
    "o_proj": (576, 576),
    "gate_proj": (576, 1536),
    "up_proj": (576, 1536),
    "down_proj": (1536, 576),
}
_PREFIX = {m: "self_attn" for m in ("q_proj", "k_proj", "v_proj", "o_proj")} | {
    m: "mlp" for m in ("gate_proj", "up_proj", "down_proj")
}


def write_adapter(
    folder: Path,
    rank: int = 8,
    targets: Sequence[str] = ("q_proj", "v_proj"),
    seed: int = 0,
) -> Path:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module in targets:
            d_in, d_out = SHAPES[module]
            key = f"base_model.model.model.layers.{layer}.{_PREFIX[module]}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, d_in, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, rank, generator=gen) * 0.02
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "target_modules": list(targets),
        "bias": "none",
        "use_rslora": False,
        "fan_in_fan_out": False,
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def write_corrupt_adapter(folder: Path) -> Path:
    """A valid config over weights that are not a safetensors file: refused when loaded."""
    write_adapter(folder)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    return folder
