"""Weight quantization: int8 and int4 weight-only, fp8 (e4m3), and GGUF's own grids kept.

Formats (W is [out_features, in_features]; groups run along in_features):

- int8: q = round(W / s), s per output channel (`group_size` None) or per group (GGUF Q8_0, 32).
- int4: asymmetric, W ~ q * s + m with q in 0..15, s and m per group (128 by default; GGUF Q4_0
  and Q4_1 use 32, Q4_0 being m = -8 s).
- fp8: W ~ e4m3(W / s) * s, s per output channel.

Each format has a PyTorch reference (`dequantize` + `F.linear`), the oracle of every fast path.
Fast paths: on CPU, PyTorch's weight-only kernels `_weight_int8pack_mm` (per-channel int8) and
`_weight_int4pack_mm_for_cpu` (group-wise int4); on CUDA the Triton dequantize-in-the-matmul
kernels of kernels/quant_matmul.py (int8, int4 with groups a multiple of 32), and `_scaled_mm`
for fp8 on Hopper/Ada. Elsewhere the reference runs (correct, not fast).

Quantization happens on load, after the float checkpoint is in place (peak memory is the float
model). The token embedding is int8 per row in every mode: a row gather stays cheap, and a tied
output layer (rows = output channels) shares the same storage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kvpilot_engine.attention import use_triton

DEFAULT_INT4_GROUP = 128
# GGUF tensor types kept on their own grid: type id -> (method, group size).
GGUF_KEPT = {8: ("int8", 32), 2: ("int4", 32), 3: ("int4", 32)}  # Q8_0, Q4_0, Q4_1
GGUF_FLOAT_TYPES = {0, 1, 30}  # F32, F16, BF16: every other GGUF type is a quantized grid
# int4 groups for a checkpoint that is already quantized: every GGUF grid (Q4_0..Q8_0 blocks, the
# K-quants' sub-blocks) is 32 wide or divides 32, so 32-wide groups never straddle two of its
# scales. At 128 a second, misaligned grid lands on the first (+31.9% perplexity on SmolLM2's
# Q4_1 file against +0.03% at 32: docs/benchmarks.md).
QUANTIZED_SOURCE_INT4_GROUP = 32
FP8_MAX = 448.0  # largest finite float8_e4m3fn
_INT4_KERNEL_GROUPS = (32, 64, 128, 256)


class QuantizationError(ValueError):
    pass


def default_int4_group(quant_types: dict[str, int]) -> tuple[int, str]:
    """The int4 group size when the user sets none, and why: the source's grid when the
    checkpoint's linear weights are already quantized, else DEFAULT_INT4_GROUP."""
    linear = [t for name, t in quant_types.items() if ".layers." in name]
    quantized = [t for t in linear if t not in GGUF_FLOAT_TYPES]
    if quantized:
        return (
            QUANTIZED_SOURCE_INT4_GROUP,
            f"the checkpoint's weights are already quantized ({len(quantized)} of {len(linear)} "
            f"layer tensors on GGUF grids): int4 keeps {QUANTIZED_SOURCE_INT4_GROUP}-wide groups "
            "aligned with them",
        )
    return DEFAULT_INT4_GROUP, "float checkpoint"


def int4_group_size(in_features: int, wanted: int) -> int:
    """`wanted` when it divides the row, else the largest power-of-two divisor of both (576 with
    128 gives 64): groups never straddle rows."""
    if in_features % wanted == 0:
        return wanted
    g = math.gcd(in_features, wanted)
    if g < 2:
        raise QuantizationError(f"in_features {in_features} has no int4 group size <= {wanted}")
    return g


# ---- quantize / dequantize (the reference) ----------------------------------------------------
def quantize_int8(w: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, ...]:
    """(q int8 [out, in], scale float32 [out, groups])."""
    out_f, in_f = w.shape
    g = group_size or in_f
    wg = w.float().view(out_f, in_f // g, g)
    scale = (wg.abs().amax(-1) / 127).clamp(min=1e-12)
    q = torch.round(wg / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(out_f, in_f), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out_f, in_f = q.shape
    groups = scale.shape[-1]
    return (q.float().view(out_f, groups, in_f // groups) * scale[..., None]).view(out_f, in_f)


# Range shrink factors tried per group end (clipping a rare outlier buys finer steps for the rest).
INT4_CLIP_GRID = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8)


def _int4_grid(wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, ...]:
    scale = ((hi - lo) / 15).clamp(min=1e-12)
    q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15)
    err = (q * scale[..., None] + lo[..., None] - wg).pow(2).sum(-1)
    return q, scale, err


def quantize_int4(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
    """(q uint8 [out, in] with values 0..15, scale [out, groups], min [out, groups]).

    Min/max per group, then a per-group search over clipping each end (first the low, then the
    high) for the least squared error; a group already on a 16-level grid (a GGUF Q4 block) keeps
    its exact min/max."""
    out_f, in_f = w.shape
    wg = w.float().view(out_f, in_f // group_size, group_size)
    lo0, hi0 = wg.amin(-1), wg.amax(-1)
    lo, hi = lo0, hi0
    _, _, best = _int4_grid(wg, lo, hi)
    for end in ("lo", "hi"):
        for f in INT4_CLIP_GRID[1:]:
            c_lo, c_hi = (lo0 * f, hi) if end == "lo" else (lo, hi0 * f)
            _, _, err = _int4_grid(wg, c_lo, c_hi)
            better = err < best
            best = torch.where(better, err, best)
            lo, hi = torch.where(better, c_lo, lo), torch.where(better, c_hi, hi)
    q, scale, _ = _int4_grid(wg, lo, hi)
    return q.to(torch.uint8).view(out_f, in_f), scale, lo


def dequantize_int4(q: torch.Tensor, scale: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    out_f, in_f = q.shape
    groups = scale.shape[-1]
    qg = q.float().view(out_f, groups, in_f // groups)
    return (qg * scale[..., None] + lo[..., None]).view(out_f, in_f)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Two values per byte, even column in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    out = torch.empty(packed.shape[0], packed.shape[1] * 2, dtype=torch.uint8, device=packed.device)
    out[:, 0::2] = packed & 0xF
    out[:, 1::2] = packed >> 4
    return out


def pack_int4_cpu(q: torch.Tensor) -> torch.Tensor:
    """The layout of PyTorch's CPU int4 kernel (`_convert_weight_to_int4pack_for_cpu`, inner k
    tiles 1): rows in blocks of 64; in a block, byte (k, j) holds rows j and j + 32 of column k
    in its low and high nibbles. Written out so it can be unpacked (a test checks it against the
    PyTorch conversion)."""
    n, k = q.shape
    b = q.to(torch.uint8).view(n // 64, 2, 32, k).permute(0, 3, 2, 1)
    return (b[..., 0] | (b[..., 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4_cpu(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    b = packed.view(n // 64, half * 2, 32)
    out = torch.stack([b & 0xF, b >> 4], dim=-1)  # nb, k, j, nibble
    return out.permute(0, 3, 2, 1).reshape(n, half * 2)


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 [out, in], scale float32 [out, 1])."""
    scale = (w.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.float() * scale


# ---- modules ----------------------------------------------------------------------------------
# The CPU weight-only kernels are matrix-vector kernels: fast for a decode batch, far slower than
# dequantize-then-matmul for a prefill's hundreds of rows (measured: ~20x at 1024 rows).
KERNEL_MAX_ROWS = 16


def _small_batch(x: torch.Tensor) -> bool:
    rows = x.numel() // x.shape[-1]
    return rows <= KERNEL_MAX_ROWS and x.dtype in (torch.float32, torch.bfloat16)


class QuantLinear(nn.Module):
    """A linear layer over a quantized weight. `weight` is not a Parameter: the float weight is
    gone after quantization; `dequantize()` rebuilds it (tests, the reference path)."""

    def __init__(self, method: str, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.method, self.in_features, self.out_features = method, in_features, out_features
        self.bias = nn.Parameter(bias, requires_grad=False) if bias is not None else None
        self.kernel = "reference"

    def dequantize(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize().to(x.dtype), self._bias(x))

    def _bias(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.method}, in={self.in_features}, out={self.out_features}, {self.kernel}"


class Int8Linear(QuantLinear):
    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, group_size: int | None = None):
        super().__init__("int8", w.shape[1], w.shape[0], bias)
        q, scale = quantize_int8(w, group_size)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        if w.device.type == "cuda":
            self.kernel = "triton"
        elif scale.shape[1] == 1:
            self.kernel = "int8pack"
            self.register_buffer("scale_flat", scale[:, 0].contiguous())

    def dequantize(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x.device):
            from kvpilot_engine.kernels.quant_matmul import int8_matmul

            return int8_matmul(x, self.qweight, self.scale, self._bias(x))
        if self.kernel == "int8pack" and _small_batch(x):
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), self.qweight,
                                          self.scale_flat.to(x.dtype))  # fmt: skip
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self._bias(x)
        return super().forward(x)

    def embed(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows of the weight, for an embedding that shares it."""
        return dequantize_int8(self.qweight[ids], self.scale[ids]).to(dtype)


class Int4Linear(QuantLinear):
    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None, group_size: int):
        super().__init__("int4", w.shape[1], w.shape[0], bias)
        if w.shape[1] % 2:
            raise QuantizationError(f"int4 needs an even in_features, got {w.shape[1]}")
        self.group_size = group_size
        q, scale, lo = quantize_int4(w, group_size)
        cpu_kernel = w.device.type == "cpu" and group_size in _INT4_KERNEL_GROUPS
        if cpu_kernel and w.shape[0] % 64 == 0:
            # The kernel's layout, and its dequantisation (q - 8) * s + z, so z = m + 8 s.
            self.kernel = "int4pack"
            self.register_buffer("qweight", pack_int4_cpu(q))
            # float16, as GGUF stores them: a quarter of the int4 payload instead of half.
            sz = torch.stack([scale.t(), (lo + 8 * scale).t()], dim=-1).to(torch.float16)
            self.register_buffer("scales_and_zeros", sz.contiguous())
        else:
            self.register_buffer("qweight", pack_int4(q))
            self.register_buffer("scale", scale.to(torch.float16))
            self.register_buffer("lo", lo.to(torch.float16))
            if group_size % 32 == 0 and use_triton(w.device):  # the Triton kernel's tiles
                self.kernel = "triton"

    def dequantize(self) -> torch.Tensor:
        if self.kernel == "int4pack":
            sz = self.scales_and_zeros.float()
            scale, lo = sz[..., 0].t(), sz[..., 1].t() - 8 * sz[..., 0].t()
            return dequantize_int4(unpack_int4_cpu(self.qweight), scale, lo)
        return dequantize_int4(unpack_int4(self.qweight), self.scale.float(), self.lo.float())

    def _int4pack(self, x2d: torch.Tensor) -> torch.Tensor:
        return torch._weight_int4pack_mm_for_cpu(
            x2d, self.qweight, self.group_size, self.scales_and_zeros.to(x2d.dtype)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "triton" and use_triton(x.device):
            from kvpilot_engine.kernels.quant_matmul import int4_matmul

            return int4_matmul(x, self.qweight, self.scale, self.lo, self.group_size, self._bias(x))
        if self.kernel == "int4pack" and _small_batch(x):
            y = self._int4pack(x.reshape(-1, x.shape[-1]).contiguous())
            y = y.view(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self._bias(x)
        return super().forward(x)


class Fp8Linear(QuantLinear):
    def __init__(self, w: torch.Tensor, bias: torch.Tensor | None):
        super().__init__("fp8", w.shape[1], w.shape[0], bias)
        q, scale = quantize_fp8(w)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        if w.device.type == "cuda":
            self.kernel = "scaled_mm"

    def dequantize(self) -> torch.Tensor:
        return dequantize_fp8(self.qweight, self.scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != "scaled_mm":
            return super().forward(x)
        # Per-token activation scales; _scaled_mm wants the weight column-major ([in, out] view).
        x2d = x.reshape(-1, x.shape[-1])
        x_scale = (x2d.float().abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=1e-12)
        xq = (x2d.float() / x_scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        y = torch._scaled_mm(
            xq,
            self.qweight.t(),
            scale_a=x_scale,
            scale_b=self.scale.t().contiguous(),
            out_dtype=x.dtype,
        )
        y = y.view(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self._bias(x)


class QuantEmbedding(nn.Module):
    """Token embedding over an Int8Linear's rows (shared with a tied output layer)."""

    def __init__(self, table: Int8Linear, dtype: torch.dtype):
        super().__init__()
        self.table, self.dtype = table, dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table.embed(ids, self.dtype)


# ---- applying it to a model --------------------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    """How one linear layer is stored: (method, group size) or None (kept in float)."""

    method: str
    group_size: int | None = None


def check_supported(method: str, device: torch.device) -> None:
    if method == "fp8" and device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise QuantizationError(
                f"fp8 needs a GPU with FP8 tensor cores (compute capability 8.9+: Ada, Hopper); "
                f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}"
            )


def make_linear(layer: nn.Linear, plan: LayerPlan) -> QuantLinear:
    w = layer.weight.data
    bias = layer.bias.data.clone() if layer.bias is not None else None
    if plan.method == "int8":
        return Int8Linear(w, bias, plan.group_size)
    if plan.method == "int4":
        return Int4Linear(w, bias, plan.group_size or DEFAULT_INT4_GROUP)
    if plan.method == "fp8":
        return Fp8Linear(w, bias)
    raise QuantizationError(f"no linear layer for {plan.method!r}")


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, shared storage counted once."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen or t.device.type == "meta":
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total


# The decoder's linear layers, and the GGUF tensors each one is fused from.
_LAYER_SOURCES = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "self_attn.o_proj": ("self_attn.o_proj",),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp.down_proj": ("mlp.down_proj",),
}


def plan_for(
    method: str, name: str, in_features: int, group_size: int, gguf_types: dict[str, int]
) -> LayerPlan | None:
    """`name`: the HF name(s) prefix of the layer's weight, e.g. model.layers.0.self_attn.q_proj
    (gguf mode looks up the file's type of each source tensor)."""
    if method in ("int8", "fp8"):
        return LayerPlan(method)
    if method == "int4":
        return LayerPlan("int4", int4_group_size(in_features, group_size))
    if method == "gguf":
        kept = {GGUF_KEPT.get(gguf_types.get(src, -1)) for src in name.split("|")}
        if len(kept) == 1 and None not in kept:
            ((m, g),) = kept
            return LayerPlan(m, g)
        return None
    return None


def quantize_model(
    model: nn.Module,
    method: str,
    group_size: int = DEFAULT_INT4_GROUP,
    gguf_types: dict[str, int] | None = None,
) -> dict[str, int]:
    """Replace the float linear layers (and the token embedding) of a loaded LlamaForCausalLM in
    place. Returns how many layers each storage got, e.g. {"int4": 120, "float": 0}."""
    if method == "none":
        return {}
    gguf_types = gguf_types or {}
    counts: dict[str, int] = {}
    dtype = model.model.embed_tokens.weight.dtype
    for i, layer in enumerate(model.model.layers):
        for attr, sources in _LAYER_SOURCES.items():
            parent_name, leaf = attr.split(".")
            parent = getattr(layer, parent_name)
            linear = getattr(parent, leaf)
            srcs = "|".join(f"model.layers.{i}.{s}.weight" for s in sources)
            plan = plan_for(method, srcs, linear.in_features, group_size, gguf_types)
            key = plan.method if plan else "float"
            counts[key] = counts.get(key, 0) + 1
            if plan is not None:
                setattr(parent, leaf, make_linear(linear, plan))
    # Embedding: int8 rows; GGUF's Q8_0 keeps its 32-wide groups.
    emb_group = None
    if method == "gguf":
        kept = GGUF_KEPT.get(gguf_types.get("model.embed_tokens.weight", -1))
        emb_group = kept[1] if kept and kept[0] == "int8" else None
    embed = model.model.embed_tokens
    table = Int8Linear(embed.weight.data, None, emb_group)
    model.model.embed_tokens = QuantEmbedding(table, dtype)
    counts["int8 embedding"] = 1
    if model.config.tie_word_embeddings:
        model.lm_head = table
    else:
        head = model.lm_head
        plan = plan_for(method, "lm_head.weight", head.in_features, group_size, gguf_types)
        if plan is not None:
            model.lm_head = make_linear(head, plan)
        counts["lm_head " + (plan.method if plan else "float")] = 1
    return counts
