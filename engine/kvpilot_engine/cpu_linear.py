"""Linear layers on CPU with their weights prepacked once for oneDNN.

On CPU, F.linear hands the GEMM the weight in PyTorch's plain [out, in] layout, and the GEMM
copies it into its own blocked layout on every call. At the few rows of a decode or verify step
(1 to 64) that copy costs about as much as the arithmetic. `prepack_linears` packs each float
nn.Linear of a loaded model (the decoder's qkv/o/gate_up/down projections and lm_head) once with
oneDNN's reorder and swaps in a PackedLinear that calls oneDNN's linear on the packed copy.
Quantized layers are left alone (they are not nn.Linear), and so is everything on a GPU.

The plain weight stays the module's parameter: state_dict, weight_bytes, the embedding lookup of
a tied lm_head and merging LoRA deltas (bench throughput --lora) all keep using it. The packed
copy is a cache beside it, so the float linear weights take their size twice in memory; it is
rebuilt on the next call after the parameter changes in place (its version counter moves; a
write through `.data` does not move it: call the layer's `refresh` after one).

`KVPILOT_CPU_PREPACK=0` keeps plain F.linear, for comparison. A layer whose packing or first
call fails also stays plain.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

logger = logging.getLogger("kvpilot.engine")

PACKED_DTYPES = (torch.float32, torch.bfloat16)


def prepack_enabled(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `prepack_linears` packs anything for a model in `dtype` on `device`."""
    return (
        device.type == "cpu"
        and dtype in PACKED_DTYPES
        and os.environ.get("KVPILOT_CPU_PREPACK", "1") != "0"
        and torch.backends.mkldnn.is_available()
    )


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of a [out, in] weight (an mkldnn tensor, not a view of it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for 2-D x, with the weight as `pack_weight` made it."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Linear):
    """An nn.Linear whose forward runs on a prepacked copy of its weight. It holds the very
    Parameters of the layer it replaces (a tied lm_head stays tied to the embedding)."""

    def __init__(self, linear: nn.Linear):
        # On meta: nothing is allocated before the layer's own parameters are put in.
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")
        self.weight = linear.weight
        self.bias = linear.bias
        self._packed = pack_weight(self.weight)
        self._packed_version = self.weight._version
        # A CPU that oneDNN cannot run this dtype on fails here, at load, not in a step.
        packed_linear(self.weight.new_zeros(1, self.in_features), self._packed, self.bias)

    @property
    def packed_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()

    def refresh(self) -> None:
        """Pack the weight again (after it changed)."""
        self._packed = pack_weight(self.weight)
        self._packed_version = self.weight._version

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight._version != self._packed_version:  # merged into, copied over, ...
            self.refresh()
        y = packed_linear(x.reshape(-1, self.in_features), self._packed, self.bias)
        return y.view(*x.shape[:-1], self.out_features)


def prepack_linears(model: nn.Module, device: torch.device, dtype: torch.dtype) -> int:
    """Replace every plain nn.Linear of `model` by a PackedLinear when prepack_enabled says so.
    Returns the bytes the packed copies take (0 when nothing was packed)."""
    if not prepack_enabled(device, dtype):
        return 0
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.dtype in PACKED_DTYPES
    ]
    total = 0
    with torch.no_grad():
        for parent, name, linear in swaps:
            try:
                packed = PackedLinear(linear)
            # An op this torch build or CPU lacks, or a weight made in inference mode (no
            # version counter to tell when it changes): that layer stays on F.linear.
            except (RuntimeError, AttributeError) as e:
                logger.debug("not prepacking %s: %s", name, e)
                continue
            setattr(parent, name, packed)
            total += packed.packed_bytes
    return total


def repack_changed(model: nn.Module) -> None:
    """Repack now every PackedLinear of `model` whose weight changed in place, so that the cost
    lands here (e.g. in a LoRA merge's time) rather than in the next step."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, PackedLinear) and m.weight._version != m._packed_version:
                m.refresh()
