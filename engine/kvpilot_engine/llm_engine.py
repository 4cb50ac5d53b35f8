"""LLMEngine: add requests, step, abort; each step returns the requests that produced tokens.

This is the API the server drives from its engine loop and the offline `LLM` drives in a loop.
It owns the tokenizer (prompts in, incremental text out), stop conditions and per-request timing;
the Scheduler decides what runs, the ModelRunner runs it. Putting the model on its devices (loading,
sizing the KV pool, CUDA graphs, the tensor-parallel ranks) is the Worker's (worker.py).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from kvpilot_engine.block_manager import BlockManager
from kvpilot_engine.config import EngineArgs, ModelConfig
from kvpilot_engine.loader import Checkpoint, load_checkpoint
from kvpilot_engine.lora.adapter import LoRAAdapter
from kvpilot_engine.lora.manager import LoRAManager
from kvpilot_engine.lora.request import LoRAError, LoRARequest
from kvpilot_engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from kvpilot_engine.sampler import SampleResult
from kvpilot_engine.sampling_params import RequestOutputKind, SamplingParams
from kvpilot_engine.scheduler import ScheduledSeq, Scheduler, SchedulerOutput
from kvpilot_engine.sequence import Sequence, SequenceStatus
from kvpilot_engine.spec_decode import Speculator, make_speculator
from kvpilot_engine.structured import GrammarBackend, GrammarError
from kvpilot_engine.tokenizer import IncrementalDetokenizer, Tokenizer
from kvpilot_engine.worker import Worker

logger = logging.getLogger("kvpilot.engine")


class InvalidRequestError(ValueError):
    """A request the engine refuses; `param` names the offending OpenAI parameter."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_preemptions: int = 0
    num_steps: int = 0
    # The last step, for the per-iteration metrics a model-based autoscaler fits.
    step_time: float = 0.0
    step_prefill_tokens: int = 0
    step_decode_tokens: int = 0
    step_num_seqs: int = 0
    # Speculative decoding, cumulative (vLLM's spec_decode counters); zero without it.
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0
    spec_accepted_per_pos: tuple[int, ...] = ()
    # LoRA adapters (their names) with requests running / waiting: vllm:lora_requests_info.
    running_lora_adapters: list[str] = field(default_factory=list)
    waiting_lora_adapters: list[str] = field(default_factory=list)


@dataclass
class _SeqState:
    seq: Sequence
    detok: IncrementalDetokenizer | None
    text: str = ""
    logprobs: list[dict[int, Logprob]] | None = None
    cumulative_logprob: float | None = None
    sent_text: int = 0
    sent_tokens: int = 0
    finish_sent: bool = False


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[_SeqState]
    metrics: RequestMetrics
    hold: int = 0  # characters held back while streaming, so a stop string is never emitted
    final_sent: bool = False
    lora_request: LoRARequest | None = None

    @property
    def finished(self) -> bool:
        return all(s.seq.is_finished for s in self.seqs)


class LLMEngine:
    def __init__(self, args: EngineArgs, checkpoint: Checkpoint | None = None):
        self.args = args
        ckpt = checkpoint or load_checkpoint(args.model)
        self.checkpoint = ckpt
        self.model_config: ModelConfig = ckpt.config
        self.tokenizer: Tokenizer = ckpt.tokenizer
        self.worker = worker = Worker(args, ckpt)
        self.model_runner = worker.model_runner
        # What the worker made, for the server's metrics, the benchmarks and the tests.
        self.device, self.dtype, self.model = worker.device, worker.dtype, worker.model
        self.max_model_len = worker.max_model_len
        self.num_blocks, self.kv_cache_bytes = worker.num_blocks, worker.kv_cache_bytes
        self.quantized_layers, self.weight_bytes = worker.quantized_layers, worker.weight_bytes
        self.load_time, self.graph_capture_time = worker.load_time, worker.graph_capture_time

        self.block_manager = BlockManager(
            self.num_blocks, args.block_size, args.enable_prefix_caching
        )
        # LoRA adapters: the host cache, the loader thread and the device slots' assignment.
        self.max_loras = args.max_loras if args.enable_lora else 0
        self.lora_manager: LoRAManager | None = None
        if args.enable_lora:
            assert worker.lora_banks is not None
            self.lora_manager = LoRAManager(
                self.model_config,
                args.max_loras,
                args.max_lora_rank,
                args.max_cpu_loras,
                worker.lora_banks,
            )
            self.model_runner.lora_slots = self.lora_manager.slot_of
        self.scheduler = Scheduler(
            self.block_manager,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            policy=args.scheduling_policy,
            enable_chunked_prefill=args.enable_chunked_prefill,
            max_loras=self.max_loras,
            lora_ready=None if self.lora_manager is None else self.lora_manager.ready,
        )
        self.speculator: Speculator | None = make_speculator(args, self)
        self._grammar_backend: GrammarBackend | None = None  # made on first use
        self.requests: dict[str, _RequestState] = {}
        self._seq_ids = itertools.count()
        self._seqs: dict[int, _RequestState] = {}
        self._pending_outputs: list[RequestOutput] = []
        self.stats = EngineStats()
        logger.info(
            "engine ready: model=%s dtype=%s device=%s tensor_parallel_size=%d quantization=%s %s "
            "weights=%.1f MiB (rank 0) "
            "kv_blocks=%d (%d tokens, %.1f MiB) max_model_len=%d load=%.1fs cuda_graphs=%s",
            ckpt.name,
            self.dtype,
            self.device,
            args.tensor_parallel_size,
            args.quantization,
            self.quantized_layers or "",
            self.weight_bytes / 2**20,
            self.num_blocks,
            self.num_blocks * args.block_size,
            self.kv_cache_bytes / 2**20,
            self.max_model_len,
            self.load_time,
            "off" if self.graph_capture_time is None else f"{self.graph_capture_time:.1f}s",
        )

    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        return cls(args)

    @property
    def grammar_backend(self) -> GrammarBackend:
        """Compiles structured-output specs against this model's vocabulary."""
        if self._grammar_backend is None:
            self._grammar_backend = GrammarBackend(
                self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids
            )
        return self._grammar_backend

    def compile_structured_outputs(self, params: SamplingParams) -> None:
        """Compile (and cache) the request's grammar, or raise InvalidRequestError naming the
        parameter it came from. Thread-safe: the server calls it off the engine thread."""
        so = params.structured_outputs
        if so is None:
            return
        assert not isinstance(so, dict)
        try:
            self.grammar_backend.compile(so)
        except GrammarError as e:
            raise InvalidRequestError(str(e), param=so.source_param or e.field) from None

    def shutdown(self) -> None:
        """Stop the tensor-parallel worker processes (a no-op with one rank). Idempotent; also
        runs when the engine is collected or the interpreter exits."""
        if self.lora_manager is not None:
            self.lora_manager.shutdown()
        self.worker.shutdown()

    # ---- requests ----------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> None:
        """`lora_request`: run on that LoRA adapter. One not loaded yet is read in the
        background while the request waits; LoRAError (Disabled, NotFound) only when it cannot
        ever run."""
        params = params or SamplingParams()
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        lora_key = 0
        if lora_request is not None and self.lora_manager is None:
            raise LoRAError(
                "Disabled",
                f"LoRA adapter {lora_request.lora_name!r} requested, but the engine was "
                "started without enable_lora",
            )
        if isinstance(prompt, str):
            text: str | None = prompt
            token_ids = self.tokenizer.encode(prompt)
        else:
            text, token_ids = None, list(prompt)
        self._validate(token_ids, params)
        self.compile_structured_outputs(params)
        if lora_request is not None:
            assert self.lora_manager is not None
            lora_key = self.lora_manager.key_for(lora_request)
        if params.max_tokens is None:
            params.max_tokens = self.max_model_len - len(token_ids)
        now = time.monotonic()
        arrival = arrival_time if arrival_time is not None else now
        state = _RequestState(
            request_id=request_id,
            prompt=text,
            prompt_token_ids=token_ids,
            params=params,
            seqs=[],
            metrics=RequestMetrics(arrival_time=arrival),
            hold=max((len(s) for s in params.stop), default=1) - 1,
            lora_request=lora_request,
        )
        for i in range(params.n):
            seq = Sequence(
                seq_id=next(self._seq_ids),
                request_id=request_id,
                index=i,
                token_ids=list(token_ids),
                num_prompt_tokens=len(token_ids),
                sampling_params=params,
                priority=priority,
                arrival_time=arrival,
                lora_key=lora_key,
            )
            if params.structured_outputs is not None:
                seq.grammar = self.grammar_backend.grammar(params.structured_outputs)
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            state.seqs.append(
                _SeqState(
                    seq,
                    detok,
                    logprobs=[] if params.logprobs is not None else None,
                    cumulative_logprob=0.0 if params.logprobs is not None else None,
                )
            )
            self._seqs[seq.seq_id] = state
        self.requests[request_id] = state
        for s in state.seqs:
            self.scheduler.add(s.seq)

    def _validate(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"token id {bad} is out of range for a vocabulary of {vocab}", param="prompt"
            )
        if len(token_ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; this model's maximum context length is "
                f"{self.max_model_len} tokens, and at least one must be left to generate",
                param="prompt",
            )
        if (
            params.max_tokens is not None
            and len(token_ids) + params.max_tokens > self.max_model_len
        ):
            raise InvalidRequestError(
                f"the prompt ({len(token_ids)} tokens) plus max_tokens ({params.max_tokens}) "
                f"exceeds the maximum context length of {self.max_model_len} tokens",
                param="max_tokens",
            )
        if (
            not self.args.enable_chunked_prefill
            and len(token_ids) > self.args.max_num_batched_tokens
        ):
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens, more than max_num_batched_tokens="
                f"{self.args.max_num_batched_tokens} with chunked prefill off",
                param="prompt",
            )
        bad = next((t for t in params.stop_token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"stop token id {bad} is out of range", param="stop_token_ids"
            )
        bad = next((t for t in params.logit_bias or {} if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"logit_bias token id {bad} is out of range for a vocabulary of {vocab}",
                param="logit_bias",
            )

    # ---- LoRA adapters -----------------------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest, adapter: LoRAAdapter | None = None) -> bool:
        """Load an adapter into the host cache now; False if it was loaded already. `adapter`:
        its weights read beforehand (lora.adapter.load_adapter, on any thread), so that this
        call reads no file. Raises LoRAError (see LoRAError for the reasons)."""
        if self.lora_manager is None:
            raise LoRAError(
                "Disabled", "LoRA adapters need an engine started with enable_lora=True"
            )
        return self.lora_manager.add(lora_request, adapter)

    def remove_lora(self, lora_int_id: int) -> bool:
        """Forget an adapter; requests already queued on it still finish on it."""
        if self.lora_manager is None:
            return False
        return self.lora_manager.remove(lora_int_id)

    def list_loras(self) -> list[LoRARequest]:
        return [] if self.lora_manager is None else self.lora_manager.list()

    def _poll_lora(self) -> None:
        """Take in adapters loaded in the background; fail the requests whose adapter cannot be
        loaded (they could never run)."""
        assert self.lora_manager is not None
        sch = self.scheduler
        for entry in self.lora_manager.poll(sch.waiting, sch.running):
            logger.error("LoRA adapter %s failed to load: %s", entry.request.lora_name, entry.error)
            rids = [s.request_id for s in sch.waiting + sch.running if s.lora_key == entry.key]
            self.abort_request(list(dict.fromkeys(rids)))

    def abort_request(self, request_ids: str | list[str]) -> None:
        """Stop requests wherever they are and free their KV blocks at once."""
        ids = {request_ids} if isinstance(request_ids, str) else set(request_ids)
        ids &= set(self.requests)
        if not ids:
            return
        for seq in self.scheduler.abort(ids):
            self.model_runner.release(seq)
            if self.speculator is not None:
                self.speculator.on_finished(seq)
        for rid in ids:
            state = self.requests.pop(rid)
            for s in state.seqs:
                self._seqs.pop(s.seq.seq_id, None)
            state.metrics.finished_time = time.monotonic()
            self._pending_outputs.append(self._make_output(state, force=True))

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or bool(self._pending_outputs)

    def get_num_unfinished_requests(self) -> int:
        return len(self.requests)

    # ---- one step ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        t0 = time.perf_counter()
        if self.lora_manager is not None:
            self._poll_lora()
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        sched = self.scheduler.schedule()
        if self.lora_manager is not None and not sched.is_empty:
            self.lora_manager.activate(
                (s.seq.lora_key for s in sched.scheduled), self.scheduler.running
            )
        if sched.is_empty:
            if self.lora_manager is not None and self.lora_manager.loading:
                # Only requests whose adapter is still being read: wait for it, not spin.
                self.lora_manager.wait_for_load(timeout=0.05)
                self._update_stats(sched, 0.0)
                return outputs
            if self.scheduler.has_unfinished() and not self.scheduler.running:
                # Impossible with a pool of at least max_model_len tokens; fail loudly if it does.
                raise RuntimeError("scheduler made no progress with requests waiting")
            self._update_stats(sched, 0.0)
            return outputs
        now = time.monotonic()
        for s in sched.scheduled:
            st = self._seqs[s.seq.seq_id]
            if st.metrics.first_scheduled_time is None:
                st.metrics.first_scheduled_time = now
                st.metrics.num_cached_tokens = s.seq.num_cached_tokens
        decode_tokens, prefill_tokens = sched.num_decode_tokens, sched.num_prefill_tokens
        t_exec = time.perf_counter()
        results = self.model_runner.execute(sched)
        t_exec = time.perf_counter() - t_exec
        self.scheduler.update(sched)

        now = time.monotonic()
        touched: dict[str, _RequestState] = {}
        for seq_id, tokens in results.items():
            state = self._seqs[seq_id]
            seq_state = next(s for s in state.seqs if s.seq.seq_id == seq_id)
            for result in tokens:  # more than one when drafts were accepted
                self._append_token(state, seq_state, result, now)
                if seq_state.seq.is_finished:
                    break
            touched[state.request_id] = state
        if self.speculator is not None:
            self._after_verification(sched, results, t_exec)
        for state in touched.values():
            if state.finished:
                state.metrics.finished_time = now
            out = self._make_output(state)
            if out is not None:
                outputs.append(out)
            if state.finished:
                self.requests.pop(state.request_id, None)
                for s in state.seqs:
                    self._seqs.pop(s.seq.seq_id, None)
        self.stats.step_prefill_tokens = prefill_tokens
        self.stats.step_decode_tokens = decode_tokens
        self._update_stats(sched, time.perf_counter() - t0)
        return outputs

    def _after_verification(
        self, sched: SchedulerOutput, results: dict[int, list[SampleResult]], seconds: float
    ) -> None:
        """Accepted drafts' K/V were computed in this step: count them computed (and offer their
        full blocks to the prefix cache); free the blocks only rejected drafts used."""
        assert self.speculator is not None
        if not sched.num_prefill_tokens:
            # Decode and verify steps only: per token, a long prefill chunk is far cheaper than
            # the few rows a draft adds, and fitting both would make drafts look nearly free.
            self.speculator.observe_step(sched.num_batched_tokens, seconds)
        for s in sched.scheduled:
            seq, num_drafts = s.seq, len(s.spec_token_ids)
            seq.spec_token_ids = []
            if not num_drafts or seq.seq_id not in results:
                continue
            accepted = len(results[seq.seq_id]) - 1
            self.speculator.on_verified(seq, num_drafts, accepted)
            if seq.is_finished:
                continue
            seq.num_computed_tokens += accepted
            self.block_manager.cache_full_blocks(seq)
            self.block_manager.trim(seq, len(seq))

    def _update_stats(self, sched: SchedulerOutput, step_time: float) -> None:
        st = self.stats
        st.num_running = self.scheduler.num_running
        st.num_waiting = self.scheduler.num_waiting
        st.kv_cache_usage = self.block_manager.usage
        st.prefix_cache_queries = self.block_manager.prefix_cache_queries
        st.prefix_cache_hits = self.block_manager.prefix_cache_hits
        st.num_preemptions = self.scheduler.num_preemptions
        if self.speculator is not None:
            sd = self.speculator.stats
            st.spec_num_drafts, st.spec_num_draft_tokens = sd.num_drafts, sd.num_draft_tokens
            st.spec_num_accepted_tokens = sd.num_accepted_tokens
            st.spec_accepted_per_pos = tuple(sd.accepted_per_pos)
        if self.lora_manager is not None:
            st.running_lora_adapters = self.lora_manager.names(self.scheduler.running)
            st.waiting_lora_adapters = self.lora_manager.names(self.scheduler.waiting)
        if not sched.is_empty:
            st.num_steps += 1
            st.step_time = step_time
            st.step_num_seqs = len(sched.scheduled)

    def _append_token(
        self, state: _RequestState, ss: _SeqState, result: SampleResult, now: float
    ) -> None:
        seq, params = ss.seq, state.params
        token = result.token_id
        seq.token_ids.append(token)
        grammar_done = False
        if seq.grammar is not None:
            # A refusal means the mask let a token through that the grammar does not take; end
            # the sequence rather than go on producing output that cannot match.
            accepted = seq.grammar.accept_token(token)
            if not accepted:
                logger.warning("request %s: token %d outside its grammar", seq.request_id, token)
            grammar_done = not accepted or seq.grammar.is_terminated
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = now
        state.metrics.last_token_time = now
        if ss.logprobs is not None and result.logprob is not None:
            entry = {
                tid: Logprob(lp, rank + 1, self.tokenizer.decode([tid], skip_special_tokens=False))
                for rank, (tid, lp) in enumerate(result.top_logprobs or [])
            }
            entry.setdefault(
                token,
                Logprob(
                    result.logprob,
                    result.sampled_rank or 0,
                    self.tokenizer.decode([token], skip_special_tokens=False),
                ),
            )
            ss.logprobs.append(entry)
            ss.cumulative_logprob = (ss.cumulative_logprob or 0.0) + result.logprob

        old_len = len(ss.text)
        ss.text += ss.detok.add(token)
        n_out = seq.num_output_tokens
        status: SequenceStatus | None = None
        if n_out >= params.min_tokens:
            if not params.ignore_eos and token in self.model_config.eos_token_ids:
                status = SequenceStatus.FINISHED_STOPPED
            elif token in params.stop_token_ids:
                status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, token
        if status is None and grammar_done:
            status = SequenceStatus.FINISHED_STOPPED
        if status is None and (n_out >= params.max_tokens or len(seq) >= self.max_model_len):
            status = SequenceStatus.FINISHED_LENGTH
        if status is not None:
            ss.text += ss.detok.flush()
        if params.stop and n_out >= params.min_tokens:
            hit = self._find_stop(ss.text, old_len, params)
            if hit is not None:
                cut, stop = hit
                ss.text = ss.text[:cut]
                status, seq.stop_reason = SequenceStatus.FINISHED_STOPPED, stop
        if status is not None:
            self.scheduler.finish(seq, status)
            self.model_runner.release(seq)
            if self.speculator is not None:
                self.speculator.on_finished(seq)

    @staticmethod
    def _find_stop(text: str, old_len: int, params: SamplingParams) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in params.stop:
            # Only the new text and the tail that a stop string could straddle need searching.
            idx = text.find(stop, max(0, old_len - len(stop) + 1))
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return None
        idx, stop = best
        return (idx + len(stop) if params.include_stop_str_in_output else idx), stop

    def _make_output(self, state: _RequestState, force: bool = False) -> RequestOutput | None:
        kind = state.params.output_kind
        finished = state.finished or force
        if kind is RequestOutputKind.FINAL_ONLY and not finished:
            return None
        if state.final_sent:
            return None
        completions: list[CompletionOutput] = []
        for ss in state.seqs:
            seq = ss.seq
            done = seq.is_finished or force
            visible = ss.text if done else ss.text[: max(0, len(ss.text) - state.hold)]
            out_ids = seq.output_token_ids
            reason = seq.status.value if seq.is_finished else ("abort" if force else None)
            if kind is RequestOutputKind.DELTA:
                text, ids = visible[ss.sent_text :], out_ids[ss.sent_tokens :]
                lps = ss.logprobs[ss.sent_tokens :] if ss.logprobs is not None else None
                if not text and not ids and (reason is None or ss.finish_sent):
                    continue
                ss.sent_text, ss.sent_tokens = len(visible), len(out_ids)
                ss.finish_sent = reason is not None
            else:
                text, ids, lps = visible, list(out_ids), ss.logprobs
            completions.append(
                CompletionOutput(
                    index=seq.index,
                    text=text,
                    token_ids=ids,
                    cumulative_logprob=ss.cumulative_logprob,
                    logprobs=lps,
                    finish_reason=reason,
                    stop_reason=seq.stop_reason,
                )
            )
        if finished:
            state.final_sent = True
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=completions,
            finished=finished,
            metrics=state.metrics,
            num_cached_tokens=state.metrics.num_cached_tokens,
            lora_request=state.lora_request,
        )

    # ---- scoring -----------------------------------------------------------------------------
    def score(self, token_ids: list[int], lora_request: LoRARequest | None = None) -> torch.Tensor:
        """Logits at every position of `token_ids` ([len, vocab], float32), computed through the
        paged cache in chunks of max_num_batched_tokens. For perplexity and the oracle tests.
        `lora_request`: on that adapter (loaded now if it is not; it takes a free slot)."""
        self._validate(token_ids, SamplingParams(max_tokens=None))
        lora_key = 0
        if lora_request is not None:
            self.add_lora(lora_request)
            assert self.lora_manager is not None
            lora_key = self.lora_manager.key_for(lora_request)
            self.lora_manager.activate([lora_key], self.scheduler.running)
        seq = Sequence(
            seq_id=next(self._seq_ids),
            request_id="__score__",
            index=0,
            token_ids=list(token_ids),
            num_prompt_tokens=len(token_ids),
            sampling_params=SamplingParams(),
            lora_key=lora_key,
        )
        chunks: list[torch.Tensor] = []
        try:
            while seq.num_computed_tokens < len(seq):
                n = min(self.args.max_num_batched_tokens, len(seq) - seq.num_computed_tokens)
                if not self.block_manager.allocate_slots(seq, n):
                    raise RuntimeError("not enough free KV blocks to score this sequence now")
                out = SchedulerOutput(scheduled=[ScheduledSeq(seq, n)])
                chunks.append(self.model_runner.all_logits(out).float())
                seq.num_computed_tokens += n
        finally:
            self.block_manager.free(seq)
        return torch.cat(chunks)

    def check_no_leaks(self) -> None:
        """With no requests left, every block must be back on the free list."""
        assert not self.scheduler.has_unfinished(), "requests are still queued"
        free = self.block_manager.num_free_blocks
        assert free == self.num_blocks, f"{self.num_blocks - free} KV blocks leaked"
        self.block_manager.check_invariants([])
