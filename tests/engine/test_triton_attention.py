"""The Triton paged-attention kernels against the PyTorch reference in kvpilot_engine.attention.

Without a GPU the kernels run on CPU tensors in the Triton interpreter (tests/conftest.py switches
it on before anything imports Triton); on a GPU machine the same tests run the compiled kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from kvpilot_engine.attention import (
    AttentionMetadata,
    Workspace,
    build_decode_groups,
    write_kv_cache,
)
from kvpilot_engine.attention import paged_attention as reference_attention
from kvpilot_engine.kernels.attention import (
    _default_num_splits,
    paged_attention,
    store_kv_cache,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BLOCK_SIZE = 16
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@dataclass
class Batch:
    """One step's inputs for both implementations. Padding rows (seq_len 0, one query token,
    block table all 0) come after the real sequences and are not given to the reference."""

    seqs: list[tuple[int, int]]  # (tokens cached before this step, query tokens this step)
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    tables: list[list[int]]
    query_start_loc: list[int]
    num_padding: int

    @property
    def seq_lens(self) -> list[int]:
        return [c + q for c, q in self.seqs] + [0] * self.num_padding

    @property
    def num_real_tokens(self) -> int:
        return self.query_start_loc[len(self.seqs)]

    def kernel_args(self) -> dict:
        width = max(len(t) for t in self.tables)
        tables = [t + [0] * (width - len(t)) for t in self.tables]
        tables += [[0] * width] * self.num_padding
        as_int32 = dict(dtype=torch.int32, device=DEVICE)
        return dict(
            block_tables=torch.tensor(tables, **as_int32),
            query_start_loc=torch.tensor(self.query_start_loc, **as_int32),
            seq_lens=torch.tensor(self.seq_lens, **as_int32),
            max_query_len=max(q for _, q in self.seqs),
            max_seq_len=max(self.seq_lens),
        )


def make_batch(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    *,
    layout: str = "shuffled",
    num_padding: int = 0,
    seed: int = 0,
) -> Batch:
    """Random K/V for every sequence: the cached prefix put in the pool directly, this step's
    tokens through store_kv_cache. Block 0 and every block no sequence owns hold NaN, so a read
    outside a sequence's own keys shows up in the output."""
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-(c + q) // BLOCK_SIZE) for c, q in seqs]
    num_blocks = sum(needed) + 3
    ids = list(range(1, num_blocks))
    if layout == "shuffled":
        # Its own generator, so the K/V and queries do not depend on the layout.
        perm = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed + 1))
        ids = [ids[i] for i in perm.tolist()]
    elif layout == "reversed":
        ids.reverse()
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    tables, queries, new_k, new_v, slots, starts = [], [], [], [], [], [0]
    for (cached, q_len), n in zip(seqs, needed, strict=True):
        ctx = cached + q_len
        table = [ids.pop(0) for _ in range(n)]
        tables.append(table)
        k = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
        v = torch.randn(ctx, num_kv_heads, head_dim, generator=gen).to(dtype)
        for p in range(cached):
            key_cache[table[p // BLOCK_SIZE], p % BLOCK_SIZE] = k[p]
            value_cache[table[p // BLOCK_SIZE], p % BLOCK_SIZE] = v[p]
        new_k.append(k[cached:])
        new_v.append(v[cached:])
        slots += [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(cached, ctx)]
        queries.append(torch.randn(q_len, num_heads, head_dim, generator=gen).to(dtype))
        starts.append(starts[-1] + q_len)
    for _ in range(num_padding):
        queries.append(torch.randn(1, num_heads, head_dim, generator=gen).to(dtype))
        starts.append(starts[-1] + 1)
    key_cache, value_cache = key_cache.to(DEVICE), value_cache.to(DEVICE)
    store_kv_cache(
        torch.cat(new_k).to(DEVICE),
        torch.cat(new_v).to(DEVICE),
        key_cache,
        value_cache,
        torch.tensor(slots, dtype=torch.int32, device=DEVICE),
    )
    return Batch(
        seqs, torch.cat(queries).to(DEVICE), key_cache, value_cache, tables, starts, num_padding
    )


def reference(batch: Batch, scale: float) -> torch.Tensor:
    """The PyTorch reference over the real sequences, in float32 on the same (rounded) inputs."""
    width = max(len(t) for t in batch.tables)
    ctx = batch.seq_lens[: len(batch.seqs)]
    meta = AttentionMetadata(
        slot_mapping=torch.empty(0, dtype=torch.long, device=DEVICE),
        query_start_loc=batch.query_start_loc[: len(batch.seqs) + 1],
        context_lens=ctx,
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in batch.tables]).to(DEVICE),
        decode_seqs=[i for i, (_, q) in enumerate(batch.seqs) if q == 1],
        prefill_seqs=[i for i, (_, q) in enumerate(batch.seqs) if q != 1],
        max_context_len=max(ctx),
    )
    block_shape = batch.key_cache.shape[1:]
    ws = Workspace(block_shape, torch.float32, torch.device(DEVICE))
    meta.decode_groups = build_decode_groups(meta, BLOCK_SIZE, ws, cpu_kernel=False)
    # The reference gathers whole padded block-table rows for its decode groups and masks the
    # keys after; zero the NaN poison for it (the kernels must never read it).
    key_cache = batch.key_cache.float().nan_to_num(0.0)
    value_cache = batch.value_cache.float().nan_to_num(0.0)
    query = batch.query[: batch.num_real_tokens].float()
    return reference_attention(query, key_cache, value_cache, meta, scale)


def check(batch: Batch, out: torch.Tensor, scale: float) -> None:
    tol = TOLERANCE[batch.query.dtype]
    assert out.dtype == batch.query.dtype and out.shape == batch.query.shape
    ref = reference(batch, scale)
    for i, (cached, q_len) in enumerate(batch.seqs):
        rows = slice(batch.query_start_loc[i], batch.query_start_loc[i + 1])
        got = out[rows].float()
        err = (got - ref[rows]).abs().max().item()
        assert torch.allclose(got, ref[rows], atol=tol, rtol=tol), (
            f"sequence {i} ({cached}+{q_len}): max error {err}"
        )
    padding = out[batch.num_real_tokens :]
    assert torch.equal(padding, torch.zeros_like(padding)), "padding rows must be zeros"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_store_kv_cache_matches_reference(dtype, slot_dtype):
    torch.manual_seed(0)
    num_blocks, num_kv_heads, head_dim, num_tokens = 6, 3, 80, 24
    shape = (num_blocks, BLOCK_SIZE, num_kv_heads, head_dim)
    key_cache = torch.randn(shape).to(dtype).to(DEVICE)
    value_cache = torch.randn(shape).to(dtype).to(DEVICE)
    # K and V as strided views of one fused projection, as a model produces them.
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim).to(dtype).to(DEVICE)
    key, value = qkv[:, num_kv_heads : 2 * num_kv_heads], qkv[:, 2 * num_kv_heads :]
    slots = torch.randperm(num_blocks * BLOCK_SIZE)[:num_tokens]
    slots[torch.tensor([0, 5, 6, num_tokens - 1])] = -1  # padding tokens, not stored
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    write_kv_cache(key, value, expected_k, expected_v, slots.to(DEVICE))
    store_kv_cache(key, value, key_cache, value_cache, slots.to(slot_dtype).to(DEVICE))
    # Exact: a copy, and rows no slot addresses stay as they were.
    assert torch.equal(key_cache, expected_k)
    assert torch.equal(value_cache, expected_v)


# Lengths on and one past a block boundary (16, 17, 32, 33): decodes, whole prefills, and
# prefill chunks after a cached prefix, all in one launch.
MIXED = [(15, 1), (16, 1), (31, 1), (32, 1), (0, 16), (0, 17), (16, 17), (20, 13)]


@pytest.mark.parametrize(
    ("group", "num_kv_heads", "head_dim", "dtype"),
    [
        (1, 2, 64, torch.float32),
        (3, 2, 80, torch.float32),
        (4, 1, 128, torch.float16),
        (8, 1, 64, torch.float16),
        (3, 1, 80, torch.float16),
        (4, 2, 80, torch.float32),
        (8, 1, 128, torch.float32),
        (1, 2, 128, torch.float16),
    ],
)
def test_mixed_batch_matches_reference(group, num_kv_heads, head_dim, dtype):
    batch = make_batch(MIXED, group * num_kv_heads, num_kv_heads, head_dim, dtype, num_padding=2)
    scale = head_dim**-0.5
    out = paged_attention(
        batch.query, batch.key_cache, batch.value_cache, **batch.kernel_args(), scale=scale
    )
    check(batch, out, scale)


@pytest.mark.parametrize("layout", ["contiguous", "reversed", "shuffled"])
def test_block_table_layouts(layout):
    # The same sequences whatever blocks of the pool they were given, in whatever order.
    seqs = [(40, 1), (0, 33), (17, 16)]
    batch = make_batch(seqs, 4, 2, 64, torch.float32, layout=layout, seed=3)
    out = paged_attention(
        batch.query, batch.key_cache, batch.value_cache, **batch.kernel_args(), scale=0.125
    )
    check(batch, out, 0.125)
    baseline = make_batch(seqs, 4, 2, 64, torch.float32, layout="contiguous", seed=3)
    assert baseline.tables != batch.tables or layout == "contiguous"
    expected = paged_attention(
        baseline.query,
        baseline.key_cache,
        baseline.value_cache,
        **baseline.kernel_args(),
        scale=0.125,
    )
    assert torch.allclose(out, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("chunks", [[20, 25], [13, 16, 16]])
def test_chunked_prefill_equals_whole_prefill(chunks):
    num_heads, num_kv_heads, head_dim = 4, 1, 64
    prompt_len = sum(chunks)
    whole = make_batch([(0, prompt_len)], num_heads, num_kv_heads, head_dim, torch.float32)
    scale = head_dim**-0.5
    args = whole.kernel_args()
    expected = paged_attention(whole.query, whole.key_cache, whole.value_cache, **args, scale=scale)
    check(whole, expected, scale)

    # The same prompt again, one chunk per step; each chunk attends to the cached earlier ones.
    key_cache = torch.full_like(whole.key_cache, float("nan"))
    value_cache = torch.full_like(whole.value_cache, float("nan"))
    slots = [b * BLOCK_SIZE + o for b in whole.tables[0] for o in range(BLOCK_SIZE)]
    slots = torch.tensor(slots[:prompt_len], device=DEVICE)
    flat_k = whole.key_cache.view(-1, num_kv_heads, head_dim)[slots]
    flat_v = whole.value_cache.view(-1, num_kv_heads, head_dim)[slots]
    outs, done = [], 0
    for n in chunks:
        rows = slice(done, done + n)
        store_kv_cache(flat_k[rows], flat_v[rows], key_cache, value_cache, slots[rows])
        done += n
        step = dict(args, max_query_len=n, max_seq_len=done)
        step["query_start_loc"] = torch.tensor([0, n], dtype=torch.int32, device=DEVICE)
        step["seq_lens"] = torch.tensor([done], dtype=torch.int32, device=DEVICE)
        outs.append(paged_attention(whole.query[rows], key_cache, value_cache, **step, scale=scale))
    assert torch.allclose(torch.cat(outs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("num_splits", "group", "head_dim", "dtype"),
    [
        (1, 4, 64, torch.float32),
        (4, 4, 64, torch.float32),
        (7, 4, 64, torch.float32),
        (None, 4, 64, torch.float32),
        (4, 3, 80, torch.float16),
        (None, 8, 128, torch.float16),
    ],
)
def test_split_k_decode_matches_reference(num_splits, group, head_dim, dtype):
    # Long and short contexts together: with several partitions, those past a short
    # sequence's end must weigh nothing.
    seqs = [(299, 1), (16, 1), (0, 1), (32, 1)]
    num_kv_heads = 2
    batch = make_batch(
        seqs, group * num_kv_heads, num_kv_heads, head_dim, dtype, num_padding=1, seed=1
    )
    args = batch.kernel_args()
    if num_splits is None:
        # The default for this batch must actually take the split-K path.
        default = _default_num_splits(
            len(batch.seq_lens), num_kv_heads, args["max_seq_len"], batch.query.device
        )
        assert default > 1
    out = paged_attention(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        **args,
        scale=head_dim**-0.5,
        num_splits=num_splits,
    )
    check(batch, out, head_dim**-0.5)


@pytest.mark.parametrize(("max_query_len", "num_splits"), [(1, 1), (1, 4), (3, None)])
def test_padding_rows_write_zeros(max_query_len, num_splits):
    # Padding rows read no cache (block 0 is NaN) and overwrite whatever out held.
    seqs = [(20, 1)] if max_query_len == 1 else [(20, 3)]
    batch = make_batch(seqs, 4, 1, 64, torch.float16, num_padding=3)
    out = torch.full_like(batch.query, float("nan"))
    result = paged_attention(
        batch.query,
        batch.key_cache,
        batch.value_cache,
        **batch.kernel_args(),
        scale=0.125,
        num_splits=num_splits,
        out=out,
    )
    assert result is out
    check(batch, out, 0.125)


@pytest.mark.gpu
def test_mixed_batch_bfloat16_on_gpu():
    for group, num_kv_heads, head_dim in [(1, 4, 128), (4, 2, 80), (8, 1, 64)]:
        batch = make_batch(
            MIXED, group * num_kv_heads, num_kv_heads, head_dim, torch.bfloat16, num_padding=2
        )
        scale = head_dim**-0.5
        out = paged_attention(
            batch.query, batch.key_cache, batch.value_cache, **batch.kernel_args(), scale=scale
        )
        check(batch, out, scale)
