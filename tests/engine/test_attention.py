"""Paged attention against dense causal attention on contiguous K/V: the PyTorch reference
(gather + SDPA) and the C++ CPU decode kernel that reads the blocks in place."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kvpilot_engine.attention import (
    AttentionMetadata,
    Workspace,
    build_decode_groups,
    paged_attention,
    write_kv_cache,
)
from kvpilot_engine.kernels import cpu_decode


def dense_reference(q, k, v, q_len, scale):
    """q: [q_len, H, D] for the last q_len positions; k, v: [ctx, Hkv, D]."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).float()
    v = v.repeat_interleave(groups, dim=1).float()
    ctx = k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    pos = torch.arange(ctx - q_len, ctx)
    scores.masked_fill_(torch.arange(ctx)[None, None, :] > pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def test_the_cpu_kernel_builds() -> None:
    # A machine with a C++ compiler (CI's does) must get the kernel, not the silent fallback.
    assert cpu_decode.load()


@pytest.mark.parametrize("cpu_kernel", [False, True], ids=["reference", "cpu-kernel"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2), (9, 3)])
def test_mixed_batch_matches_dense(dtype, heads, cpu_kernel):
    torch.manual_seed(0)
    num_heads, num_kv_heads = heads
    head_dim, bs, num_blocks = 64, 16, 64
    # (cached tokens before this step, query tokens this step): decodes, a whole prefill,
    # prefill chunks after a cached prefix, lengths on and one past a block boundary.
    seqs = [(15, 1), (16, 1), (40, 1), (0, 33), (16, 17), (31, 1), (0, 16), (47, 2), (100, 1)]
    seqs += [(0, 1), (63, 1), (64, 1)]  # a first token alone; the last block exactly full
    # Verify steps of drafts and short chunks, attended in decode groups with padded query
    # slots: across a block boundary, a whole short prompt, the most a group takes, one more.
    seqs += [(10, 6), (100, 6), (0, 3), (33, 16), (20, 17)]
    key_cache = torch.zeros(num_blocks, bs, num_kv_heads, head_dim, dtype=dtype)
    value_cache = torch.zeros_like(key_cache)
    perm = torch.randperm(num_blocks).tolist()  # blocks scattered through the pool
    tables, full_k, full_v, queries, slots, starts = [], [], [], [], [], [0]
    for cached, q_len in seqs:
        ctx = cached + q_len
        n = -(-ctx // bs)
        table = [perm.pop() for _ in range(n)]
        tables.append(table)
        k = torch.randn(ctx, num_kv_heads, head_dim, dtype=dtype)
        v = torch.randn(ctx, num_kv_heads, head_dim, dtype=dtype)
        full_k.append(k)
        full_v.append(v)
        # The cached prefix is already in the pool; this step's K/V go through write_kv_cache.
        for p in range(cached):
            key_cache[table[p // bs], p % bs] = k[p]
            value_cache[table[p // bs], p % bs] = v[p]
        slots += [table[p // bs] * bs + p % bs for p in range(cached, ctx)]
        queries.append(torch.randn(q_len, num_heads, head_dim, dtype=dtype))
        starts.append(starts[-1] + q_len)
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, seqs, strict=True)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, seqs, strict=True)])
    # A padding token (slot -1) must be skipped, not written anywhere.
    slot_mapping = torch.tensor([*slots, -1])
    write_kv_cache(
        torch.cat([new_k, torch.ones_like(new_k[:1])]),
        torch.cat([new_v, torch.ones_like(new_v[:1])]),
        key_cache,
        value_cache,
        slot_mapping,
    )
    width = max(len(t) for t in tables)
    meta = AttentionMetadata(
        slot_mapping=slot_mapping,
        query_start_loc=starts,
        context_lens=[c + q for c, q in seqs],
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
        decode_seqs=[i for i, (_, q) in enumerate(seqs) if q == 1],
        prefill_seqs=[i for i, (_, q) in enumerate(seqs) if q != 1],
        max_context_len=max(c + q for c, q in seqs),
    )
    ws = Workspace((bs, num_kv_heads, head_dim), dtype, torch.device("cpu"))
    meta.decode_groups = build_decode_groups(meta, bs, ws, cpu_kernel=cpu_kernel)
    assert (meta.cpu_decode is not None) == cpu_kernel
    assert bool(meta.decode_groups) != cpu_kernel
    scale = head_dim**-0.5
    out = paged_attention(torch.cat(queries), key_cache, value_cache, meta, scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for i, (cached, q_len) in enumerate(seqs):
        ref = dense_reference(queries[i], full_k[i], full_v[i], q_len, scale)
        got = out[starts[i] : starts[i + 1]].float()
        assert torch.allclose(got, ref, atol=tol, rtol=tol), f"sequence {i} ({cached}+{q_len})"


def test_sdpa_is_the_dense_reference():
    # The dense reference itself against PyTorch's SDPA, so the oracle is not self-made.
    torch.manual_seed(1)
    q, k, v = torch.randn(5, 4, 32), torch.randn(5, 2, 32), torch.randn(5, 2, 32)
    sdpa = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, enable_gqa=True
    ).transpose(0, 1)
    assert torch.allclose(dense_reference(q, k, v, 5, 32**-0.5), sdpa, atol=1e-5)
