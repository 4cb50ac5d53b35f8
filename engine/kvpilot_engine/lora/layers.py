"""Applying many LoRA adapters in one forward pass, without merging them into the weights.

`LoRABanks` holds `max_loras` device slots. Each of a layer's four projection groups (qkv,
o, gate_up, down: the model's fused matmuls) has one stacked A [slots, in, G * R] and one
stacked B [slots, G * R, out], R = max_lora_rank, G the projections fused in the group: each
projection's A^T sits in its own R columns, its B^T in the matching R rows and its own output
columns (B is block-diagonal), so one shrink and one expand per group cover q, k and v (or gate
and up) at once. An adapter of rank r < R, or one not targeting a projection, leaves zeros.

`LoRAStep` is one step's plan, built once and used by every layer: which slot each token uses
(-1: the base model). The delta of a group is out[t] += (x[t] @ A[slot]) @ B[slot]:
- PyTorch (CPU): tokens grouped by slot (S-LoRA/Punica's segments). One slot: two matmuls on
  its rows. Several: the rows are packed into a [slots, longest, in] batch and run as two bmm's
  (a few ops per group, whatever the number of adapters), or, when padding would more than
  double the work (a long prefill next to a few decodes), one pair of matmuls per slot.
- Triton (GPU, kernels/lora.py): a segmented gather matmul (SGMV) over the slot-sorted tokens
  when the step has prefill chunks, a per-token gather (BGMV) for decode-only steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvpilot_engine.config import ModelConfig
from kvpilot_engine.device import to_device
from kvpilot_engine.lora.adapter import LoRAAdapter, module_shape

# group -> its projections, in the order their outputs are fused
GROUPS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
GROUP_OF = {m: g for g, ms in GROUPS.items() for m in ms}


def _group_io(config: ModelConfig, group: str) -> tuple[int, list[int]]:
    """(in_features, [out size of each projection in the group]): the projections share their
    input."""
    shapes = [module_shape(config, m) for m in GROUPS[group]]
    return shapes[0][0], [out for _, out in shapes]


class LoRABanks:
    """The device slots: stacked, rank-padded A and B per layer and group."""

    def __init__(
        self,
        config: ModelConfig,
        max_loras: int,
        max_rank: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.config = config
        self.max_loras = max_loras
        self.max_rank = max_rank
        self.device = device
        self.dtype = dtype
        n_layers, r = config.num_hidden_layers, max_rank
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        for g, mods in GROUPS.items():
            d_in, outs = _group_io(config, g)
            self.a[g] = torch.zeros(
                n_layers, max_loras, d_in, len(mods) * r, dtype=dtype, device=device
            )
            self.b[g] = torch.zeros(
                n_layers, max_loras, len(mods) * r, sum(outs), dtype=dtype, device=device
            )
        # Which groups each slot's adapter touches: a group no loaded adapter targets is skipped.
        self.slot_groups: list[frozenset[str]] = [frozenset()] * max_loras

    def clear(self, slot: int) -> None:
        for g in GROUPS:
            self.a[g][:, slot].zero_()
            self.b[g][:, slot].zero_()
        self.slot_groups[slot] = frozenset()

    def load(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy an adapter into a slot (its previous contents are cleared first)."""
        self.clear(slot)
        r = self.max_rank
        for (layer, module), (a, b) in adapter.weights.items():
            g = GROUP_OF[module]
            j = GROUPS[g].index(module)
            _, outs = _group_io(self.config, g)
            off = sum(outs[:j])
            rank = a.shape[0]
            self.a[g][layer, slot, :, j * r : j * r + rank].copy_(a.T)
            self.b[g][layer, slot, j * r : j * r + rank, off : off + outs[j]].copy_(b.T)
        self.slot_groups[slot] = frozenset(GROUP_OF[m] for m in adapter.target_modules)


@dataclass
class LoRAStep:
    """One step's adapter plan (see the module docstring); None stands for a base-only step."""

    banks: LoRABanks
    groups: frozenset[str]  # the groups some adapter in this step targets
    token_slots: torch.Tensor  # [n] int32 on the device: each token's slot, -1 base
    rows: torch.Tensor  # [m] int64: the adapted tokens, sorted by slot (stable)
    all_rows: bool  # every token is adapted by the one slot of the step
    slots: list[int]  # slots used, ascending
    counts: list[int]  # tokens per used slot
    padded: bool  # PyTorch path: bmm over [slots, longest, in]
    dest: torch.Tensor | None  # padded position of each of `rows`
    slot_idx: torch.Tensor | None  # padded, when not every slot is used: the slots to gather
    # The Triton path (None/False on CPU)
    triton: bool = False
    decode_only: bool = False
    seg_starts: torch.Tensor | None = None  # [num used slots] offsets into rows
    seg_lens: torch.Tensor | None = None
    seg_slots: torch.Tensor | None = None

    @classmethod
    def build(
        cls,
        banks: LoRABanks,
        token_slots: list[int],
        triton: bool = False,
        decode_only: bool = False,
    ) -> LoRAStep | None:
        used = sorted({s for s in token_slots if s >= 0})
        if not used:
            return None
        groups = frozenset().union(*(banks.slot_groups[s] for s in used))
        if not groups:
            return None
        dev = banks.device
        # Sort on the host: the lists are one entry per token and the plan serves every layer.
        by_slot: dict[int, list[int]] = {s: [] for s in used}
        for t, s in enumerate(token_slots):
            if s >= 0:
                by_slot[s].append(t)
        rows_l = [t for s in used for t in by_slot[s]]
        counts = [len(by_slot[s]) for s in used]
        n, m = len(token_slots), len(rows_l)
        padded, dest, slot_idx = False, None, None
        longest = max(counts)
        if not triton and len(used) > 1 and len(used) * longest <= 2 * m:
            padded = True
            dest_l = [i * longest + j for i, c in enumerate(counts) for j in range(c)]
            dest = to_device(dest_l, torch.long, dev)
            if used != list(range(banks.max_loras)):
                slot_idx = to_device(used, torch.long, dev)
        step = cls(
            banks=banks,
            groups=groups,
            token_slots=to_device(token_slots, torch.int32, dev),
            rows=to_device(rows_l, torch.long, dev),
            all_rows=len(used) == 1 and m == n,
            slots=used,
            counts=counts,
            padded=padded,
            dest=dest,
            slot_idx=slot_idx,
            triton=triton,
            decode_only=decode_only,
        )
        if triton:
            starts = [sum(counts[:i]) for i in range(len(counts))]
            step.seg_starts = to_device(starts, torch.int32, dev)
            step.seg_lens = to_device(counts, torch.int32, dev)
            step.seg_slots = to_device(used, torch.int32, dev)
        return step

    def apply(self, layer: int, group: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += this step's adapters' delta of `group` in `layer`, in place."""
        if group not in self.groups:
            return
        a, b = self.banks.a[group][layer], self.banks.b[group][layer]
        if self.triton:
            from kvpilot_engine.kernels import lora as kernels

            if self.decode_only:
                kernels.bgmv(x, a, b, self.token_slots, out)
            else:
                assert self.seg_starts is not None and self.seg_lens is not None
                assert self.seg_slots is not None
                kernels.sgmv(
                    x, a, b, self.rows, self.seg_starts, self.seg_lens, self.seg_slots,
                    max(self.counts), out,
                )  # fmt: skip
            return
        lora_delta_reference(self, a, b, x, out)


def lora_delta_reference(
    step: LoRAStep, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor, out: torch.Tensor
) -> None:
    """The PyTorch path: out[rows] += (x[rows] @ a[slot]) @ b[slot], grouped by slot."""
    if step.all_rows:
        s = step.slots[0]
        out.add_((x @ a[s]) @ b[s])
        return
    xs = x.index_select(0, step.rows)
    if len(step.slots) == 1:
        s = step.slots[0]
        out.index_add_(0, step.rows, (xs @ a[s]) @ b[s])
        return
    if step.padded:
        assert step.dest is not None
        k, longest = len(step.slots), max(step.counts)
        xp = x.new_zeros(k * longest, x.shape[1])
        xp.index_copy_(0, step.dest, xs)
        if step.slot_idx is None:
            sa, sb = a, b
        else:
            sa, sb = a.index_select(0, step.slot_idx), b.index_select(0, step.slot_idx)
        y = torch.bmm(torch.bmm(xp.view(k, longest, -1), sa), sb)
        out.index_add_(0, step.rows, y.view(k * longest, -1).index_select(0, step.dest))
        return
    ys, start = [], 0
    for s, c in zip(step.slots, step.counts, strict=True):
        ys.append((xs[start : start + c] @ a[s]) @ b[s])
        start += c
    out.index_add_(0, step.rows, torch.cat(ys))
