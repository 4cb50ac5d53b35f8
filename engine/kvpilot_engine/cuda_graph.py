"""CUDA graphs for decode steps (captured by the ModelRunner, on a GPU with one rank).

A batch-1 decode step of a small model launches a few hundred kernels that each run for
microseconds; launched one by one from Python, the GPU waits on the CPU. A CUDA graph replays
the whole forward with one launch. Graphs are captured once per padded batch size (1, 2, 4, 8,
then multiples of 16, as nano-vllm does) over static input buffers; a step of b decodes copies
its inputs into the buffers of the smallest captured size >= b, whose extra rows are padding
(slot -1: nothing is stored; sequence length 0: the attention kernel writes zeros and reads
nothing). Everything the forward reads is a device tensor or a Python int fixed at capture
(the attention kernels' grid comes from max_model_len), so the replay needs no host decisions.

Prefills and mixed steps run eagerly: their shapes vary too much to capture, and their kernels
are long enough that launch overhead does not matter.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kvpilot_engine.attention import AttentionMetadata
from kvpilot_engine.device import to_device
from kvpilot_engine.step_input import StepInput

if TYPE_CHECKING:
    from kvpilot_engine.models.llama import LlamaForCausalLM

KVCaches = list[tuple[torch.Tensor, torch.Tensor]]


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s < max_batch]
    sizes += list(range(16, max_batch, 16))
    return [*sizes, max_batch]


class DecodeGraphs:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: KVCaches,
        max_batch: int,
        max_model_len: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.model = model
        self.kv_caches = kv_caches
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.sizes = graph_batch_sizes(max_batch)
        n = max_batch
        self.input_ids = torch.zeros(n, dtype=torch.long, device=device)
        self.positions = torch.zeros(n, dtype=torch.long, device=device)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(n, self.max_blocks, dtype=torch.int32, device=device)
        # One query token per row, so the offsets never change.
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.outputs = torch.zeros(n, model.config.hidden_size, dtype=dtype, device=device)
        # Captured size -> its graph's replay.
        self.replays: dict[int, Callable[[], None]] = {}

    def _meta(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:bs],
            query_start_loc=[],
            context_lens=[],
            block_tables=self.block_tables[:bs],
            decode_seqs=[],
            prefill_seqs=[],
            max_context_len=self.max_model_len,
            query_start_loc_t=self.query_start_loc[: bs + 1],
            seq_lens_t=self.seq_lens[:bs],
            max_query_len=1,
        )

    def _forward(self, bs: int) -> None:
        meta = self._meta(bs)
        hidden = self.model(self.input_ids[:bs], self.positions[:bs], self.kv_caches, meta)
        self.outputs[:bs] = hidden

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, so the smaller graphs fit in the memory pool the first one made."""
        pool = None
        for bs in reversed(self.sizes):
            # An eager run first: Triton compiles (and autotunes) outside the capture.
            self._forward(bs)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(bs)
            if pool is None:
                pool = graph.pool()
            self.replays[bs] = graph.replay
        torch.cuda.synchronize()

    def can_run(self, step: StepInput) -> bool:
        return (
            bool(self.replays)
            and not step.prefill_seqs
            and 0 < len(step.decode_seqs) <= self.max_batch
            and max(step.context_lens) <= self.max_model_len
        )

    def run(self, step: StepInput) -> torch.Tensor:
        """Hidden states of the step's b decode rows ([b, hidden], a view of a static buffer:
        read it before the next step)."""
        b = len(step.input_ids)
        bs = next(s for s in self.sizes if s >= b)
        dev = self.input_ids.device
        width = max(len(t) for t in step.block_tables)
        # Rows past b keep stale values except the two that make them padding.
        self.input_ids[:b].copy_(to_device(step.input_ids, torch.long, dev))
        self.positions[:b].copy_(to_device(step.positions, torch.long, dev))
        self.slots[:b].copy_(to_device(step.slots, torch.long, dev))
        self.slots[b:bs].fill_(-1)
        self.seq_lens[:b].copy_(to_device(step.context_lens, torch.int32, dev))
        self.seq_lens[b:bs].zero_()
        tables = [t + [0] * (width - len(t)) for t in step.block_tables]
        self.block_tables[:b, :width].copy_(to_device(tables, torch.int32, dev))
        self.replays[bs]()
        return self.outputs[:b]
