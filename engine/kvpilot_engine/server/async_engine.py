"""AsyncLLMEngine: the LLMEngine loop on its own thread, driven from asyncio.

LLMEngine is not thread-safe, so one thread owns it: it builds it, warms it up, and then loops,
taking commands (add, abort) from a queue and stepping while there is work. Outputs travel back
to the event loop through `call_soon_threadsafe` into one asyncio queue per request. The event
loop never blocks on the model, and a step never waits on a slow client.

Admission is bounded: past `max_waiting` requests not yet running, `add_request` raises
EngineOverloadedError at once (the server answers 503) instead of growing an unbounded queue.
Several requests can be submitted as one (`add_requests`: a completion with several prompts):
they are admitted or refused together, in one engine iteration, and share one stream.

LoRA adapters are added and removed by commands too (`add_lora`, `remove_lora`), between two
steps; the adapters given at start (`kvpilot serve --lora-modules`) are added before the engine
reports ready.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from kvpilot_engine.llm_engine import LLMEngine
from kvpilot_engine.lora.request import LoRARequest
from kvpilot_engine.outputs import RequestOutput
from kvpilot_engine.sampling_params import RequestOutputKind, SamplingParams
from kvpilot_engine.server.metrics import ServerMetrics

logger = logging.getLogger("kvpilot.server")

IDLE_POLL_S = 0.5  # how often an idle engine thread wakes to check for shutdown


class EngineOverloadedError(RuntimeError):
    """Too many requests waiting; retry after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after


class EngineUnavailableError(RuntimeError):
    """Not serving now: still loading, draining for shutdown, or dead."""


@dataclass
class _Add:
    stream: RequestStream  # its request_ids, one per prompt
    prompts: list[str | list[int]]
    params: list[SamplingParams]
    priority: int
    arrival_time: float
    lora_request: LoRARequest | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _LoRACommand:
    """LLMEngine.add_lora or remove_lora, called on the engine thread; the result (or the error)
    goes back to `future` on its event loop."""

    call: Callable[[LLMEngine], object]
    future: asyncio.Future[object]

    def settle(self, result: object, error: BaseException | None = None) -> None:
        self.future.get_loop().call_soon_threadsafe(_settle_future, self.future, result, error)


_STOP = object()


class RequestStream:
    """The outputs of the requests submitted together (usually one), in the order the engine made
    them; it ends after each request's final output (the one with `finished` set)."""

    def __init__(
        self, engine: AsyncLLMEngine, request_ids: list[str], loop: asyncio.AbstractEventLoop
    ):
        self.request_ids = request_ids
        self._unfinished = set(request_ids)
        self._engine = engine
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.accepted: asyncio.Future[None] = loop.create_future()
        self.finished = False

    # -- engine thread side
    def settle(self, error: BaseException | None) -> None:
        self._loop.call_soon_threadsafe(self._settle, error)

    def put(self, item: RequestOutput | BaseException) -> None:
        self._loop.call_soon_threadsafe(self._put, item)

    # -- event loop side
    def _settle(self, error: BaseException | None) -> None:
        if error is not None:
            self._engine._inflight.difference_update(self.request_ids)
        if self.accepted.done():  # the caller went away while waiting
            return
        if error is None:
            self.accepted.set_result(None)
        else:
            self.accepted.set_exception(error)

    def _put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self._engine._inflight.difference_update(self.request_ids)
        elif item.finished:
            self._engine._inflight.discard(item.request_id)
        self._queue.put_nowait(item)

    def cancel(self) -> None:
        """Abort the requests not yet finished (safe to call more than once)."""
        if not self.finished:
            self.finished = True
            for rid in self._unfinished:
                self._engine.abort(rid)

    async def outputs(self) -> AsyncIterator[RequestOutput]:
        """Iterate until the final output. Leaving early (the client disconnected, the task was
        cancelled) aborts the request, which frees its KV blocks at once."""
        try:
            while True:
                item = await self._queue.get()
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished:
                    self._unfinished.discard(item.request_id)
                self.finished = not self._unfinished
                yield item
                if self.finished:
                    return
        finally:
            self.cancel()


class AsyncLLMEngine:
    def __init__(
        self,
        factory: Callable[[], LLMEngine],
        metrics: ServerMetrics | None = None,
        max_waiting: int = 256,
        inject_step_delay: float = 0.0,
        lora_modules: list[LoRARequest] | None = None,
    ):
        if max_waiting < 1:
            raise ValueError("max_waiting must be at least 1")
        if inject_step_delay < 0:
            raise ValueError("inject_step_delay must not be negative")
        self._factory = factory
        self._lora_modules = list(lora_modules or ())  # added before the engine is ready
        # Fault injection (`kvpilot serve --inject-step-delay`): a slow engine on demand, so that
        # canary analysis and the router's timeouts can be tested against a real engine.
        self.inject_step_delay = inject_step_delay
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.engine: LLMEngine | None = None  # read-only from the event loop (config, tokenizer)
        self.error: BaseException | None = None
        self.draining = False
        self.on_fatal: Callable[[BaseException], None] | None = None
        self._commands: queue.Queue[object] = queue.Queue()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inflight: set[str] = set()  # event loop side: requests not yet finished
        # Admission counters, shared by both threads under the lock.
        self._lock = threading.Lock()
        self._pending = 0  # submitted, not yet taken in by the engine thread
        self._engine_waiting = 0  # the scheduler's waiting queue, as of the last iteration

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # A daemon thread: a wedged model must not keep the process alive past shutdown.
        self._thread = threading.Thread(target=self._run, name="kvpilot-engine", daemon=True)
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self.error is None

    @property
    def alive(self) -> bool:
        return self.error is None and (self._thread is None or self._thread.is_alive())

    @property
    def num_waiting(self) -> int:
        with self._lock:
            return self._pending + self._engine_waiting

    async def drain(self, timeout: float) -> None:
        """Stop admitting; let in-flight requests finish for up to `timeout` seconds, then abort
        the rest (their streams end with finish_reason "abort")."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._inflight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self._inflight:
            logger.warning("drain timeout: aborting %d requests", len(self._inflight))
            for rid in list(self._inflight):
                self.abort(rid)
            end = loop.time() + 5.0
            while self._inflight and loop.time() < end and self.alive:
                await asyncio.sleep(0.05)

    def shutdown(self, timeout: float = 5.0) -> None:
        self._commands.put(_STOP)
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- requests (event loop) ---------------------------------------------------------------
    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """Queue a request; returns once the engine accepted it. Raises InvalidRequestError (the
        engine refused it), EngineOverloadedError or EngineUnavailableError."""
        return await self.add_requests(
            [request_id], [prompt], [params], priority, arrival_time, lora_request
        )

    async def add_requests(
        self,
        request_ids: list[str],
        prompts: list[str | list[int]],
        params: list[SamplingParams],
        priority: int = 0,
        arrival_time: float | None = None,
        lora_request: LoRARequest | None = None,
    ) -> RequestStream:
        """Queue several requests as one, like the `n` sequences of one request: admitted
        together (one admission check, one engine iteration), or all refused if the engine
        refuses any. Each needs its own SamplingParams (the engine fills in max_tokens).
        With `lora_request` they all run on that adapter."""
        if not len(request_ids) == len(prompts) == len(params) > 0:
            raise ValueError("give one request id and one SamplingParams per prompt")
        if len({id(p) for p in params}) < len(params):
            raise ValueError("each request needs its own SamplingParams object")
        if self.error is not None:
            raise EngineUnavailableError("the engine has failed; see the server log")
        if not self.ready:
            raise EngineUnavailableError("the model is still loading")
        if self.draining:
            raise EngineUnavailableError("the server is shutting down")
        with self._lock:
            if self._pending + self._engine_waiting >= self.max_waiting:
                raise EngineOverloadedError(
                    f"too many requests waiting ({self.max_waiting}); retry later"
                )
            self._pending += len(request_ids)
        for p in params:
            p.output_kind = RequestOutputKind.DELTA
        stream = RequestStream(self, list(request_ids), asyncio.get_running_loop())
        self._inflight.update(request_ids)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        self._commands.put(
            _Add(stream, list(prompts), list(params), priority, arrival, lora_request)
        )
        try:
            await stream.accepted
        except asyncio.CancelledError:
            for rid in request_ids:  # they may have been added meanwhile: the queue keeps order
                self.abort(rid)
            raise
        return stream

    async def generate(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """RequestOutputs (deltas) of one request; closing the iterator early aborts it."""
        stream = await self.add_request(request_id, prompt, params, priority, arrival_time)
        try:
            async for out in stream.outputs():
                yield out
        finally:
            stream.cancel()  # closed early: do not wait for the inner iterator to be collected

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # ---- LoRA adapters (event loop) ----------------------------------------------------------
    async def add_lora(self, lora_request: LoRARequest) -> bool:
        """Add an adapter (LLMEngine.add_lora; raises its LoRAError; False if it was there).
        Its files are read and checked here on a worker thread, so the engine thread, between
        two steps, only takes the tensors in: running requests do not wait on a disk."""
        llm = self.engine
        adapter = None
        if llm is not None and llm.args.enable_lora:
            from kvpilot_engine.lora.adapter import load_adapter

            adapter = await asyncio.to_thread(
                load_adapter, lora_request, llm.model_config, llm.args.max_lora_rank
            )
        return bool(await self._lora_command(lambda e: e.add_lora(lora_request, adapter)))

    async def remove_lora(self, lora_int_id: int) -> bool:
        return bool(await self._lora_command(lambda e: e.remove_lora(lora_int_id)))

    async def _lora_command(self, call: Callable[[LLMEngine], object]) -> object:
        if self.error is not None:
            raise EngineUnavailableError("the engine has failed; see the server log")
        if not self.ready:
            raise EngineUnavailableError("the model is still loading")
        cmd = _LoRACommand(call, asyncio.get_running_loop().create_future())
        self._commands.put(cmd)
        return await cmd.future

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        try:
            engine = self._factory()
            self._warmup(engine)
            for lora in self._lora_modules:
                engine.add_lora(lora)  # a LoRAError here stops the server, as vLLM's does
                logger.info("lora adapter %s added from %s", lora.lora_name, lora.lora_path)
        except BaseException as e:
            logger.exception("engine failed to start")
            self._fail(e)
            return
        self.engine = engine
        if self.metrics is not None:
            self.metrics.set_cache_config(
                engine.args.block_size,
                engine.num_blocks,
                engine.args.enable_prefix_caching,
                str(engine.dtype).removeprefix("torch."),
            )
            self.metrics.set_engine_info(
                engine.args.quantization,
                engine.args.tensor_parallel_size,
                str(engine.dtype).removeprefix("torch."),
                engine.weight_bytes,
            )
            self.metrics.baseline(engine.stats)  # the warmup is not traffic
            if engine.args.enable_lora:
                self.metrics.set_lora_config(engine.max_loras)
        self._ready.set()
        logger.info("engine ready")
        streams: dict[str, RequestStream] = {}
        last_token_time: dict[str, float | None] = {}
        try:
            while True:
                if not self._take_commands(engine, streams, last_token_time):
                    return
                stepped = engine.has_unfinished_requests()
                if stepped:
                    if self.inject_step_delay:
                        time.sleep(self.inject_step_delay)
                    self._dispatch(engine.step(), streams, last_token_time)
                with self._lock:
                    self._engine_waiting = engine.stats.num_waiting
                    pending = self._pending
                if self.metrics is not None:
                    self.metrics.on_step(engine.stats, pending, stepped)
        except BaseException as e:
            logger.exception("engine loop failed")
            for s in streams.values():
                s.put(e)
            self._fail(e)
        finally:
            engine.shutdown()  # tensor-parallel workers exit with the engine thread

    def _take_commands(
        self,
        engine: LLMEngine,
        streams: dict[str, RequestStream],
        last_token_time: dict[str, float | None],
    ) -> bool:
        """Apply queued commands; block for one when idle. False means stop."""
        cmds: list[object] = []
        if not engine.has_unfinished_requests():
            try:
                cmds.append(self._commands.get(timeout=IDLE_POLL_S))
            except queue.Empty:
                return True
        while True:
            try:
                cmds.append(self._commands.get_nowait())
            except queue.Empty:
                break
        added = 0
        for cmd in cmds:
            if cmd is _STOP:
                return False
            if isinstance(cmd, _Add):
                added += len(cmd.stream.request_ids)
                error = self._add_all(engine, cmd)
                if error is None:
                    for rid in cmd.stream.request_ids:
                        streams[rid] = cmd.stream
                        last_token_time[rid] = None
                cmd.stream.settle(error)
            elif isinstance(cmd, _Abort):
                engine.abort_request(cmd.request_id)
            elif isinstance(cmd, _LoRACommand):
                self._run_lora_command(engine, cmd)
        if added:
            with self._lock:
                # Count them as waiting in the engine before they stop counting as pending.
                self._engine_waiting = engine.scheduler.num_waiting
                self._pending -= added
        return True

    @staticmethod
    def _run_lora_command(engine: LLMEngine, cmd: _LoRACommand) -> None:
        try:
            result = cmd.call(engine)
        except Exception as e:  # LoRAError: the caller's 400
            cmd.settle(None, e)
            return
        cmd.settle(result)

    @staticmethod
    def _add_all(engine: LLMEngine, cmd: _Add) -> Exception | None:
        """Add every request of the command, or none: when the engine refuses one
        (InvalidRequestError / ValueError: the caller's 400), those already added are aborted
        before any step runs them. Returns the refusal."""
        added: list[str] = []
        try:
            for rid, prompt, params in zip(
                cmd.stream.request_ids, cmd.prompts, cmd.params, strict=True
            ):
                engine.add_request(
                    rid, prompt, params, cmd.priority, cmd.arrival_time, cmd.lora_request
                )
                added.append(rid)
        except Exception as e:
            if added:
                engine.abort_request(added)  # their final outputs go to no stream
            return e
        return None

    def _dispatch(
        self,
        outputs: list[RequestOutput],
        streams: dict[str, RequestStream],
        last_token_time: dict[str, float | None],
    ) -> None:
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is None:
                continue
            if self.metrics is not None:
                self.metrics.on_output(out, last_token_time.get(out.request_id))
            last_token_time[out.request_id] = out.metrics.last_token_time
            stream.put(out)
            if out.finished:
                streams.pop(out.request_id, None)
                last_token_time.pop(out.request_id, None)

    @staticmethod
    def _warmup(engine: LLMEngine) -> None:
        """One tiny generation, so the first user request does not pay for lazy init."""
        ids = engine.tokenizer.encode("Hello", add_special_tokens=False) or [0]
        engine.add_request("__warmup__", ids, SamplingParams(max_tokens=2, temperature=0.0))
        while engine.has_unfinished_requests():
            engine.step()

    def _fail(self, error: BaseException) -> None:
        self.error = error
        while True:  # nobody will take these in: answer their callers now
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(cmd, _Add):
                cmd.stream.settle(EngineUnavailableError("the engine has failed"))
            elif isinstance(cmd, _LoRACommand):
                cmd.settle(None, EngineUnavailableError("the engine has failed"))
        loop, cb = self._loop, self.on_fatal
        if loop is not None and cb is not None:
            loop.call_soon_threadsafe(cb, error)


def _settle_future(
    future: asyncio.Future[object], result: object, error: BaseException | None
) -> None:
    if future.done():  # the caller went away
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
