"""Neox-style rotary embedding (rotate halves) as one Triton kernel over q and k, in place.

Numerics follow `models.llama.RotaryEmbedding.forward`: the angles are float32 `position *
inv_freq`, cos and sin are rounded to q's dtype, and each output is `x * cos + rotate_half(x) *
sin` evaluated in q's dtype. The angles come from a table built once (`build_cos_sin_cache`) with
the same float32 product, so a table lookup gives the very cos/sin the reference computes.

One program per token rotates all of that token's q heads and then its k heads: the token's cos
and sin row is loaded once for both. Head dims that are not a power of two (80) are padded to the
next one and masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def build_cos_sin_cache(
    inv_freq: torch.Tensor, max_positions: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """[max_positions, rotary_dim]: cos of the rotary_dim / 2 angles, then their sin.

    Float32 by default; a cache in the model dtype holds exactly the values the kernel would round
    to anyway (the reference casts cos/sin to q's dtype) and halves the bytes read."""
    positions = torch.arange(max_positions, device=inv_freq.device).float()
    freqs = positions[:, None] * inv_freq.float()[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(dtype).contiguous()


@triton.jit
def _rotate_heads(
    ptr,
    stride_t,
    stride_h,
    token,
    num_heads,
    cos,
    sin,
    offs_d,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    base = ptr + token * stride_t
    for h0 in range(0, num_heads, BLOCK_H):
        heads = h0 + offs_h
        mask = (heads[:, None] < num_heads) & (offs_d[None, :] < HALF)
        p1 = base + heads[:, None] * stride_h + offs_d[None, :]
        x1 = tl.load(p1, mask=mask, other=0.0)
        x2 = tl.load(p1 + HALF, mask=mask, other=0.0)
        # rotate_half(x) = cat(-x2, x1); (-x2) * sin == -(x2 * sin) exactly, so this is the
        # reference's arithmetic, rounding for rounding.
        tl.store(p1, x1 * cos - x2 * sin, mask=mask)
        tl.store(p1 + HALF, x2 * cos + x1 * sin, mask=mask)


@triton.jit
def _rotary_kernel(
    pos_ptr,
    q_ptr,
    k_ptr,
    cache_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cache,
    num_q_heads,
    num_k_heads,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < HALF
    row = cache_ptr + pos * stride_cache + offs_d
    dtype = q_ptr.dtype.element_ty
    cos = tl.load(row, mask=dmask, other=0.0).to(dtype)[None, :]
    sin = tl.load(row + HALF, mask=dmask, other=0.0).to(dtype)[None, :]
    _rotate_heads(
        q_ptr, stride_qt, stride_qh, token, num_q_heads, cos, sin, offs_d, HALF, BLOCK_H, BLOCK_D
    )
    _rotate_heads(
        k_ptr, stride_kt, stride_kh, token, num_k_heads, cos, sin, offs_d, HALF, BLOCK_H, BLOCK_D
    )


def apply_rotary(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q [tokens, heads, head_dim] and k [tokens, kv_heads, head_dim] IN PLACE and return
    them. They may be strided views (e.g. slices of a fused qkv output: only v's part of that
    buffer is left alone); the last dim must be contiguous.

    positions: [tokens], any integer dtype, each < cos_sin_cache.shape[0]; the cache's width must
    be head_dim (the whole head rotates, as in every supported model)."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q and k must be [tokens, heads, head_dim], got {q.shape}, {k.shape}")
    tokens, num_q_heads, head_dim = q.shape
    if k.shape[0] != tokens or k.shape[2] != head_dim or positions.shape != (tokens,):
        raise ValueError(f"shapes disagree: positions {positions.shape}, q {q.shape}, k {k.shape}")
    if q.dtype != k.dtype:
        raise ValueError(f"q is {q.dtype} but k is {k.dtype}")
    if head_dim % 2 or cos_sin_cache.shape[-1] != head_dim:
        raise ValueError(
            f"cos_sin_cache width {cos_sin_cache.shape[-1]} must equal an even head_dim {head_dim}"
        )
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("q, k and cos_sin_cache need a contiguous last dim")
    if tokens == 0:
        return q, k
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    # Enough heads per step to keep a warp's worth of lanes busy without spilling registers.
    block_h = min(triton.next_power_of_2(max(num_q_heads, k.shape[1])), max(2048 // block_d, 1))
    _rotary_kernel[(tokens,)](
        positions,
        q,
        k,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        num_q_heads,
        k.shape[1],
        HALF=half,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
    )
    return q, k
