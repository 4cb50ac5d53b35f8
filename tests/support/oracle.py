"""transformers as the oracle: plain greedy decoding with its own KV cache, and the shapes of the
tiny random Llama, Mistral, Qwen2 and Qwen3 checkpoints the engine is compared on."""

from __future__ import annotations

import torch


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    """Greedy decoding with no logits processors, EOS ignored."""
    out: list[int] = []
    with torch.inference_mode():
        res = model(torch.tensor([ids]), use_cache=True)
        for _ in range(n):
            nxt = int(res.logits[0, -1].argmax())
            out.append(nxt)
            res = model(torch.tensor([[nxt]]), past_key_values=res.past_key_values, use_cache=True)
    return out


def hf_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


COMMON = dict(
    vocab_size=49152,  # the SmolLM2 tokenizer is copied into each folder
    hidden_size=96,
    intermediate_size=192,
    num_hidden_layers=2,
    max_position_embeddings=512,
    initializer_range=0.15,  # peaked distributions, so greedy has clear winners
    bos_token_id=1,
    eos_token_id=2,
)

CASES = {
    # GQA group 1 (plain MHA) with llama3 rope scaling.
    "llama": dict(
        cls="LlamaForCausalLM",
        cfg="LlamaConfig",
        num_attention_heads=4,
        num_key_value_heads=4,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    # GQA group 2, tied embeddings.
    "mistral": dict(
        cls="MistralForCausalLM",
        cfg="MistralConfig",
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        sliding_window=None,
    ),
    # GQA group 3, qkv bias.
    "qwen2": dict(
        cls="Qwen2ForCausalLM",
        cfg="Qwen2Config",
        num_attention_heads=6,
        num_key_value_heads=2,
    ),
    # GQA group 4, q/k norm, head_dim not hidden/heads.
    "qwen3": dict(
        cls="Qwen3ForCausalLM",
        cfg="Qwen3Config",
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=32,
        tie_word_embeddings=False,
    ),
}
