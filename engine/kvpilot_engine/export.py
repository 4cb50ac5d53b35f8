"""`kvpilot export`: write any checkpoint kvpilot reads as a Hugging Face folder.

The GGUF path dequantizes and un-permutes on the way, so the folder holds exactly the float
weights kvpilot serves. Other servers (transformers serve, vLLM) can then load the same weights
for a like-for-like benchmark; transformers cannot save a model it loaded from a GGUF itself.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from kvpilot_engine.config import ModelConfig
from kvpilot_engine.loader import load_checkpoint

_HF_NAMES = {
    "llama": ("LlamaForCausalLM", "llama"),
    "mistral": ("MistralForCausalLM", "mistral"),
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
}


def hf_config(c: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    arch, model_type = _HF_NAMES[c.architecture]
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": c.vocab_size,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "tie_word_embeddings": c.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": str(dtype).removeprefix("torch."),
        "bos_token_id": c.bos_token_id,
        "eos_token_id": c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else c.eos_token_ids,
    }
    if c.architecture in ("llama", "mistral"):
        cfg["attention_bias"] = c.attention_bias
    if c.sliding_window:
        cfg["sliding_window"] = c.sliding_window
    if c.rope_scaling.rope_type == "llama3":
        rs = c.rope_scaling
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    return cfg


def export_hf(model: str, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    from safetensors.torch import save_file

    ckpt = load_checkpoint(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: t.to(dtype).contiguous()
        for name, t in ckpt.weights()
        if not (name == "lm_head.weight" and ckpt.config.tie_word_embeddings)
    }
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(ckpt.config, dtype), indent=2))
    tok = ckpt.tokenizer
    tok.tokenizer.save(str(out / "tokenizer.json"))
    tok_cfg: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    if tok.bos_token_id is not None:
        tok_cfg["bos_token"] = tok.id_to_token(tok.bos_token_id)
    if tok.eos_token_id is not None:
        tok_cfg["eos_token"] = tok.id_to_token(tok.eos_token_id)
    if tok.chat_template:
        tok_cfg["chat_template"] = tok.chat_template
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    gen = {"bos_token_id": tok.bos_token_id, "eos_token_id": ckpt.config.eos_token_ids}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out
