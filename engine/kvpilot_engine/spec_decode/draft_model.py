"""Draft model: a smaller model of the same tokenizer proposes, greedily, with its own paged KV.

Each target sequence has a mirror in the draft's pool. Before proposing, the mirror is synced
to the target's tokens: the K/V it computed for tokens the target kept stay (drafts the target
accepted are already in the draft's cache), the rest are rolled back. Then one batched pass
catches the mirrors up (the prompt at first, afterwards the target's last token or two) and
yields the first drafts, and each further draft is one batched decode step of the draft model.
Drafts are argmax picks, deterministic, so the target's verifier is exact rejection sampling
(see verify.py).
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from kvpilot_engine.block_manager import BlockManager
from kvpilot_engine.sampling_params import SamplingParams
from kvpilot_engine.scheduler import ScheduledSeq, SchedulerOutput
from kvpilot_engine.sequence import Sequence
from kvpilot_engine.spec_decode.config import SpeculativeConfig

if TYPE_CHECKING:
    from kvpilot_engine.config import EngineArgs
    from kvpilot_engine.llm_engine import LLMEngine

_PROBE = "Speculative decoding needs one tokenizer: ünïcödé, 12345, def f(x): return x\n"


class DraftModelSpeculation:
    free = False  # every proposal is a forward pass of the draft model

    def __init__(self, config: SpeculativeConfig, args: EngineArgs, engine: LLMEngine):
        from kvpilot_engine.loader import load_checkpoint
        from kvpilot_engine.worker import Worker

        assert config.model is not None
        ckpt = engine.checkpoint if config.model == args.model else load_checkpoint(config.model)
        target_tok = engine.tokenizer
        if ckpt.config.vocab_size != engine.model_config.vocab_size or ckpt.tokenizer.encode(
            _PROBE
        ) != target_tok.encode(_PROBE):
            raise ValueError(
                f"speculative_config.model {config.model!r} does not share the target model's "
                "tokenizer (vocabulary size or tokenization differ)"
            )
        draft_args = dataclasses.replace(
            args,
            model=config.model,
            speculative_config=None,
            tensor_parallel_size=1,
            quantization="none",
            max_model_len=engine.max_model_len,
            # The draft proposes on the base model; the target verifies with the adapter.
            enable_lora=False,
        )
        self.checkpoint = ckpt
        self.worker = Worker(draft_args, ckpt)
        self.runner = self.worker.model_runner
        self.block_manager = BlockManager(
            self.worker.num_blocks, args.block_size, enable_prefix_caching=False
        )
        self.max_num_batched_tokens = args.max_num_batched_tokens
        self._mirrors: dict[int, Sequence] = {}
        self._greedy = SamplingParams(temperature=0.0, max_tokens=None)
        self.draft_cost = 0.0  # seconds per draft decode step, for the adaptive plan

    def _sync(self, seq: Sequence) -> Sequence:
        m = self._mirrors.get(seq.seq_id)
        if m is None:
            m = Sequence(seq.seq_id, seq.request_id, 0, [], len(seq), self._greedy)
            self._mirrors[seq.seq_id] = m
        common = 0
        for a, b in zip(m.token_ids, seq.token_ids, strict=False):
            if a != b:
                break
            common += 1
        m.token_ids = list(seq.token_ids)
        m.num_computed_tokens = min(m.num_computed_tokens, common)
        self.block_manager.trim(m, m.num_computed_tokens)
        return m

    def propose(self, seqs: list[Sequence], num_tokens: list[int]) -> list[list[int]]:
        mirrors = [self._sync(s) for s in seqs]
        drafts: list[list[int]] = [[] for _ in seqs]
        pending = [i for i, k in enumerate(num_tokens) if k > 0]
        first = True
        while pending:
            out = SchedulerOutput()
            budget = self.max_num_batched_tokens
            for i in pending:
                m = mirrors[i]
                n = min(m.num_uncomputed_tokens, budget)
                if n <= 0 or not self.block_manager.allocate_slots(m, n):
                    continue
                out.scheduled.append(ScheduledSeq(m, n))
                budget -= n
            if not out.scheduled:
                break
            t0 = time.perf_counter()
            results = self.runner.execute(out)
            if not first:
                self.draft_cost = 0.8 * self.draft_cost + 0.2 * (time.perf_counter() - t0)
            first = False
            for s in out.scheduled:
                s.seq.num_computed_tokens += s.num_tokens
            for i in pending:
                got = results.get(mirrors[i].seq_id)
                if got:
                    mirrors[i].token_ids.append(got[0].token_id)
                    drafts[i].append(got[0].token_id)
            pending = [
                i
                for i in pending
                if len(drafts[i]) < num_tokens[i] and mirrors[i].num_uncomputed_tokens > 0
            ]
        return drafts

    def finish(self, seq: Sequence) -> None:
        m = self._mirrors.pop(seq.seq_id, None)
        if m is not None:
            self.block_manager.free(m)
