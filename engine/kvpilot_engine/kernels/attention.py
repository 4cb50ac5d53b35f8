"""Triton kernels for the paged KV cache: storing this step's K/V and paged attention.

Same contract as the PyTorch reference in `kvpilot_engine.attention`: caches are
[num_blocks, block_size, num_kv_heads, head_dim], a token at position p of a sequence lives in
slot block_table[p // block_size] * block_size + p % block_size, and a batch is the flattened
query tokens of decodes, whole prefills and prefill chunks that follow a cached prefix.

Attention grid: (num_seqs, cdiv(max_query_len, BLOCK_M), num_kv_heads * num_splits). A program
owns BLOCK_M query tokens of one sequence and every query head that shares one KV head: the M
dimension of its tile is BLOCK_M tokens x GROUP_PAD heads (the GQA group padded to a power of two
and masked), so each K/V tile is loaded once for the whole group. It walks the sequence's keys in
tiles of BLOCK_N tokens, mapping each token through the block table, with an online softmax in
float32; keys past the causal limit of the tile's last query are never loaded. Programs past a
sequence's query length exit at once, so one launch serves a mixed batch.

Split-K: a decode step has one query token per sequence, so with few sequences the grid above
has too few programs to fill the GPU on long contexts. When max_query_len == 1 the keys of each
sequence are cut into num_splits partitions (grid axis 2); each program writes its normalised
partial output and its log-sum-exp to float32 scratch, and a second small kernel merges the
partitions. Partitions past a sequence's end hold log-sum-exp -inf and weigh nothing.

Nothing here reads a tensor on the host: grid sizes come from Python ints and shapes only, so
decode steps can be captured in CUDA graphs. A padding row (seq_len 0) reads no cache and
writes zeros.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpilot_engine.device import sm_count

_LOG2E = 1.4426950408889634

# Rows (query tokens x group heads) per prefill tile, and keys per step of the key loop.
_PREFILL_ROWS = 64
_BLOCK_N = 64
# tl.dot needs every tile dimension to be at least 16.
_MIN_DOT = 16
# Split-K heuristic: a partition covers at least this many keys (a few cache blocks), and no
# more partitions than this, so the merge stays cheap.
_MIN_SPLIT_TOKENS = 128
_MAX_SPLITS = 16
# SMs of an H100/H200; the target when the device cannot be asked (CPU, interpreter).
_DEFAULT_NUM_SMS = 132


@triton.jit
def _store_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    slot_mapping_ptr,
    stride_k_tok,
    stride_k_head,
    stride_v_tok,
    stride_v_head,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_PAD)[:, None]
    dims = tl.arange(0, DIM_PAD)[None, :]
    mask = (heads < NUM_KV_HEADS) & (dims < HEAD_DIM)
    dst = (slot // BLOCK_SIZE) * stride_c_block + (slot % BLOCK_SIZE) * stride_c_slot
    dst += heads * stride_c_head + dims
    k = tl.load(key_ptr + token * stride_k_tok + heads * stride_k_head + dims, mask=mask)
    v = tl.load(value_ptr + token * stride_v_tok + heads * stride_v_head + dims, mask=mask)
    tl.store(key_cache_ptr + dst, k, mask=mask)
    tl.store(value_cache_ptr + dst, v, mask=mask)


def store_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """key/value [num_tokens, num_kv_heads, head_dim]; caches as above; slot_mapping [num_tokens]
    int32 or int64, -1 = padding token, skipped (not written)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    _check_cache_layout(key_cache, value_cache)
    assert key.stride(-1) == 1 and value.stride(-1) == 1, "head_dim must be contiguous"
    _store_kv_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=key_cache.shape[1],
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        DIM_PAD=triton.next_power_of_2(head_dim),
    )


@triton.jit
def _paged_attention_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    out_ptr,  # the output, or with SPLIT the float32 partial outputs
    lse_ptr,  # with SPLIT: float32 log2-sum-exp per (token, head, split); unused otherwise
    block_tables_ptr,
    query_start_loc_ptr,
    seq_lens_ptr,
    scale_log2,  # softmax scale * log2(e): scores live in the exp2 domain
    num_splits,
    stride_q_tok,
    stride_q_head,
    stride_o_tok,
    stride_o_head,
    stride_o_split,
    stride_lse_tok,
    stride_lse_head,
    stride_c_block,
    stride_c_slot,
    stride_c_head,
    stride_bt_seq,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2) // num_splits
    split = tl.program_id(2) % num_splits

    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_M >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)

    # Row r of the tile is query token r // GROUP_PAD of this tile, head r % GROUP_PAD of the
    # group. BLOCK_ROWS may exceed BLOCK_M * GROUP_PAD when padded up to the dot minimum.
    rows = tl.arange(0, BLOCK_ROWS)
    tok = q_tile * BLOCK_M + rows // GROUP_PAD
    head = kv_head * GROUP + rows % GROUP_PAD
    row_valid = (rows // GROUP_PAD < BLOCK_M) & (tok < q_len) & (rows % GROUP_PAD < GROUP)
    # A chunk's queries are the last q_len positions of the sequence.
    q_pos = seq_len - q_len + tok
    dims = tl.arange(0, DIM_PAD)
    dim_valid = dims < HEAD_DIM
    q_mask = row_valid[:, None] & dim_valid[None, :]
    tok64 = (q_start + tok).to(tl.int64)
    q_offs = tok64[:, None] * stride_q_tok + head[:, None] * stride_q_head + dims[None, :]
    q = tl.load(query_ptr + q_offs, mask=q_mask, other=0.0)

    # Keys up to the causal limit of the tile's last query; with split-K, this program's share
    # of them, in whole BLOCK_N tiles so partitions never share a tile.
    kv_end = tl.maximum(seq_len - q_len + tl.minimum(q_len, (q_tile + 1) * BLOCK_M), 0)
    split_len = tl.cdiv(tl.cdiv(kv_end, num_splits), BLOCK_N) * BLOCK_N
    kv_lo = split * split_len
    kv_hi = tl.minimum(kv_lo + split_len, kv_end)

    m_i = tl.full([BLOCK_ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_ROWS], tl.float32)
    acc = tl.zeros([BLOCK_ROWS, DIM_PAD], tl.float32)
    table = block_tables_ptr + seq.to(tl.int64) * stride_bt_seq
    for start in range(kv_lo, kv_hi, BLOCK_N):
        pos = start + tl.arange(0, BLOCK_N)
        in_range = pos < kv_hi
        block = tl.load(table + pos // BLOCK_SIZE, mask=in_range, other=0).to(tl.int64)
        kv_offs = block * stride_c_block + (pos % BLOCK_SIZE) * stride_c_slot
        kv_offs += kv_head * stride_c_head
        kv_ptrs = kv_offs[:, None] + dims[None, :]
        kv_mask = in_range[:, None] & dim_valid[None, :]
        k = tl.load(key_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(value_cache_ptr + kv_ptrs, mask=kv_mask, other=0.0)

        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = (pos[None, :] <= q_pos[:, None]) & in_range[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no visible key yet keeps m = -inf; shifting it by 0 instead keeps exp2 at 0
        # rather than NaN from -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    # l == 0 (no key seen: padding row or empty partition) gives zeros, never NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_offs = tok64[:, None] * stride_o_tok + head[:, None] * stride_o_head + dims[None, :]
    o_offs += split * stride_o_split
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    if SPLIT:
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        lse_offs = tok64 * stride_lse_tok + head * stride_lse_head + split
        tl.store(lse_ptr + lse_offs, lse, mask=row_valid)


@triton.jit
def _merge_splits_kernel(
    partial_ptr,
    lse_ptr,
    out_ptr,
    query_start_loc_ptr,
    num_splits,
    stride_p_tok,
    stride_p_head,
    stride_p_split,
    stride_lse_tok,
    stride_lse_head,
    stride_o_tok,
    stride_o_head,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    # Split-K runs only when every sequence has at most one query token.
    tok = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) <= tok:
        return
    tok = tok.to(tl.int64)
    splits = tl.arange(0, SPLITS_PAD)
    dims = tl.arange(0, DIM_PAD)
    split_valid = splits < num_splits
    lse_offs = tok * stride_lse_tok + head * stride_lse_head + splits
    lse = tl.load(lse_ptr + lse_offs, mask=split_valid, other=float("-inf"))
    m = tl.max(lse, 0)
    # All partitions empty (padding row): every weight is 0 and the output 0.
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.exp2(lse - m_safe)
    total = tl.sum(weight, 0)
    p_offs = tok * stride_p_tok + head * stride_p_head
    p_offs += splits[:, None] * stride_p_split + dims[None, :]
    p_mask = split_valid[:, None] & (dims < HEAD_DIM)[None, :]
    partial = tl.load(partial_ptr + p_offs, mask=p_mask, other=0.0)
    out = tl.sum(partial * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    o_offs = tok * stride_o_tok + head * stride_o_head + dims
    tl.store(out_ptr + o_offs, out.to(out_ptr.dtype.element_ty), mask=dims < HEAD_DIM)


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    max_query_len: int,
    max_seq_len: int,
    scale: float,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of every query token over its sequence's cached tokens.

    query [num_tokens, num_heads, head_dim]; block_tables int32 [num_seqs, max_blocks_per_seq];
    query_start_loc int32 [num_seqs + 1]; seq_lens int32 [num_seqs], tokens in the cache after
    this step, its queries included (this step's K/V must already be stored). max_query_len and
    max_seq_len bound the batch and size the grid. num_splits (decode only, max_query_len == 1)
    sets the split-K partitions; None picks them from max_seq_len and the batch size. Returns
    [num_tokens, num_heads, head_dim] in query's dtype (written into out when given); tokens
    past query_start_loc[-1] are left untouched.
    """
    num_tokens, num_heads, head_dim = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of KV heads"
    assert query.stride(-1) == 1, "head_dim must be contiguous"
    _check_cache_layout(key_cache, value_cache)
    num_seqs = seq_lens.shape[0]
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0 or num_tokens == 0 or max_query_len <= 0:
        return out

    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    dim_pad = max(_MIN_DOT, triton.next_power_of_2(head_dim))
    block_m = min(triton.next_power_of_2(max_query_len), max(1, _PREFILL_ROWS // group_pad))
    block_rows = max(_MIN_DOT, block_m * group_pad)
    block_n = _BLOCK_N if dim_pad <= 128 else _BLOCK_N // 2

    splits = 1
    if max_query_len == 1:
        if num_splits is None:
            num_splits = _default_num_splits(num_seqs, num_kv_heads, max_seq_len, query.device)
        splits = max(1, num_splits)

    if splits == 1:
        target, lse = out, out  # lse is never touched without SPLIT
        stride_o_split = stride_lse_tok = stride_lse_head = 0
    else:
        target = torch.empty(
            num_tokens, num_heads, splits, head_dim, dtype=torch.float32, device=query.device
        )
        lse = torch.empty(num_tokens, num_heads, splits, dtype=torch.float32, device=query.device)
        stride_o_split, stride_lse_tok, stride_lse_head = target.stride(2), *lse.stride()[:2]

    grid = (num_seqs, triton.cdiv(max_query_len, block_m), num_kv_heads * splits)
    _paged_attention_kernel[grid](
        query,
        key_cache,
        value_cache,
        target,
        lse,
        block_tables,
        query_start_loc,
        seq_lens,
        scale * _LOG2E,
        splits,
        query.stride(0),
        query.stride(1),
        target.stride(0),
        target.stride(1),
        stride_o_split,
        stride_lse_tok,
        stride_lse_head,
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        block_tables.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_SIZE=block_size,
        BLOCK_M=block_m,
        GROUP_PAD=group_pad,
        BLOCK_ROWS=block_rows,
        DIM_PAD=dim_pad,
        BLOCK_N=block_n,
        SPLIT=splits > 1,
        # float32 stays float32 (not TF32) so the GPU path matches the float32 reference.
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else None,
        num_warps=4,
    )
    if splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            target,
            lse,
            out,
            query_start_loc,
            splits,
            target.stride(0),
            target.stride(1),
            target.stride(2),
            lse.stride(0),
            lse.stride(1),
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            SPLITS_PAD=triton.next_power_of_2(splits),
            DIM_PAD=dim_pad,
            num_warps=1 if dim_pad <= 64 else 2,
        )
    return out


def _check_cache_layout(key_cache: torch.Tensor, value_cache: torch.Tensor) -> None:
    # One set of strides addresses both caches.
    assert key_cache.shape == value_cache.shape, "key and value caches differ in shape"
    assert key_cache.stride() == value_cache.stride(), "key and value caches differ in layout"
    assert key_cache.stride(-1) == 1, "head_dim must be contiguous in the cache"


def _default_num_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device
) -> int:
    """Enough partitions that the decode grid fills the SMs, none shorter than
    _MIN_SPLIT_TOKENS keys; depends only on Python ints, so it is stable under graph capture."""
    programs = num_seqs * num_kv_heads
    wanted = triton.cdiv(sm_count(device) or _DEFAULT_NUM_SMS, programs)
    return max(1, min(wanted, max_seq_len // _MIN_SPLIT_TOKENS, _MAX_SPLITS))
