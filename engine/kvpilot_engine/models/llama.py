"""The Llama-family decoder: Llama, Mistral, Qwen2 (qkv bias) and Qwen3 (per-head q/k RMSNorm).

Works on a flattened batch: `input_ids` and `positions` hold the scheduled tokens of every
sequence back to back; attention finds each sequence's context through AttentionMetadata.
q/k/v and gate/up projections are fused into one matmul each, as in vLLM.

Under tensor parallelism the model is built from the rank's local config (its heads, its slice of
the intermediate size and the vocabulary; see parallel.py) and all-reduces after the row-parallel
o_proj and down_proj, so the residual stream is whole on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from kvpilot_engine.attention import (
    AttentionMetadata,
    paged_attention,
    use_triton,
    write_kv_cache,
)
from kvpilot_engine.config import ModelConfig
from kvpilot_engine.parallel import Parallel

if TYPE_CHECKING:
    from kvpilot_engine.lora.layers import LoRAStep


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with `residual`, (norm(x + residual), x + residual): the residual add fused
        into the norm, as vLLM's decoder layers do it (one kernel on the GPU path)."""
        if use_triton(x.device):
            from kvpilot_engine.kernels.norm import rms_norm

            # Any leading dims and strides (Qwen3's per-head q/k norm reads a slice of qkv).
            return rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            residual = residual + x
            return self._norm(residual), residual
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and scale in the model dtype, exactly as transformers does.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (
        config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    )
    rs = config.rope_scaling
    if rs.rope_type == "llama3":
        low_freq_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
        high_freq_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rs.factor, inv_freq)
        smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
            rs.high_freq_factor - rs.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
        medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """Neox-style rotary (rotate halves). GGUF's interleaved q/k rows are permuted back on load."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        # A plain attribute, not a buffer: it stays float32 whatever dtype the model is cast to,
        # and survives building the model on the meta device.
        self.config = config
        self._inv_freq: torch.Tensor | None = None
        self._cos_sin: torch.Tensor | None = None  # the Triton path's table, per position
        # The engine raises it to its max_model_len when that is larger.
        self.max_positions = config.max_position_embeddings

    def cos_sin_cache(self, device: torch.device) -> torch.Tensor:
        if self._cos_sin is None or self._cos_sin.device != device:
            from kvpilot_engine.kernels.rotary import build_cos_sin_cache

            self._cos_sin = build_cos_sin_cache(
                self.inv_freq(device), self.max_positions, torch.float32
            )
        return self._cos_sin

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if self._inv_freq is None or self._inv_freq.device != device:
            with torch.device("cpu"):
                inv_freq = rope_inv_freq(self.config)
            self._inv_freq = inv_freq.to(device)
        return self._inv_freq

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if use_triton(q.device):
            from kvpilot_engine.kernels.rotary import apply_rotary

            return apply_rotary(positions, q, k, self.cos_sin_cache(q.device))
        freqs = positions.float()[:, None] * self.inv_freq(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos().to(q.dtype)[:, None, :]
        sin = emb.sin().to(q.dtype)[:, None, :]
        return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, parallel: Parallel, layer_idx: int = 0):
        super().__init__()
        self.parallel = parallel
        self.layer_idx = layer_idx  # which slice of the LoRA banks is this layer's
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        rotary: RotaryEmbedding,
    ) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        lora = meta.lora
        if lora is not None:
            lora.apply(self.layer_idx, "qkv", hidden, qkv)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        key_cache, value_cache = kv_cache
        write_kv_cache(k, v, key_cache, value_cache, meta.slot_mapping)
        o = paged_attention(q, key_cache, value_cache, meta, self.scale).flatten(1)
        out = self.o_proj(o)
        if lora is not None:
            lora.apply(self.layer_idx, "o", o, out)
        return self.parallel.all_reduce(out)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, parallel: Parallel, layer_idx: int = 0):
        super().__init__()
        self.parallel = parallel
        self.layer_idx = layer_idx
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, lora: LoRAStep | None = None) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if lora is not None:
            lora.apply(self.layer_idx, "gate_up", x, gate_up)
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate) * up
        out = self.down_proj(act)
        if lora is not None:
            lora.apply(self.layer_idx, "down", act, out)
        return self.parallel.all_reduce(out)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, parallel: Parallel, layer_idx: int = 0):
        super().__init__()
        self.self_attn = Attention(config, parallel, layer_idx)
        self.mlp = MLP(config, parallel, layer_idx)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
        rotary: RotaryEmbedding,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(this layer's MLP output, the residual stream before it): the next norm adds them."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, kv_cache, meta, rotary)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden, meta.lora), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, parallel: Parallel):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, parallel, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config)


# HF checkpoint names that land in a fused parameter: (fused name, shard index).
_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, parallel: Parallel | None = None):
        """`config`: this rank's shard's shape (Parallel.local_config) under tensor parallelism."""
        super().__init__()
        self.config = config
        self.parallel = parallel or Parallel()
        self.model = LlamaModel(config, self.parallel)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states of every token, [num_tokens, hidden_size]."""
        m = self.model
        # Done here rather than in the embedding module: quantization replaces that module.
        hidden = self.parallel.embed(m.embed_tokens, input_ids)
        residual = None
        for layer, kv_cache in zip(m.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, meta, m.rotary)
        hidden, _ = m.norm(hidden, residual)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary; under tensor parallelism every rank must call it."""
        return self.parallel.gather_vocab(self.lm_head(hidden))

    def _shard(self, fused: str, index: int) -> tuple[int, int]:
        c = self.config
        if fused == "qkv_proj":
            sizes = [c.q_size, c.kv_size, c.kv_size]
        else:
            sizes = [c.intermediate_size, c.intermediate_size]
        return sum(sizes[:index]), sizes[index]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors into the (fused) parameters; every parameter must be filled."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        shards_seen: dict[str, int] = {}
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue
            parts = name.split(".")
            target = name
            if len(parts) >= 2 and parts[-2] in _STACKED:
                fused, index = _STACKED[parts[-2]]
                target = ".".join([*parts[:-2], fused, parts[-1]])
                if target not in params:
                    raise ValueError(f"unexpected checkpoint tensor {name!r}")
                param = params[target]
                offset, size = self._shard(fused, index)
                if tensor.shape[0] != size or tuple(tensor.shape[1:]) != tuple(param.shape[1:]):
                    raise ValueError(
                        f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                        f"expected ({size}, {', '.join(map(str, param.shape[1:]))})"
                    )
                param.data[offset : offset + size].copy_(tensor)
                shards_seen[target] = shards_seen.get(target, 0) + 1
                if shards_seen[target] == (3 if fused == "qkv_proj" else 2):
                    loaded.add(target)
                continue
            if target not in params:
                raise ValueError(f"unexpected checkpoint tensor {name!r}")
            param = params[target]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"expected {tuple(param.shape)}"
                )
            param.data.copy_(tensor)
            loaded.add(target)
        if self.config.tie_word_embeddings:
            loaded.add("lm_head.weight")
        missing = sorted(set(params) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing tensors: {', '.join(missing[:8])}")
