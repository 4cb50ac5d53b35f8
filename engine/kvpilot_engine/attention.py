"""Paged attention: the one seam between the model and the KV cache layout.

The model calls `write_kv_cache` and `paged_attention` and knows nothing else about blocks. This
module is the PyTorch reference: the CPU path, and the oracle that the GPU kernels are tested
against. A batch is flattened: the query tokens of every scheduled sequence are concatenated, and
each sequence may be a decode (one query token), a whole prefill, or a prefill chunk that follows
tokens already in the cache (its own earlier chunks or prefix-cache hits).

Cache layout per layer: key and value tensors of shape [num_blocks, block_size, num_kv_heads,
head_dim]. A token at position p of a sequence lives in slot block_table[p // bs] * bs + p % bs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 marks a padding token not to store
    query_start_loc: list[int]  # [num_seqs + 1] offsets of each sequence's queries
    context_lens: list[int]  # [num_seqs] tokens in the cache after this step, queries included
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    decode_seqs: list[int]  # sequences with one query token: batched together in the reference
    prefill_seqs: list[int]  # the others
    max_context_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store each token's K/V ([num_tokens, num_kv_heads, head_dim]) at its slot."""
    num_kv_heads, head_dim = key.shape[1], key.shape[2]
    flat_k = key_cache.view(-1, num_kv_heads, head_dim)
    flat_v = value_cache.view(-1, num_kv_heads, head_dim)
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    flat_k.index_copy_(0, slot_mapping, key)
    flat_v.index_copy_(0, slot_mapping, value)


def _gather(cache: torch.Tensor, block_table: torch.Tensor, length: int) -> torch.Tensor:
    """One sequence's first `length` cached tokens as [num_kv_heads, length, head_dim]."""
    block_size = cache.shape[1]
    num_blocks = -(-length // block_size)
    tokens = cache[block_table[:num_blocks]].flatten(0, 1)[:length]
    return tokens.transpose(0, 1)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of every query token over its sequence's cached tokens.

    query: [num_tokens, num_heads, head_dim]; returns the same shape. The K/V of this step's
    tokens must already be in the cache (write_kv_cache first)."""
    out = torch.empty_like(query)
    num_heads = query.shape[1]
    gqa = num_heads != key_cache.shape[2]

    for i in meta.prefill_seqs:
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        ctx = meta.context_lens[i]
        q = query[start:end].transpose(0, 1)  # [H, q_len, D]
        k = _gather(key_cache, meta.block_tables[i], ctx)
        v = _gather(value_cache, meta.block_tables[i], ctx)
        q_len = end - start
        if q_len == ctx:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            # Query j sits at absolute position ctx - q_len + j and sees keys up to it.
            q_pos = torch.arange(ctx - q_len, ctx, device=query.device)
            mask = torch.arange(ctx, device=query.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[start:end] = o.transpose(0, 1)

    if meta.decode_seqs:
        rows = torch.tensor(
            [meta.query_start_loc[i] for i in meta.decode_seqs], device=query.device
        )
        lens = torch.tensor([meta.context_lens[i] for i in meta.decode_seqs], device=query.device)
        max_len = int(lens.max())
        block_size = key_cache.shape[1]
        num_blocks = -(-max_len // block_size)
        tables = meta.block_tables[meta.decode_seqs][:, :num_blocks]
        # [B, blocks, bs, Hkv, D] -> [B, Hkv, L, D]; padding positions are masked out below.
        k = key_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
        v = value_cache[tables].flatten(1, 2)[:, :max_len].transpose(1, 2)
        q = query[rows].unsqueeze(2)  # [B, H, 1, D]
        mask = torch.arange(max_len, device=query.device)[None, :] < lens[:, None]
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask[:, None, None, :], scale=scale, enable_gqa=gqa
        )
        out[rows] = o.squeeze(2)
    return out
