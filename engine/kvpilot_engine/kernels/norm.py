"""RMSNorm as one Triton kernel, optionally fused with the residual add before it.

Numerics follow `models.llama.RMSNorm` (and transformers): the row is normalised in float32, cast
back to the input dtype, and only then multiplied by the weight, in the weight's and input's
promoted dtype. The fused form is vLLM's `fused_add_rms_norm`: r = x + residual (rounded to x's
dtype, as `hidden + attn_out` is), then (rms_norm(r), r).

One program per row; a row of up to 8192 values is loaded whole (block = next power of two of the
hidden size, the tail masked), so the sum of squares is one in-register reduction.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_HIDDEN = 8192


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    stride_out,
    stride_res_out,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        # The add rounds to x's dtype before the norm sees it, like the unfused `hidden + out`.
        x = x + tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        tl.store(res_out_ptr + row * stride_res_out + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    # Masked lanes are zero, so they add nothing; divide by the true width, not the block.
    mean_sq = tl.sum(x32 * x32, axis=0) / hidden
    normed = (x32 * tl.rsqrt(mean_sq + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + row * stride_out + cols, w.to(out_ty) * normed.to(out_ty), mask=mask)


def _rows(t: torch.Tensor, hidden: int) -> torch.Tensor:
    """A 2-D view [rows, hidden] with a contiguous last dim (copies only when it must)."""
    t2 = t.reshape(-1, hidden)
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """weight * normalize(x) over the last dim; with `residual`, (rms_norm(x + residual), x +
    residual).

    x may have any leading dims (e.g. [tokens, heads, head_dim] for Qwen3's q/k norm). Nothing is
    written in place: the outputs are new tensors, so callers may keep using x and residual. The
    output dtype is torch's promotion of weight and x (x's dtype when the model is cast whole);
    the new residual has x's dtype.
    """
    hidden = x.shape[-1]
    if weight.shape != (hidden,):
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden {hidden}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"rms_norm handles rows of up to {MAX_HIDDEN} values, got {hidden}")
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    x2 = _rows(x, hidden)
    rows = x2.shape[0]
    out = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    out2 = out.view(rows, hidden)
    if residual is not None:
        res2 = _rows(residual.to(x.dtype), hidden)
        res_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        res_out2 = res_out.view(rows, hidden)
    else:
        # Never read (HAS_RESIDUAL is a compile-time False); any tensor fills the slots.
        res2, res_out2 = x2, x2
    if rows == 0:
        return out if residual is None else (out, res_out)
    block = triton.next_power_of_2(hidden)
    # Wider rows get more warps so each thread keeps a handful of values in registers.
    num_warps = min(max(block // 256, 1), 16)
    _rms_norm_kernel[(rows,)](
        x2,
        res2,
        weight,
        out2,
        res_out2,
        x2.stride(0),
        res2.stride(0),
        out2.stride(0),
        res_out2.stride(0),
        hidden,
        eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out if residual is None else (out, res_out)
