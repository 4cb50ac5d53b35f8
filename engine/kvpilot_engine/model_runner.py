"""ModelRunner: one rank's model and KV pool; turns a SchedulerOutput into sampled tokens.

One step is one forward pass over the flattened tokens of every scheduled sequence, decodes and
prefill chunks alike, with a slot per token and a block table per sequence. The runner is handed
a loaded model and a pool size; loading, sizing the pool and starting the other tensor-parallel
ranks is worker.py's part.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from kvpilot_engine.attention import (
    AttentionMetadata,
    Workspace,
    build_decode_groups,
    use_triton,
)
from kvpilot_engine.config import ModelConfig
from kvpilot_engine.cuda_graph import DecodeGraphs
from kvpilot_engine.device import to_device
from kvpilot_engine.lora.layers import LoRABanks, LoRAStep
from kvpilot_engine.models.llama import LlamaForCausalLM
from kvpilot_engine.sampler import Sampler, SampleResult
from kvpilot_engine.scheduler import SchedulerOutput
from kvpilot_engine.sequence import Sequence
from kvpilot_engine.spec_decode.verify import num_accepted, rewind
from kvpilot_engine.step_input import StepInput
from kvpilot_engine.structured import fill_structured_bitmask

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
        broadcast: Callable[[StepInput], None] | None = None,
        lora_banks: LoRABanks | None = None,
    ):
        """`broadcast`, on rank 0 of a tensor-parallel engine: sends a step's inputs to the other
        ranks, which run the same forward pass alongside this one. `lora_banks`: the LoRA
        adapters' device slots (enable_lora); the engine's LoRAManager fills them and points
        `lora_slots` (adapter key -> slot) at its map."""
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
        self.broadcast = broadcast
        self.graphs: DecodeGraphs | None = None
        self.lora_banks = lora_banks
        self.lora_slots: dict[int, int] = {}

    def capture_graphs(self, max_batch: int, max_model_len: int) -> float:
        """CUDA graphs for decode batches up to `max_batch`; returns the seconds it took."""
        t0 = time.perf_counter()
        self.graphs = DecodeGraphs(
            self.model,
            self.kv_caches,
            max_batch,
            max_model_len,
            self.block_size,
            self.device,
            self.dtype,
        )
        self.graphs.capture()
        return time.perf_counter() - t0

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

    def build_step(self, out: SchedulerOutput, all_rows: bool = False) -> StepInput:
        """`all_rows`: logits of every token (scoring), else of the rows to sample."""
        bs = self.block_size
        step = StepInput()
        for i, s in enumerate(out.scheduled):
            seq = s.seq
            start = seq.num_computed_tokens
            end = start + s.num_tokens
            # Drafts follow the sequence's last token as if they were part of it; every row
            # from that token on is sampled to verify them.
            num_spec = len(s.spec_token_ids)
            stop = end + num_spec
            step.input_ids.extend(seq.token_ids[start:end])
            step.input_ids.extend(s.spec_token_ids)
            step.positions.extend(range(start, stop))
            table = seq.block_table
            step.slots.extend(table[p // bs] * bs + p % bs for p in range(start, stop))
            step.query_start_loc.append(step.query_start_loc[-1] + stop - start)
            step.context_lens.append(stop)
            step.block_tables.append(list(table))
            if seq.lora_key:
                if not step.lora_slots:
                    step.lora_slots = [-1] * i
                step.lora_slots.append(self.lora_slots[seq.lora_key])
            elif step.lora_slots:
                step.lora_slots.append(-1)
            (step.decode_seqs if stop - start == 1 else step.prefill_seqs).append(i)
            if end == len(seq):
                last = step.query_start_loc[-1]
                step.sample_rows.extend(range(last - 1 - num_spec, last))
        step.all_rows = all_rows
        return step

    def prepare(self, step: StepInput) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        dev = self.device
        triton = use_triton(dev)
        max_blocks = max(len(t) for t in step.block_tables)
        tables = to_device(
            [t + [0] * (max_blocks - len(t)) for t in step.block_tables],
            torch.int32 if triton else torch.long,
            dev,
        )
        meta = AttentionMetadata(
            slot_mapping=to_device(step.slots, torch.long, dev),
            query_start_loc=step.query_start_loc,
            context_lens=step.context_lens,
            block_tables=tables,
            decode_seqs=step.decode_seqs,
            prefill_seqs=step.prefill_seqs,
            max_context_len=max(step.context_lens),
        )
        if triton:
            meta.query_start_loc_t = to_device(step.query_start_loc, torch.int32, dev)
            meta.seq_lens_t = to_device(step.context_lens, torch.int32, dev)
            qsl = step.query_start_loc
            meta.max_query_len = max(qsl[i + 1] - qsl[i] for i in range(len(qsl) - 1))
        else:
            meta.decode_groups = build_decode_groups(meta, self.block_size, self.workspace)
        if step.lora_slots and self.lora_banks is not None:
            qsl = step.query_start_loc
            token_slots: list[int] = []  # each sequence's slot on each of its rows
            for slot, lo, hi in zip(step.lora_slots, qsl, qsl[1:], strict=False):
                token_slots += [slot] * (hi - lo)
            meta.lora = LoRAStep.build(
                self.lora_banks, token_slots, triton=triton, decode_only=not step.prefill_seqs
            )
        return (
            to_device(step.input_ids, torch.long, dev),
            to_device(step.positions, torch.long, dev),
            meta,
        )

    @torch.inference_mode()
    def run(self, step: StepInput) -> torch.Tensor | None:
        """The forward pass of one step, and the logits it asks for (None when there are none).
        Under tensor parallelism every rank runs it on the same StepInput."""
        # (Steps with LoRA adapters run eagerly: the graphs hold the base model only.)
        if self.graphs is not None and not step.lora_slots and self.graphs.can_run(step):
            # Every decode row is its sequence's last token: all rows are sampled.
            return self.model.compute_logits(self.graphs.run(step))
        input_ids, positions, meta = self.prepare(step)
        hidden = self.model(input_ids, positions, self.kv_caches, meta)
        if step.all_rows:
            return self.model.compute_logits(hidden)
        if not step.sample_rows:
            return None
        if len(step.sample_rows) < hidden.shape[0]:
            hidden = hidden[to_device(step.sample_rows, torch.long, self.device)]
        return self.model.compute_logits(hidden)

    def _run_everywhere(self, step: StepInput) -> torch.Tensor | None:
        if self.broadcast is not None:
            self.broadcast(step)
        return self.run(step)

    def execute(self, out: SchedulerOutput) -> dict[int, list[SampleResult]]:
        """Run one step; return the tokens of every sequence whose chunk reached its end: one
        sampled token, or with drafts the accepted ones and the token after them."""
        logits = self._run_everywhere(self.build_step(out))
        if logits is None:
            return {}
        sampling = [s for s in out.scheduled if s.samples]
        # One row per sampled position: a speculating sequence's rows see the drafts before
        # them as its tokens (penalties count them), and share its generator.
        params, gens, tokens, prompts = [], [], [], []
        states: dict[int, torch.Tensor] = {}
        for s in sampling:
            seq, spec = s.seq, s.spec_token_ids
            g = self.generator_for(seq)
            if spec and g is not None and not seq.sampling_params.greedy:
                states[seq.seq_id] = g.get_state()
            for j in range(len(spec) + 1):
                params.append(seq.sampling_params)
                gens.append(g)
                penalized = j and seq.sampling_params.has_penalties
                tokens.append(seq.token_ids + spec[:j] if penalized else seq.token_ids)
                prompts.append(seq.num_prompt_tokens)
        # Grammar masks are filled here, between launching the forward pass and the sampler's
        # first read of the logits, so on a GPU they overlap the forward pass.
        bitmask, structured_rows = fill_structured_bitmask(
            [(s.seq, s.spec_token_ids) for s in sampling], logits.shape[-1]
        )
        with torch.inference_mode():
            rows = self.sampler(
                logits,
                params,
                gens,
                self.default_generator,
                token_ids=tokens,
                num_prompt_tokens=prompts,
                token_bitmask=bitmask,
                structured_rows=structured_rows,
            )
        results: dict[int, list[SampleResult]] = {}
        row = 0
        for s in sampling:
            spec = s.spec_token_ids
            mine = rows[row : row + len(spec) + 1]
            row += len(spec) + 1
            if spec:
                keep = num_accepted(spec, [r.token_id for r in mine]) + 1
                mine = mine[:keep]
                state = states.get(s.seq.seq_id)
                if state is not None and keep < len(spec) + 1:
                    rewind(self.generator_for(s.seq), state, keep, logits.shape[-1])
            results[s.seq.seq_id] = mine
        return results

    def all_logits(self, out: SchedulerOutput) -> torch.Tensor:
        """Logits of every scheduled token, [num_tokens, vocab] (scoring and the oracle tests)."""
        logits = self._run_everywhere(self.build_step(out, all_rows=True))
        assert logits is not None
        return logits
