"""AsyncLLMEngine with several requests on one stream (a completion with several prompts):
admitted together or refused together, outputs interleaved until each request finished, and a
stream left early aborts every request still running. In-process, on the real SmolLM2."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from kvpilot_engine import SamplingParams
from kvpilot_engine.llm_engine import InvalidRequestError
from kvpilot_engine.server.async_engine import AsyncLLMEngine


@pytest.fixture(scope="module")
def llm(make_smollm2):
    return make_smollm2(max_model_len=256, kv_cache_memory="32MiB")


def _run(llm: Any, body: Callable[[AsyncLLMEngine], Awaitable[None]]) -> None:
    """Start an AsyncLLMEngine around the module's engine, run `body`, stop it; the engine must
    be left with no requests and every KV block free."""

    async def main() -> None:
        engine = AsyncLLMEngine(lambda: llm.llm_engine)
        engine.start()
        try:
            while not engine.ready:
                await asyncio.sleep(0.05)
            await body(engine)
            while engine._inflight:  # aborts travel through the engine thread
                await asyncio.sleep(0.05)
        finally:
            await asyncio.to_thread(engine.shutdown)

    asyncio.run(main())
    assert not llm.llm_engine.has_unfinished_requests()
    llm.llm_engine.check_no_leaks()


def _params(**kw: Any) -> SamplingParams:
    return SamplingParams(temperature=0.0, ignore_eos=True, **kw)


def test_requests_share_one_stream(llm) -> None:
    async def body(engine: AsyncLLMEngine) -> None:
        lengths = [3, 7]
        stream = await engine.add_requests(
            ["a", "b"], ["Hello", [504, 3575]], [_params(max_tokens=n) for n in lengths]
        )
        tokens: dict[str, int] = {"a": 0, "b": 0}
        finished: list[str] = []
        async for out in stream.outputs():
            tokens[out.request_id] += sum(len(c.token_ids) for c in out.outputs)
            if out.finished:
                finished.append(out.request_id)
        assert tokens == {"a": 3, "b": 7}
        assert finished == ["a", "b"] and stream.finished

    _run(llm, body)


def test_one_refused_refuses_all(llm) -> None:
    async def body(engine: AsyncLLMEngine) -> None:
        too_long = list(range(1, 300))  # past max_model_len=256
        with pytest.raises(InvalidRequestError) as e:
            await engine.add_requests(
                ["ok-0", "bad-1", "ok-2"],
                ["Hello", too_long, "Hi"],
                [_params(max_tokens=50) for _ in range(3)],
            )
        assert e.value.param == "prompt"
        # The first was added before the second was refused: it must be gone already, before
        # any step generated for it.
        assert llm.llm_engine.get_num_unfinished_requests() == 0
        assert not engine._inflight

    _run(llm, body)


def test_leaving_early_aborts_every_request(llm) -> None:
    async def body(engine: AsyncLLMEngine) -> None:
        stream = await engine.add_requests(
            ["x", "y", "z"],
            ["Tell a story", "Once", "Hi"],
            [_params(max_tokens=200) for _ in "xyz"],
        )
        async with contextlib.aclosing(stream.outputs()) as outputs:
            async for _ in outputs:
                break  # closing the iterator cancels the stream, as a client hanging up does
        assert stream.finished

    _run(llm, body)


def test_cancel_after_some_finished_aborts_the_rest(llm) -> None:
    async def body(engine: AsyncLLMEngine) -> None:
        stream = await engine.add_requests(
            ["short", "long"], ["Hi", "Tell a story"], [_params(max_tokens=n) for n in (1, 200)]
        )
        async for out in stream.outputs():
            if out.request_id == "short" and out.finished:
                stream.cancel()
                break
        assert stream.finished

    _run(llm, body)


def test_params_per_request_are_required(llm) -> None:
    async def body(engine: AsyncLLMEngine) -> None:
        with pytest.raises(ValueError):
            await engine.add_requests(["a", "b"], ["x", "y"], [_params(max_tokens=2)])
        shared = _params(max_tokens=None)  # the engine fills max_tokens in per prompt
        with pytest.raises(ValueError):
            await engine.add_requests(["a", "b"], ["x", "y"], [shared, shared])

    _run(llm, body)
