"""Paged attention: the one seam between the model and the KV cache layout.

The model calls `write_kv_cache` and `paged_attention` and knows nothing else about blocks. This
module is the PyTorch reference: the CPU path, and the oracle that the GPU kernels are tested
against. A batch is flattened: the query tokens of every scheduled sequence are concatenated, and
each sequence may be a decode (one query token), a whole prefill, or a prefill chunk that follows
tokens already in the cache (its own earlier chunks or prefix-cache hits).

Cache layout per layer: key and value tensors of shape [num_blocks, block_size, num_kv_heads,
head_dim]. A token at position p of a sequence lives in slot block_table[p // bs] * bs + p % bs.

Decode rows on CPU can go to the C++ kernel of kernels/cpu_decode.py instead (it reads the
blocks in place; opt-in with KVPILOT_CPU_KERNELS=1); this module's gather + SDPA path is its
reference and the default.
CUDA tensors go to the Triton kernels in kernels/attention.py instead: ModelRunner.prepare then
fills the metadata's device tensors (query_start_loc_t, seq_lens_t, int32 block tables) and no
decode groups. `KVPILOT_FORCE_TRITON=1` sends CPU tensors there too, for tests that run the whole
model through the kernels under the Triton interpreter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kvpilot_engine.kernels import cpu_decode

if TYPE_CHECKING:
    from kvpilot_engine.lora.layers import LoRAStep


@dataclass
class DecodeGroup:
    """Sequences with a few query tokens each (decodes, verify steps of drafts) and contexts of
    similar length, attended in one padded SDPA call.

    Built once per step and shared by every layer: the gather index, the padding mask and the
    buffers the gathered K/V land in (preallocated, so 30 layers do not fault in fresh pages).
    A sequence with fewer than `num_queries` query tokens repeats its first one in the slots
    before them; those slots' outputs are dropped."""

    rows: torch.Tensor  # [G * Q] query rows in the flattened batch, sequence-major
    block_ids: torch.Tensor  # [G * num_blocks] the blocks to gather, row-major
    mask: torch.Tensor  # [G, 1, Q, L] True where a key is visible to a query slot
    max_len: int  # L
    num_blocks: int
    key_buf: torch.Tensor  # [G * num_blocks, block_size, num_kv_heads, head_dim]
    value_buf: torch.Tensor
    num_queries: int = 1  # Q
    # With Q > 1: the slots that are real queries (indexes into G * Q) and their rows.
    real_slots: torch.Tensor | None = None
    real_rows: torch.Tensor | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64; -1 marks a padding token not to store
    query_start_loc: list[int]  # [num_seqs + 1] offsets of each sequence's queries
    context_lens: list[int]  # [num_seqs] tokens in the cache after this step, queries included
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int64, padded with 0
    decode_seqs: list[int]  # sequences with one query token
    # The others; on the CPU path build_decode_groups takes the short ones (up to
    # MAX_GROUPED_QUERY tokens) into its groups and leaves here those attended one at a time.
    prefill_seqs: list[int]
    max_context_len: int
    decode_groups: list[DecodeGroup] = field(default_factory=list)
    # The Triton path's inputs (None on the reference path). Everything the kernels read is a
    # device tensor or a Python int fixed per launch, so a decode step can be a CUDA graph.
    query_start_loc_t: torch.Tensor | None = None  # int32 [num_seqs + 1]
    seq_lens_t: torch.Tensor | None = None  # int32 [num_seqs]; 0 marks a graph's padding row
    max_query_len: int = 0
    num_splits: int | None = None  # split-K partitions for decode (None: the kernel's choice)
    # The C++ CPU decode kernel's inputs (kernels/cpu_decode.py), instead of decode groups:
    # context lengths of every sequence, and the decode sequences with their query rows.
    cpu_decode: CpuDecodeIndex | None = None
    # The step's LoRA adapters (lora/layers.py), which the projections add; None: base only.
    lora: LoRAStep | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)


@dataclass
class CpuDecodeIndex:
    context_lens: torch.Tensor  # [num_seqs] int64
    seq_ids: torch.Tensor  # [num_decodes] int64
    rows: torch.Tensor  # [num_decodes] int64 query rows in the flattened batch


DECODE_GROUP_SIZE = 16
# Sequences with up to this many query tokens are attended in decode groups: a verify step's
# drafts (and a short prefill chunk) then cost rows of a batched call, not a call of their own
# per sequence and layer, which on CPU cost as much as the whole step's matmuls at 16 in flight.
MAX_GROUPED_QUERY = 16
CPU_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def use_triton(device: torch.device) -> bool:
    """CUDA tensors run the Triton kernels; CPU tensors the PyTorch reference (unless forced)."""
    return device.type == "cuda" or os.environ.get("KVPILOT_FORCE_TRITON") == "1"


def build_decode_groups(
    meta: AttentionMetadata,
    block_size: int,
    workspace: Workspace,
    cpu_kernel: bool | None = None,
) -> list[DecodeGroup]:
    """Sort the sequences with few query tokens by query count and context length and cut them
    into groups, so padding to the longest in a group wastes little; `meta.prefill_seqs` keeps
    the rest. With the C++ CPU kernel only decodes are taken and there are no groups: it reads
    the blocks in place, and `meta.cpu_decode` gets its index instead."""
    if cpu_kernel is None:  # the engine's choice: opt-in for now (cpu_decode.enabled)
        cpu_kernel = cpu_decode.enabled()
    if cpu_kernel and workspace.dtype in CPU_KERNEL_DTYPES and cpu_decode.load():
        meta.cpu_decode = CpuDecodeIndex(
            context_lens=torch.tensor(meta.context_lens, dtype=torch.long),
            seq_ids=torch.tensor(meta.decode_seqs, dtype=torch.long),
            rows=torch.tensor([meta.query_start_loc[i] for i in meta.decode_seqs]),
        )
        return []
    qsl = meta.query_start_loc

    def q_len(i: int) -> int:
        return qsl[i + 1] - qsl[i]

    short = [i for i in meta.prefill_seqs if q_len(i) <= MAX_GROUPED_QUERY]
    meta.prefill_seqs = [i for i in meta.prefill_seqs if q_len(i) > MAX_GROUPED_QUERY]
    # Decodes and multi-token queries are grouped apart: one verifying sequence would
    # otherwise pad every decode of its group to its query count.
    by_len = sorted(short, key=lambda i: (q_len(i), meta.context_lens[i]))
    cuts = []
    for order in (sorted(meta.decode_seqs, key=lambda i: meta.context_lens[i]), by_len):
        cuts += [order[g : g + DECODE_GROUP_SIZE] for g in range(0, len(order), DECODE_GROUP_SIZE)]
    groups: list[DecodeGroup] = []
    offset = 0
    specs = []
    for members in cuts:
        max_len = max(meta.context_lens[i] for i in members)
        num_blocks = -(-max_len // block_size)
        specs.append((members, max_len, num_blocks, offset))
        offset += len(members) * num_blocks
    key_ws, value_ws = workspace.get(offset)
    dev = meta.block_tables.device
    for members, max_len, num_blocks, off in specs:
        idx = torch.tensor(members, device=dev)
        n = len(members) * num_blocks
        nq = max(q_len(i) for i in members)
        # Slot j of a sequence with q query tokens holds query max(j - (Q - q), 0), at absolute
        # position ctx - q + that, and sees the keys up to it (for decodes: keys < ctx).
        rows, real_slots, real_rows, pads, first_pos = [], [], [], [], []
        for m, i in enumerate(members):
            q = q_len(i)
            pads.append(nq - q)
            first_pos.append(meta.context_lens[i] - q)
            rows += [qsl[i]] * (nq - q) + list(range(qsl[i], qsl[i + 1]))
            real_slots += range(m * nq + nq - q, (m + 1) * nq)
            real_rows += range(qsl[i], qsl[i + 1])
        j = torch.arange(nq, device=dev)[None, :]
        pad = torch.tensor(pads, device=dev)[:, None]
        pos = torch.tensor(first_pos, device=dev)[:, None] + (j - pad).clamp(min=0)
        keys = torch.arange(max_len, device=dev)
        groups.append(
            DecodeGroup(
                rows=torch.tensor(rows, device=dev),
                block_ids=meta.block_tables[idx, :num_blocks].reshape(-1),
                mask=(keys[None, None, :] <= pos[:, :, None])[:, None],
                max_len=max_len,
                num_blocks=num_blocks,
                key_buf=key_ws[off : off + n],
                value_buf=value_ws[off : off + n],
                num_queries=nq,
                real_slots=torch.tensor(real_slots, device=dev) if nq > 1 else None,
                real_rows=torch.tensor(real_rows, device=dev) if nq > 1 else None,
            )
        )
    return groups


class Workspace:
    """Gather buffers for decode attention that only grow, reused step after step."""

    def __init__(self, block_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
        self.block_shape = block_shape
        self.dtype = dtype
        self.device = device
        self._key = torch.empty(0, *block_shape, dtype=dtype, device=device)
        self._value = torch.empty(0, *block_shape, dtype=dtype, device=device)

    def get(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        if num_blocks > self._key.shape[0]:
            size = max(num_blocks, 2 * self._key.shape[0])
            self._key = torch.empty(size, *self.block_shape, dtype=self.dtype, device=self.device)
            self._value = torch.empty_like(self._key)
        return self._key, self._value


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store each token's K/V ([num_tokens, num_kv_heads, head_dim]) at its slot."""
    if use_triton(key.device):
        from kvpilot_engine.kernels.attention import store_kv_cache

        store_kv_cache(key, value, key_cache, value_cache, slot_mapping)
        return
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
    if meta.seq_lens_t is not None:
        from kvpilot_engine.kernels import attention as kernels

        assert meta.query_start_loc_t is not None
        return kernels.paged_attention(
            query,
            key_cache,
            value_cache,
            meta.block_tables,
            meta.query_start_loc_t,
            meta.seq_lens_t,
            max_query_len=meta.max_query_len,
            max_seq_len=meta.max_context_len,
            scale=scale,
            num_splits=meta.num_splits,
        )
    out = torch.empty_like(query)
    num_heads = query.shape[1]
    gqa = num_heads != key_cache.shape[2]

    for i in meta.prefill_seqs:
        start, end = meta.query_start_loc[i], meta.query_start_loc[i + 1]
        ctx = meta.context_lens[i]
        # [1, H, len, D]: with a batch dimension PyTorch's CPU SDPA takes its flash kernel;
        # without one, its math path (4x slower on a 455-token prompt).
        q = query[start:end].transpose(0, 1)[None]
        k = _gather(key_cache, meta.block_tables[i], ctx)[None]
        v = _gather(value_cache, meta.block_tables[i], ctx)[None]
        q_len = end - start
        if q_len == ctx:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        else:
            # Query j sits at absolute position ctx - q_len + j and sees keys up to it.
            q_pos = torch.arange(ctx - q_len, ctx, device=query.device)
            mask = torch.arange(ctx, device=query.device)[None, :] <= q_pos[:, None]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
        out[start:end] = o[0].transpose(0, 1)

    if meta.cpu_decode is not None:
        c = meta.cpu_decode
        cpu_decode.paged_decode(
            out, query, key_cache, value_cache, meta.block_tables, c.context_lens, c.seq_ids,
            c.rows, scale,
        )  # fmt: skip
    for g in meta.decode_groups:
        batch, nq = g.mask.shape[0], g.num_queries
        torch.index_select(key_cache, 0, g.block_ids, out=g.key_buf)
        torch.index_select(value_cache, 0, g.block_ids, out=g.value_buf)
        # [G * blocks, bs, Hkv, D] -> [G, Hkv, L, D]; keys past a row's length are masked.
        k = g.key_buf.view(batch, -1, *key_cache.shape[2:])[:, : g.max_len].transpose(1, 2)
        v = g.value_buf.view(batch, -1, *key_cache.shape[2:])[:, : g.max_len].transpose(1, 2)
        q = query[g.rows].view(batch, nq, num_heads, -1).transpose(1, 2)  # [G, H, Q, D]
        if query.dtype == torch.float32:
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=g.mask, scale=scale, enable_gqa=gqa
            )
        else:
            o = _grouped_decode_attention(q, k, v, g.mask, scale)
        o = o.transpose(1, 2).reshape(batch * nq, num_heads, -1)  # [G * Q, H, D]
        if g.real_slots is None:
            out[g.rows] = o
        else:
            out[g.real_rows] = o[g.real_slots]
    return out


def _grouped_decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Decode attention as two batched matmuls with the query heads of each KV head grouped.

    PyTorch's CPU SDPA is several times slower in 16-bit than this; scores and softmax are
    taken in float32. q: [G, H, Q, D]; k, v: [G, Hkv, L, D]; mask: [G, 1, Q, L]; returns
    [G, H, Q, D]."""
    batch, num_heads, nq, head_dim = q.shape
    num_kv_heads = k.shape[1]
    groups = num_heads // num_kv_heads
    # Rows of a KV head's block are (query head, query slot) pairs, head-major.
    qg = q.reshape(batch, num_kv_heads, groups * nq, head_dim)
    k, v = k.contiguous(), v.contiguous()
    scores = torch.matmul(qg, k.transpose(-1, -2)).float() * scale
    scores.masked_fill_(~mask.repeat(1, 1, groups, 1), float("-inf"))
    probs = scores.softmax(dim=-1).to(v.dtype)
    return torch.matmul(probs, v).view(batch, num_heads, nq, head_dim)
