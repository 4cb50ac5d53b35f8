"""ModelRunner: owns the model and the KV pool, and turns a SchedulerOutput into sampled tokens.

One step is one forward pass over the flattened tokens of every scheduled sequence, decodes and
prefill chunks alike, with a slot per token and a block table per sequence.
"""

from __future__ import annotations

import torch

from kvpilot_engine.attention import AttentionMetadata, Workspace, build_decode_groups
from kvpilot_engine.config import ModelConfig
from kvpilot_engine.models.llama import LlamaForCausalLM
from kvpilot_engine.sampler import Sampler, SampleResult
from kvpilot_engine.scheduler import SchedulerOutput
from kvpilot_engine.sequence import Sequence

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def tune_cpu_allocator() -> bool:
    """Keep large temporaries on glibc's heap instead of fresh mmap()s.

    By default glibc serves every allocation above a (dynamic) threshold with its own mmap, and
    returns it on free; the next step's activations then fault in zeroed pages again. On CPU that
    costs more than the matmuls of a decode step. 32 MiB is glibc's largest mmap threshold."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, 32 * 2**20) == 1
        return ok and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):  # not glibc
        return False


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return (
        2
        * config.num_hidden_layers
        * block_size
        * config.num_key_value_heads
        * config.head_dim
        * elem
    )


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        config: ModelConfig,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        seed: int = 0,
    ):
        if device.type == "cpu":
            tune_cpu_allocator()
        self.model = model
        self.config = config
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(config.num_hidden_layers)
        ]
        self.workspace = Workspace(shape[1:], dtype, device)
        self.sampler = Sampler()
        self.default_generator = torch.Generator(device=device)
        self.default_generator.manual_seed(seed)
        self._generators: dict[int, torch.Generator] = {}

    def generator_for(self, seq: Sequence) -> torch.Generator | None:
        seed = seq.sampling_params.seed
        if seed is None:
            return None
        g = self._generators.get(seq.seq_id)
        if g is None:
            # Each of a request's n completions gets its own stream, derived from the seed.
            g = torch.Generator(device=self.device)
            g.manual_seed(seed + seq.index)
            self._generators[seq.seq_id] = g
        return g

    def release(self, seq: Sequence) -> None:
        self._generators.pop(seq.seq_id, None)

    def prepare(
        self, out: SchedulerOutput
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start_loc = [0]
        context_lens: list[int] = []
        decode_seqs: list[int] = []
        prefill_seqs: list[int] = []
        sample_rows: list[int] = []
        max_blocks = max(len(s.seq.block_table) for s in out.scheduled)
        tables = torch.zeros(len(out.scheduled), max_blocks, dtype=torch.long)
        for i, s in enumerate(out.scheduled):
            seq = s.seq
            start = seq.num_computed_tokens
            end = start + s.num_tokens
            input_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            query_start_loc.append(query_start_loc[-1] + s.num_tokens)
            context_lens.append(end)
            tables[i, : len(table)] = torch.tensor(table, dtype=torch.long)
            (decode_seqs if s.num_tokens == 1 else prefill_seqs).append(i)
            if end == len(seq):
                sample_rows.append(query_start_loc[-1] - 1)
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            query_start_loc=query_start_loc,
            context_lens=context_lens,
            block_tables=tables.to(dev),
            decode_seqs=decode_seqs,
            prefill_seqs=prefill_seqs,
            max_context_len=max(context_lens),
        )
        if decode_seqs:
            meta.decode_groups = build_decode_groups(meta, bs, self.workspace)
        return (
            torch.tensor(input_ids, dtype=torch.long, device=dev),
            torch.tensor(positions, dtype=torch.long, device=dev),
            meta,
            sample_rows,
        )

    @torch.inference_mode()
    def execute(self, out: SchedulerOutput) -> dict[int, SampleResult]:
        """Run one step; return the sampled token of every sequence whose chunk reached its end."""
        input_ids, positions, meta, sample_rows = self.prepare(out)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        sampling = [
            s.seq for s in out.scheduled if s.seq.num_computed_tokens + s.num_tokens == len(s.seq)
        ]
        if not sampling:
            return {}
        logits = self.model.compute_logits(hidden[sample_rows])
        results = self.sampler(
            logits,
            [seq.sampling_params for seq in sampling],
            [self.generator_for(seq) for seq in sampling],
            self.default_generator,
        )
        return {seq.seq_id: r for seq, r in zip(sampling, results, strict=True)}

    @torch.inference_mode()
    def all_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits of every scheduled token, [num_tokens, vocab] (scoring and the oracle tests)."""
        input_ids, positions, meta, _ = self.prepare(out)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        return self.model.compute_logits(hidden)
