"""Weight-only quantized matmuls, y = x @ W^T (+ bias), with W dequantized inside the kernel.

Formats are those of `kvpilot_engine.quantization` (W is [N, K], groups run along K):

- int8: q int8 [N, K], scale [N, groups]; W = q * scale (groups == 1: one scale per row).
- int4: q in 0..15 packed two per byte by `pack_int4` (even k in the low nibble) into [N, K / 2],
  scale and min [N, K / group_size]; W = q * scale + min.

Tiling: each program owns a BLOCK_M x BLOCK_N tile of y and walks K in BLOCK_K steps, loading
the weight tile as raw int8 / uint8 (that is the point: decode is bound by weight bytes, and these
are a half / a quarter of fp16's). A K tile never straddles a group (BLOCK_K divides the group
size), so a tile has one scale (and min) per output column, and the scaling is applied to the
tile's partial product rather than to every weight:

    x . W[n]  =  sum over tiles  scale[n, g] * (x . q[n])  +  min[n, g] * sum(x)   (min: int4)

The integer-valued q is exact in any float dtype, so `tl.dot(x, q)` accumulates in float32 with no
rounding of the weight at all, and per weight the kernel does only the int -> float conversion
(and for int4, the nibble split). The result is the float32 product of x and the dequantized W,
which as a rule is closer to the exact value than the reference (that rounds W to x's dtype).

int4 keeps the packed layout as it is: a byte tile [BLOCK_N, BLOCK_K / 2] is split into its low
nibbles (even k) and high nibbles (odd k), and x is loaded as its matching even and odd columns,
so two dots of width BLOCK_K / 2 replace an interleave in registers.

Small batches (M <= 16, decode): BLOCK_M is 16, tl.dot's smallest M, and the few output tiles
(N / 64) are multiplied by split-K, so that there are about two programs per SM to pull weight
bytes; the float32 partials [split_k, M, N] are summed by torch afterwards (deterministic, unlike
atomics, and tiny at this M). Larger M uses plain 64 x 64 / 128 x 128 tiles without split-K; for
long prefills dequantize + cuBLAS may still be faster, which is the caller's choice.

Constraints: group_size a multiple of 32 dividing K (tl.dot needs K tiles of at least 16, and an
int4 tile is two dots over its halves); a ValueError says so otherwise (the caller keeps the
reference path for such layers). fp32 inputs use full-precision (ieee) dots, not tf32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvpilot_engine.device import sm_count

SMALL_M = 16
# tl.dot needs K >= 16, and an int4 tile is two dots over its even and odd halves.
GROUP_MULTIPLE = 32


@triton.jit
def _store_tile(
    acc,
    y_ptr,
    bias_ptr,
    offs_m,
    offs_n,
    M,
    N,
    stride_ym,
    stride_yn,
    pid_k,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
):
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if not SPLIT:
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)
            acc += bias.to(tl.float32)[None, :]
        ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # y is the float32 partials buffer [split_k, M, N]; the wrapper sums it and adds bias.
        ptrs = y_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ptrs, acc, mask=mask)


@triton.jit
def _int8_matmul_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_ym,
    stride_yn,
    split_k,
    GROUP_SIZE: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    dtype = x_ptr.dtype.element_ty

    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, split_k)
    kt_start = pid_k * tiles_per_split
    kt_end = tl.minimum(kt_start + tiles_per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt_start, kt_end):
        k = kt * BLOCK_K + offs_k
        k_mask = k < K
        x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(w_rows + k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0)
        part = tl.dot(x, tl.trans(q.to(dtype)), input_precision=PRECISION)
        if PER_CHANNEL:
            acc += part
        else:
            group = (kt * BLOCK_K) // GROUP_SIZE
            s = tl.load(scale_ptr + offs_n * stride_sn + group, mask=n_mask, other=0.0)
            acc += part * s.to(tl.float32)[None, :]
    if PER_CHANNEL:
        s = tl.load(scale_ptr + offs_n * stride_sn, mask=n_mask, other=0.0)
        acc = acc * s.to(tl.float32)[None, :]
    _store_tile(
        acc, y_ptr, bias_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn, pid_k, HAS_BIAS, SPLIT
    )


@triton.jit
def _int4_matmul_kernel(
    x_ptr,
    w_ptr,
    scale_ptr,
    zero_ptr,
    bias_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_sn,
    stride_zn,
    stride_ym,
    stride_yn,
    split_k,
    GROUP_SIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    HALF_K: tl.constexpr = BLOCK_K // 2
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, HALF_K)  # byte j of a tile holds k = 2j (low) and 2j + 1 (high)
    m_mask = offs_m < M
    n_mask = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    dtype = x_ptr.dtype.element_ty

    # K is a multiple of GROUP_SIZE, itself a multiple of BLOCK_K: no tile is ragged along K.
    k_tiles = K // BLOCK_K
    tiles_per_split = tl.cdiv(k_tiles, split_k)
    kt_start = pid_k * tiles_per_split
    kt_end = tl.minimum(kt_start + tiles_per_split, k_tiles)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(kt_start, kt_end):
        k_even = kt * BLOCK_K + 2 * offs_b
        x_mask = m_mask[:, None]
        x_even = tl.load(x_rows + k_even[None, :], mask=x_mask, other=0.0)
        x_odd = tl.load(x_rows + (k_even + 1)[None, :], mask=x_mask, other=0.0)
        b = tl.load(w_rows + (kt * HALF_K + offs_b)[None, :], mask=n_mask[:, None], other=0)
        q_lo = (b & 0xF).to(dtype)
        q_hi = (b >> 4).to(dtype)
        part = tl.dot(x_even, tl.trans(q_lo), input_precision=PRECISION)
        part = tl.dot(x_odd, tl.trans(q_hi), acc=part, input_precision=PRECISION)
        x_sum = tl.sum(x_even.to(tl.float32), axis=1) + tl.sum(x_odd.to(tl.float32), axis=1)
        group = (kt * BLOCK_K) // GROUP_SIZE
        s = tl.load(scale_ptr + offs_n * stride_sn + group, mask=n_mask, other=0.0)
        z = tl.load(zero_ptr + offs_n * stride_zn + group, mask=n_mask, other=0.0)
        acc += part * s.to(tl.float32)[None, :] + x_sum[:, None] * z.to(tl.float32)[None, :]
    _store_tile(
        acc, y_ptr, bias_ptr, offs_m, offs_n, M, N, stride_ym, stride_yn, pid_k, HAS_BIAS, SPLIT
    )


# ---- launch configuration ----------------------------------------------------------------------
def _block_k(group_size: int, cap: int) -> int:
    """The largest power of two <= cap dividing group_size (a multiple of 32 here, so at least
    32): a K tile then sits in one group."""
    b = cap
    while group_size % b:
        b //= 2
    return b


def _config(M: int, group_size: int) -> dict[str, int]:
    """Tile sizes and warps for the problem; plain heuristics, no autotuning (the interpreter
    would run every candidate, and three shapes of problem cover the engine's uses)."""
    if M <= SMALL_M:
        cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": _block_k(group_size, 128), "num_warps": 4}
    elif M <= 64:
        cfg = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": _block_k(group_size, 64), "num_warps": 4}
    else:
        cfg = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": _block_k(group_size, 64), "num_warps": 8}
    cfg["num_stages"] = 3
    return cfg


def _split_k(M: int, N: int, K: int, cfg: dict[str, int], device: torch.device) -> int:
    """For decode, enough K slices that the grid has ~2 programs per SM, each still walking at
    least 4 K tiles (fewer would spend more on the partials than they save)."""
    if M > SMALL_M:
        return 1
    tiles = triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(N, cfg["BLOCK_N"])
    k_tiles = triton.cdiv(K, cfg["BLOCK_K"])
    # Without CUDA (the interpreter) one SM: no split unless a test asks for it.
    want = triton.cdiv(2 * (sm_count(device) or 1), tiles)
    return max(1, min(want, k_tiles // 4))


def _launch(
    kernel,
    x: torch.Tensor,
    tensors: tuple[torch.Tensor, ...],
    strides: tuple[int, ...],
    N: int,
    group_size: int,
    bias: torch.Tensor | None,
    split_k: int | None,
    **constexprs,
) -> torch.Tensor:
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    K = x.shape[-1]
    lead = x.shape[:-1]
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    M = x2.shape[0]
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({N},)")
        bias = bias.contiguous()
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y.view(*lead, N)
    cfg = _config(M, group_size)
    k_tiles = triton.cdiv(K, cfg["BLOCK_K"])
    split = _split_k(M, N, K, cfg, x.device) if split_k is None else split_k
    split = max(1, min(split, k_tiles))
    split = triton.cdiv(k_tiles, triton.cdiv(k_tiles, split))  # drop slices left without tiles
    out = y if split == 1 else torch.empty((split, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(N, cfg["BLOCK_N"]), split)
    kernel[grid](
        x2,
        *tensors,
        bias if bias is not None else x2,  # a placeholder pointer, never read without HAS_BIAS
        out,
        M,
        N,
        K,
        x2.stride(0),
        *strides,
        y.stride(0),
        y.stride(1),
        split,  # a runtime value: the slice count varies with N, and need not recompile
        GROUP_SIZE=group_size,
        HAS_BIAS=bias is not None,
        SPLIT=split > 1,
        PRECISION="ieee" if x.dtype == torch.float32 else None,  # None: the default
        **constexprs,
        **cfg,
    )
    if split > 1:
        acc = out.sum(0)
        if bias is not None:
            acc += bias.float()
        y.copy_(acc)
    return y.view(*lead, N)


def _check_group(K: int, group_size: int) -> None:
    if group_size <= 0 or K % group_size:
        raise ValueError(f"group size {group_size} must divide in_features {K}")
    if group_size % GROUP_MULTIPLE:
        raise ValueError(
            f"group size {group_size} is not a multiple of {GROUP_MULTIPLE}: the Triton kernel "
            f"needs K tiles of at least {GROUP_MULTIPLE} that stay within one group"
        )


# ---- public API -------------------------------------------------------------------------------
def int8_matmul(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """x [..., K] @ (qweight int8 [N, K] * scale [N, groups])^T (+ bias), in x's dtype.

    groups == 1 is per output channel (any K); otherwise per group of K / groups, which must be a
    multiple of 32. `split_k` overrides the heuristic (tests; None on the hot path)."""
    N, K = qweight.shape
    if qweight.dtype != torch.int8:
        raise ValueError(f"qweight must be int8, got {qweight.dtype}")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {K}")
    if scale.dim() != 2 or scale.shape[0] != N or K % scale.shape[1]:
        raise ValueError(f"scale shape {tuple(scale.shape)} does not fit a weight of {N} x {K}")
    groups = scale.shape[1]
    per_channel = groups == 1
    group_size = K // groups
    if not per_channel:
        _check_group(K, group_size)
    qweight = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    scale = scale if scale.stride(-1) == 1 else scale.contiguous()
    return _launch(
        _int8_matmul_kernel,
        x,
        (qweight, scale),
        (qweight.stride(0), scale.stride(0)),
        N,
        # Per channel, any power-of-two K tile will do (the K tail is masked).
        128 if per_channel else group_size,
        bias,
        split_k,
        PER_CHANNEL=per_channel,
    )


def int4_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """x [..., K] @ W^T (+ bias) in x's dtype, W[n, k] = q[n, k] * scale[n, g] + zero[n, g] with
    g = k // group_size; q from `packed` uint8 [N, K / 2] (pack_int4's layout).

    scale and zero (the group minimum) are [N, K / group_size], float32 or float16 (Int4Linear
    keeps float16). group_size must divide K and be a multiple of 32. `split_k` overrides the
    heuristic (tests; None on the hot path)."""
    N, half_k = packed.shape
    K = 2 * half_k
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed must be uint8, got {packed.dtype}")
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, the packed weight {K}")
    _check_group(K, group_size)
    groups = K // group_size
    for name, t in (("scale", scale), ("zero", zero)):
        if tuple(t.shape) != (N, groups):
            raise ValueError(f"{name} shape {tuple(t.shape)} != ({N}, {groups})")
    packed = packed if packed.stride(-1) == 1 else packed.contiguous()
    scale = scale if scale.stride(-1) == 1 else scale.contiguous()
    zero = zero if zero.stride(-1) == 1 else zero.contiguous()
    return _launch(
        _int4_matmul_kernel,
        x,
        (packed, scale, zero),
        (packed.stride(0), scale.stride(0), zero.stride(0)),
        N,
        group_size,
        bias,
        split_k,
    )
