"""The Triton kernels (RMSNorm, rotary, int8/int4 weight-only matmuls) against their PyTorch
references.

Without a GPU they run in Triton's interpreter on CPU tensors (tests/conftest.py switches it on
before anything imports Triton). The interpreter computes
bfloat16 dot products wrongly, so it tests float32 and float16 only; the bfloat16 test needs CUDA.
Shapes are kept moderate: the interpreter executes every program of the grid in Python.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kvpilot_engine.config import ModelConfig
from kvpilot_engine.kernels import norm
from kvpilot_engine.kernels.norm import rms_norm
from kvpilot_engine.kernels.quant_matmul import int4_matmul, int8_matmul
from kvpilot_engine.kernels.rotary import apply_rotary, build_cos_sin_cache
from kvpilot_engine.models.llama import RMSNorm, RotaryEmbedding
from kvpilot_engine.quantization import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    dequantize_int8,
    pack_int4,
    quantize_int4,
    quantize_int8,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# triton.jit picks compiled or interpreted when a kernel module is first imported: one imported
# earlier in the session (before the switch) cannot run on CPU tensors. Say so plainly.
if DEVICE == "cpu" and type(norm._rms_norm_kernel).__name__ != "InterpretedFunction":
    raise RuntimeError(
        "kvpilot_engine.kernels was imported before TRITON_INTERPRET=1 was set; set it earlier "
        "(tests/conftest.py) when there is no GPU"
    )
DTYPES = [torch.float32, torch.float16]
# Error allowed relative to the output's largest magnitude: float16 outputs round at ~5e-4.
REL_TOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 2e-2}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- RMSNorm ----------------------------------------------------------------------------------
def _ref_norm(hidden: int, weight: torch.Tensor, eps: float) -> RMSNorm:
    norm = RMSNorm(hidden, eps).to(DEVICE, weight.dtype)
    with torch.no_grad():
        norm.weight.copy_(weight)
    return norm


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [576, 960, 1024])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_rms_norm(tokens, hidden, dtype):
    g = _gen(tokens * hidden)
    x = (torch.randn(tokens, hidden, generator=g) * 3).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    residual = torch.randn(tokens, hidden, generator=g).to(DEVICE, dtype)
    x_before, res_before = x.clone(), residual.clone()
    ref = _ref_norm(hidden, weight, 1e-5)

    with torch.no_grad():
        out = rms_norm(x, weight, 1e-5)
        assert out.dtype == dtype and out.shape == x.shape
        assert _rel_err(out, ref(x)) <= REL_TOL[dtype]

        out, new_res = rms_norm(x, weight, 1e-5, residual=residual)
        summed = x + residual
        torch.testing.assert_close(new_res, summed, rtol=0, atol=0)  # same rounding as `x + r`
        assert _rel_err(out, ref(summed)) <= REL_TOL[dtype]
    # Documented as out of place.
    assert torch.equal(x, x_before) and torch.equal(residual, res_before)


def test_rms_norm_leading_dims():
    """Qwen3's q/k norm: [tokens, heads, head_dim] with a per-head weight; a strided slice too."""
    g = _gen(1)
    qkv = torch.randn(5, 3 * 4 * 64, generator=g).to(DEVICE)
    q = qkv[:, : 4 * 64].view(5, 4, 64)
    weight = torch.randn(64, generator=g).to(DEVICE)
    out = rms_norm(q, weight, 1e-6)
    assert out.shape == q.shape
    assert _rel_err(out, _ref_norm(64, weight, 1e-6)(q).detach()) <= REL_TOL[torch.float32]


# ---- rotary -----------------------------------------------------------------------------------
def _config(head_dim: int, num_heads: int, num_kv_heads: int) -> ModelConfig:
    return ModelConfig(
        architecture="llama",
        vocab_size=128,
        hidden_size=num_heads * head_dim,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_theta=100000.0,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80, 128])
def test_rotary_matches_reference(head_dim, dtype):
    heads, kv_heads, tokens = 9, 3, 17
    rotary = RotaryEmbedding(_config(head_dim, heads, kv_heads))
    g = _gen(head_dim)
    positions = torch.randint(0, 4096, (tokens,), generator=g).to(DEVICE)
    # Like the model: q, k, v are views into one fused qkv output.
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(DEVICE, dtype)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q = q.view(tokens, heads, head_dim)
    k = k.view(tokens, kv_heads, head_dim)
    v_before = v.clone()
    ref_q, ref_k = rotary(positions, q.clone(), k.clone())

    cache = build_cos_sin_cache(rotary.inv_freq(torch.device(DEVICE)), 4096, torch.float32)
    assert cache.shape == (4096, head_dim) and cache.dtype == torch.float32
    out_q, out_k = apply_rotary(positions, q, k, cache)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()  # in place
    # The kernel repeats the reference's roundings; only ulps (a fused multiply-add) may differ.
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-3, "atol": 2e-3}
    torch.testing.assert_close(out_q, ref_q, **tol)
    torch.testing.assert_close(out_k, ref_k, **tol)
    assert torch.equal(v, v_before)


def test_rotary_cache_in_model_dtype():
    """A float16 cache holds what the kernel would round float32 cos/sin to: same result."""
    rotary = RotaryEmbedding(_config(64, 4, 2))
    g = _gen(2)
    positions = torch.randint(0, 2048, (6,), generator=g).to(DEVICE)
    q = torch.randn(6, 4, 64, generator=g).to(DEVICE, torch.float16)
    k = torch.randn(6, 2, 64, generator=g).to(DEVICE, torch.float16)
    inv_freq = rotary.inv_freq(torch.device(DEVICE))
    q32, k32 = apply_rotary(positions, q.clone(), k.clone(), build_cos_sin_cache(inv_freq, 2048))
    q16, k16 = apply_rotary(
        positions, q.clone(), k.clone(), build_cos_sin_cache(inv_freq, 2048, torch.float16)
    )
    assert torch.equal(q32, q16) and torch.equal(k32, k16)


# ---- int8 matmul ------------------------------------------------------------------------------
# N = 328 is not a multiple of the 64-wide output tile, and per channel K = 576 is not a multiple
# of the 128-wide K tile, so both edges run masked.
K, N = 576, 328


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_matmul(group_size, m, dtype):
    g = _gen(m)
    w = torch.randn(N, K, generator=g) * 0.05
    qweight, scale = quantize_int8(w, group_size)
    bias = torch.randn(N, generator=g)
    x = torch.randn(m, K, generator=g)
    deq = dequantize_int8(qweight, scale)
    qweight, scale = qweight.to(DEVICE), scale.to(DEVICE)
    xd = x.to(DEVICE, dtype)
    for b in (None, bias):
        ref = F.linear(xd.float().cpu(), deq, b)
        out = int8_matmul(xd, qweight, scale, None if b is None else b.to(DEVICE, dtype))
        assert out.dtype == dtype and out.shape == (m, N)
        assert _rel_err(out.cpu(), ref) <= REL_TOL[dtype], (b is not None, _rel_err(out.cpu(), ref))


@pytest.mark.parametrize("split_k", [1, 3])
def test_int8_matmul_split_k(split_k):
    """Forcing split-K (the decode path on a GPU; the interpreter's heuristic picks 1)."""
    g = _gen(3)
    qweight, scale = quantize_int8(torch.randn(N, K, generator=g), 32)
    x, bias = torch.randn(2, K, generator=g), torch.randn(N, generator=g)
    ref = F.linear(x, dequantize_int8(qweight, scale), bias)
    dev = [t.to(DEVICE) for t in (x, qweight, scale, bias)]
    out = int8_matmul(*dev, split_k=split_k)
    assert _rel_err(out.cpu(), ref) <= REL_TOL[torch.float32]


def test_int8_matmul_module_buffers():
    """Int8Linear's own buffers (as the wiring will pass them), leading dims kept."""
    g = _gen(4)
    lin = Int8Linear(torch.randn(N, K, generator=g), torch.randn(N, generator=g)).to(DEVICE)
    x = torch.randn(2, 3, K, generator=g).to(DEVICE)
    out = int8_matmul(x, lin.qweight, lin.scale, lin.bias)
    assert out.shape == (2, 3, N)
    ref = F.linear(x, lin.dequantize(), lin.bias)
    assert _rel_err(out, ref.detach()) <= REL_TOL[torch.float32]


# ---- int4 matmul ------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 33])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_matmul(group_size, m, dtype):
    k = 768  # a multiple of every group size tested
    g = _gen(group_size + m)
    w = torch.randn(N, k, generator=g) * 0.05
    q, scale, lo = quantize_int4(w, group_size)
    bias = torch.randn(N, generator=g) if m != 5 else None
    x = torch.randn(m, k, generator=g)
    ref = F.linear(x, dequantize_int4(q, scale, lo), bias)
    dev = [t.to(DEVICE) for t in (pack_int4(q), scale, lo)]
    xd = x.to(DEVICE, dtype)
    out = int4_matmul(xd, *dev, group_size, None if bias is None else bias.to(DEVICE, dtype))
    assert out.dtype == dtype and out.shape == (m, N)
    assert _rel_err(out.cpu(), ref) <= REL_TOL[dtype]


@pytest.mark.parametrize("split_k", [1, 4])
def test_int4_matmul_split_k(split_k):
    g = _gen(5)
    q, scale, lo = quantize_int4(torch.randn(N, K, generator=g), 32)
    x, bias = torch.randn(3, K, generator=g), torch.randn(N, generator=g)
    ref = F.linear(x, dequantize_int4(q, scale, lo), bias)
    dev = [t.to(DEVICE) for t in (pack_int4(q), scale, lo)]
    out = int4_matmul(x.to(DEVICE), *dev, 32, bias.to(DEVICE), split_k=split_k)
    assert _rel_err(out.cpu(), ref) <= REL_TOL[torch.float32]


def test_int4_matmul_module_buffers():
    """Int4Linear keeps pack_int4's layout with float16 scale and min when the CPU kernel does
    not apply (here: out_features not a multiple of 64)."""
    g = _gen(6)
    lin = Int4Linear(torch.randn(N, K, generator=g), torch.randn(N, generator=g), 64)
    assert lin.kernel == "reference" and lin.scale.dtype == torch.float16
    lin = lin.to(DEVICE)
    x = torch.randn(4, K, generator=g).to(DEVICE)
    out = int4_matmul(x, lin.qweight, lin.scale, lin.lo, lin.group_size, lin.bias)
    assert _rel_err(out, lin(x).detach()) <= REL_TOL[torch.float32]


@pytest.mark.parametrize(
    ("group_size", "match"),
    [(48, "not a multiple of 32"), (16, "not a multiple of 32"), (256, "must divide")],
)
def test_int4_matmul_bad_group_size(group_size, match):
    packed = torch.zeros(64, K // 2, dtype=torch.uint8, device=DEVICE)
    groups = max(K // group_size, 1)
    scale = torch.ones(64, groups, device=DEVICE)
    x = torch.randn(1, K, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        int4_matmul(x, packed, scale, scale, group_size)


def test_int8_matmul_bad_group_size():
    qweight = torch.zeros(64, K, dtype=torch.int8, device=DEVICE)
    scale = torch.ones(64, K // 48, device=DEVICE)  # groups of 48
    with pytest.raises(ValueError, match="not a multiple of 32"):
        int8_matmul(torch.randn(1, K, device=DEVICE), qweight, scale)


# ---- bfloat16 on a GPU ------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 200])
def test_bfloat16_kernels_gpu(m):
    dtype = torch.bfloat16
    g = _gen(7)
    k, n = 2048, 4096  # big enough for split-K to engage at decode sizes
    w = torch.randn(n, k, generator=g) * 0.05
    bias = torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    ref_x = x.float().cpu()

    q8, s8 = quantize_int8(w)
    out = int8_matmul(x, q8.cuda(), s8.cuda(), bias.to("cuda", dtype))
    ref = F.linear(ref_x, dequantize_int8(q8, s8), bias.to(dtype).float())
    assert out.dtype == dtype and _rel_err(out.cpu(), ref) <= REL_TOL[dtype]

    q8, s8 = quantize_int8(w, 32)
    out = int8_matmul(x, q8.cuda(), s8.cuda())
    assert _rel_err(out.cpu(), F.linear(ref_x, dequantize_int8(q8, s8))) <= REL_TOL[dtype]

    q4, s4, lo = quantize_int4(w, 128)
    out = int4_matmul(x, pack_int4(q4).cuda(), s4.cuda(), lo.cuda(), 128)
    assert _rel_err(out.cpu(), F.linear(ref_x, dequantize_int4(q4, s4, lo))) <= REL_TOL[dtype]

    weight = (1 + 0.1 * torch.randn(k, generator=g)).to("cuda", dtype)
    residual = torch.randn(m, k, generator=g).to("cuda", dtype)
    ref_norm = _ref_norm(k, weight, 1e-6)
    with torch.no_grad():
        out, new_res = rms_norm(x, weight, 1e-6, residual)
        assert torch.equal(new_res, x + residual)
        assert _rel_err(out, ref_norm(x + residual)) <= REL_TOL[dtype]
        assert _rel_err(rms_norm(x, weight, 1e-6), ref_norm(x)) <= REL_TOL[dtype]
