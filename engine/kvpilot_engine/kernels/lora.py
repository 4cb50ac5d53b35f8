"""Multi-LoRA deltas as Triton kernels (Punica's two shapes): out[t] += (x[t] @ A[s]) @ B[s],
s the slot of token t's adapter (-1: the base model, nothing added).

Reference: `kvpilot_engine.lora.layers.lora_delta_reference` (the CPU path). Banks as there:
A [slots, in, K] and B [slots, K, out] for one layer and projection group, K = G * max_rank.

- SGMV (segmented gather matrix-vector... matrix): the step's adapted tokens sorted by slot
  into segments; one program per (segment, tile of its tokens, tile of the output) gathers its
  rows and runs tl.dot against its segment's A or B. For prefill chunks: many tokens share an
  adapter, so each weight tile is read once per token tile.
- BGMV (batched gather matrix-vector): one program per (token, output tile), reading its own
  slot's weights. For decode steps, where each sequence brings one token; everything it reads is
  a device tensor, so it could run inside a CUDA graph.

Both run a shrink (x @ A into a float32 [tokens, K] buffer) then an expand (adding y @ B into
`out` in place). The intermediate stays float32, as Punica's does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _block(n: int, lo: int = 16, hi: int = 64) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


# ---- SGMV -------------------------------------------------------------------------------------
@triton.jit
def _sgmv_kernel(
    x_ptr,  # [n, K_IN] rows gathered through rows_ptr
    w_ptr,  # [slots, K_IN, N]
    out_ptr,  # [n, N]
    rows_ptr,
    seg_start_ptr,
    seg_len_ptr,
    seg_slot_ptr,
    k_in,
    n_out,
    stride_xm,
    stride_ws,
    stride_wk,
    stride_om,
    ADD: tl.constexpr,  # add into out (expand) or overwrite it (shrink)
    CAST_X: tl.constexpr,  # x to the weights' dtype before the dot (the float32 y in expand)
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    seg_len = tl.load(seg_len_ptr + seg)
    if pid_m * BLOCK_M < seg_len:
        start = tl.load(seg_start_ptr + seg)
        slot = tl.load(seg_slot_ptr + seg).to(tl.int64)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < seg_len
        rows = tl.load(rows_ptr + start + offs_m, mask=mask_m, other=0).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_out
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, k_in, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            mask_k = offs_k < k_in
            xt = tl.load(
                x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
                mask=mask_m[:, None] & mask_k[None, :],
                other=0.0,
            )
            wt = tl.load(
                w_ptr + slot * stride_ws + offs_k[:, None] * stride_wk + offs_n[None, :],
                mask=mask_k[:, None] & mask_n[None, :],
                other=0.0,
            )
            if CAST_X:
                xt = xt.to(wt.dtype)
            acc += tl.dot(xt, wt)
        o_ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        o_mask = mask_m[:, None] & mask_n[None, :]
        if ADD:
            acc += tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


def _sgmv_launch(
    x: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    rows: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    seg_slots: torch.Tensor,
    max_len: int,
    add: bool,
) -> None:
    k_in, n_out = w.shape[1], w.shape[2]
    block_m, block_k, block_n = 16, _block(k_in, hi=32), _block(n_out)
    grid = (seg_lens.shape[0], triton.cdiv(max_len, block_m), triton.cdiv(n_out, block_n))
    _sgmv_kernel[grid](
        x, w, out, rows, seg_starts, seg_lens, seg_slots,
        k_in, n_out, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
        ADD=add, CAST_X=x.dtype != w.dtype,
        BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
    )  # fmt: skip


def sgmv(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    rows: torch.Tensor,
    seg_starts: torch.Tensor,
    seg_lens: torch.Tensor,
    seg_slots: torch.Tensor,
    max_len: int,
    out: torch.Tensor,
) -> None:
    """out[rows] += (x[rows] @ a[slot]) @ b[slot], rows in segments of one slot each."""
    _check(x, a, b, out)
    # The shrink writes every row the expand reads (the segments' rows): no zeroing needed.
    y = torch.empty(x.shape[0], a.shape[2], dtype=torch.float32, device=x.device)
    _sgmv_launch(x, a, y, rows, seg_starts, seg_lens, seg_slots, max_len, add=False)
    _sgmv_launch(y, b, out, rows, seg_starts, seg_lens, seg_slots, max_len, add=True)


# ---- BGMV -------------------------------------------------------------------------------------
@triton.jit
def _bgmv_kernel(
    x_ptr,  # [n, K_IN]
    w_ptr,  # [slots, K_IN, N]
    out_ptr,  # [n, N]
    slot_ptr,  # [n] int32, -1: no adapter
    k_in,
    n_out,
    stride_xm,
    stride_ws,
    stride_wk,
    stride_om,
    ADD: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1)
    slot = tl.load(slot_ptr + t)
    # A base-model token reads nothing (its loads are masked by a zero width).
    k_valid = tl.where(slot >= 0, k_in, 0)
    n_valid = tl.where(slot >= 0, n_out, 0)
    slot = tl.maximum(slot, 0).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < n_out
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for k0 in range(0, k_in, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_valid
        xv = tl.load(x_ptr + t * stride_xm + offs_k, mask=mask_k, other=0.0).to(tl.float32)
        wt = tl.load(
            w_ptr + slot * stride_ws + offs_k[:, None] * stride_wk + offs_n[None, :],
            mask=mask_k[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(xv[:, None] * wt, axis=0)
    o_ptrs = out_ptr + t * stride_om + offs_n
    if ADD:
        # Base-model tokens are left alone (not even rewritten).
        o_mask = offs_n < n_valid
        acc += tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n)


def _bgmv_launch(
    x: torch.Tensor, w: torch.Tensor, out: torch.Tensor, slots: torch.Tensor, add: bool
) -> None:
    k_in, n_out = w.shape[1], w.shape[2]
    block_k, block_n = _block(k_in, hi=32), _block(n_out, hi=128)
    grid = (x.shape[0], triton.cdiv(n_out, block_n))
    _bgmv_kernel[grid](
        x, w, out, slots, k_in, n_out, x.stride(0), w.stride(0), w.stride(1), out.stride(0),
        ADD=add, BLOCK_K=block_k, BLOCK_N=block_n,
    )  # fmt: skip


def bgmv(
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    token_slots: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out[t] += (x[t] @ a[slot[t]]) @ b[slot[t]] for every token whose slot is >= 0."""
    _check(x, a, b, out)
    y = torch.empty(x.shape[0], a.shape[2], dtype=torch.float32, device=x.device)
    _bgmv_launch(x, a, y, token_slots, add=False)
    _bgmv_launch(y, b, out, token_slots, add=True)


def _check(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> None:
    assert x.dim() == 2 and out.dim() == 2 and x.shape[0] == out.shape[0]
    assert a.shape[1] == x.shape[1] and b.shape[1] == a.shape[2] and b.shape[2] == out.shape[1]
    assert x.stride(1) == 1 and out.stride(1) == 1
    assert a.stride(2) == 1 and b.stride(2) == 1
