"""Tensor parallelism: how a rank's shard of the model is cut, and the collectives it needs.

Attention is split by KV-head groups (each rank gets a contiguous range of KV heads and the query
heads that attend to them), so a model whose KV heads do not divide by the number of ranks still
splits (SmolLM2's 3 KV heads over 2 ranks: 2 + 1). The MLP's intermediate dimension and the
vocabulary are split into contiguous ranges too. Column-parallel layers (qkv_proj, gate_up_proj)
keep their rows of the shard; row-parallel ones (o_proj, down_proj) keep their input columns and
all-reduce the output. With one rank nothing here touches torch.distributed.

The ranks themselves (their processes, the process group, the loop each runs) are worker.py's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from kvpilot_engine.config import ModelConfig


def split_range(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rank's contiguous share of n items; the first n % size ranks get one more."""
    base, extra = divmod(n, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def check_splittable(config: ModelConfig, size: int) -> None:
    if size < 1:
        raise ValueError(f"tensor_parallel_size must be at least 1, got {size}")
    for what, n in (
        ("num_key_value_heads", config.num_key_value_heads),
        ("intermediate_size", config.intermediate_size),
        ("vocab_size", config.vocab_size),
    ):
        if n < size:
            raise ValueError(
                f"tensor_parallel_size={size} needs at least one of the model's {what} per rank, "
                f"but it has {n}"
            )


@dataclass(frozen=True)
class Parallel:
    """One rank's place in the tensor-parallel group and the ranges of the model it holds."""

    rank: int = 0
    size: int = 1
    vocab_size: int = 0  # the whole vocabulary's
    vocab_start: int = 0
    vocab_end: int = 0
    kv_head_start: int = 0
    kv_head_end: int = 0
    inter_start: int = 0
    inter_end: int = 0

    @classmethod
    def for_rank(cls, config: ModelConfig, rank: int, size: int) -> Parallel:
        check_splittable(config, size)
        kv = split_range(config.num_key_value_heads, size, rank)
        inter = split_range(config.intermediate_size, size, rank)
        vocab = split_range(config.vocab_size, size, rank)
        return cls(rank, size, config.vocab_size, *vocab, *kv, *inter)

    @property
    def enabled(self) -> bool:
        return self.size > 1

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The shape of this rank's shard, for LlamaForCausalLM and the KV cache."""
        if not self.enabled:
            return config
        group = config.num_attention_heads // config.num_key_value_heads
        kv_heads = self.kv_head_end - self.kv_head_start
        return dataclasses.replace(
            config,
            num_attention_heads=kv_heads * group,
            num_key_value_heads=kv_heads,
            intermediate_size=self.inter_end - self.inter_start,
            vocab_size=self.vocab_end - self.vocab_start,
            head_dim=config.head_dim,  # never re-derived from hidden_size / local heads
        )

    def shard_weights(
        self, weights: Iterable[tuple[str, torch.Tensor]], config: ModelConfig
    ) -> Iterator[tuple[str, torch.Tensor]]:
        """Cut each HF-named full tensor down to this rank's slice, one tensor at a time, so the
        rank never holds more than one full tensor besides its shard."""
        if not self.enabled:
            yield from weights
            return
        hd = config.head_dim
        group = config.num_attention_heads // config.num_key_value_heads
        q = (self.kv_head_start * group * hd, self.kv_head_end * group * hd)
        kv = (self.kv_head_start * hd, self.kv_head_end * hd)
        inter = (self.inter_start, self.inter_end)
        vocab = (self.vocab_start, self.vocab_end)
        rows = {
            "q_proj": q,
            "k_proj": kv,
            "v_proj": kv,
            "gate_proj": inter,
            "up_proj": inter,
            "embed_tokens": vocab,
            "lm_head": vocab,
        }
        cols = {"o_proj": q, "down_proj": inter}
        for name, tensor in weights:
            parts = name.split(".")
            module = parts[-2] if len(parts) >= 2 else ""
            if module in rows:
                start, end = rows[module]
                tensor = tensor[start:end]
            elif module in cols and parts[-1] == "weight":
                start, end = cols[module]
                tensor = tensor[:, start:end]
            yield name, tensor

    # ---- collectives (no-ops with one rank) ----------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(x)
        return x

    def embed(self, embedding: Callable[[torch.Tensor], torch.Tensor], ids: torch.Tensor):
        """Vocab-parallel lookup: ids outside this rank's slice give zero rows, and the sum over
        ranks then holds each id's row exactly once."""
        if not self.enabled:
            return embedding(ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_end - self.vocab_start)
        hidden = embedding(local.masked_fill(outside, 0))
        return self.all_reduce(hidden.masked_fill(outside[:, None], 0))

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Every rank's logits over its vocab slice -> the full logits, on every rank."""
        if not self.enabled:
            return logits
        # all_gather wants equal shapes: pad the smaller slices to the largest, trim after.
        ranges = [split_range(self.vocab_size, self.size, r) for r in range(self.size)]
        sizes = [end - start for start, end in ranges]
        if logits.shape[-1] < sizes[0]:
            logits = torch.nn.functional.pad(logits, (0, sizes[0] - logits.shape[-1]))
        parts = [torch.empty_like(logits) for _ in range(self.size)]
        torch.distributed.all_gather(parts, logits.contiguous())
        return torch.cat([p[:, :n] for p, n in zip(parts, sizes, strict=True)], dim=-1)
