"""The router's small parts without a network: admission queue, what is read of a response,
shadow agreement scores, request parsing, engine load parsing."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from kvpilot_operator.router.admission import Admission, Rejected
from kvpilot_operator.router.discovery import parse_load
from kvpilot_operator.router.proxy import parse_request
from kvpilot_operator.router.shadow import TokenBucket, agreement, overlap_f1
from kvpilot_operator.router.sse import MAX_CAPTURE, ResponseReader


def test_admission_is_bounded_fifo_and_waits_for_endpoints() -> None:
    async def main() -> None:
        routable = [True]
        adm = Admission(max_in_flight=1, max_queue=2, can_route=lambda: routable[0])
        await adm.admit(1.0)  # the one slot
        order: list[str] = []

        async def waiter(name: str) -> None:
            await adm.admit(5.0)
            order.append(name)

        w1 = asyncio.create_task(waiter("first"))
        await asyncio.sleep(0)
        w2 = asyncio.create_task(waiter("second"))
        await asyncio.sleep(0)
        assert adm.waiting == 2
        with pytest.raises(Rejected) as full:
            await adm.admit(1.0)
        assert full.value.reason == "queue_full"
        adm.release()
        for _ in range(5):  # a few loop turns for the granted waiter to run
            await asyncio.sleep(0)
        assert order == ["first"] and adm.in_flight == 1
        adm.release()
        await asyncio.gather(w1, w2)
        assert order == ["first", "second"]
        adm.release()

        # No endpoint at all: requests wait (scale from zero), then time out...
        routable[0] = False
        with pytest.raises(Rejected) as late:
            await adm.admit(0.05)
        assert late.value.reason == "queue_timeout" and adm.waiting == 0
        # ...or are let through the moment one appears.
        pending = asyncio.create_task(adm.admit(5.0))
        await asyncio.sleep(0.01)
        assert adm.waiting == 1
        routable[0] = True
        adm.wake()
        await pending
        assert adm.in_flight == 1 and adm.waiting == 0

        # A waiter whose client leaves gives up its place.
        gone = asyncio.create_task(adm.admit(5.0))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert adm.waiting == 0 and adm.in_flight == 1

    asyncio.run(main())


def sse(*payloads: object) -> bytes:
    return b"".join(
        b"data: " + (p if isinstance(p, bytes) else json.dumps(p).encode()) + b"\n\n"
        for p in payloads
    )


def chat_chunk(content: str | None, role: str | None = None) -> dict:
    return {"choices": [{"index": 0, "delta": {"role": role, "content": content}}]}


def test_reader_times_text_events_only_and_keeps_the_text() -> None:
    stream = sse(
        chat_chunk("", role="assistant"),  # the role-only opener carries no text
        chat_chunk("Hel"),
        chat_chunk("lo"),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        b"[DONE]",
    )
    r = ResponseReader(sse=True, keep_text=True)
    for i in range(0, len(stream), 7):  # events split across chunks anywhere
        r.feed(stream[i : i + 7], now=float(i))
    assert r.text_events == 2 and r.first_text is not None and r.last_text is not None
    assert r.first_text < r.last_text
    assert r.texts() == {0: "Hello"}

    crlf = ResponseReader(sse=True, keep_text=True)
    crlf.feed(b'data: {"choices": [{"index": 1, "text": "x y"}]}\r\n\r\n', 1.0)
    assert crlf.texts() == {1: "x y"} and crlf.first_text == 1.0

    whole = ResponseReader(sse=False, keep_text=True)
    body = json.dumps({"choices": [{"index": 0, "message": {"content": "a b c"}}]}).encode()
    whole.feed(body[:5], 0.0)
    whole.feed(body[5:], 0.0)
    assert whole.texts() == {0: "a b c"} and whole.first_text is None

    big = ResponseReader(sse=False, keep_text=True)
    big.feed(b"x" * (MAX_CAPTURE + 1), 0.0)
    assert big.texts() is None  # too big to keep: not compared
    assert ResponseReader(sse=True, keep_text=False).texts() is None


def test_overlap_f1_and_agreement() -> None:
    assert overlap_f1("the cat sat", "the cat sat") == 1.0
    assert overlap_f1("a b", "c d") == 0.0
    assert overlap_f1("", "") == 1.0 and overlap_f1("a", "") == 0.0
    assert overlap_f1("a a b", "a b b") == pytest.approx(2 / 3)  # multisets: one "a", one "b"
    assert agreement({0: "x y"}, {0: "x y"}) == (True, 1.0)
    exact, f1 = agreement({0: "x y", 1: "z"}, {0: "x y"})
    assert not exact and f1 == pytest.approx(0.5)


def test_token_bucket_caps_the_rate() -> None:
    now = [0.0]
    bucket = TokenBucket(2.0, clock=lambda: now[0])
    assert [bucket.take() for _ in range(3)] == [True, True, False]  # a one-second burst
    now[0] += 0.5
    assert bucket.take() and not bucket.take()


def test_parse_request_reads_only_what_routing_needs() -> None:
    chat = parse_request(
        json.dumps(
            {
                "model": "m",
                "stream": True,
                "temperature": 0,
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                ],
            }
        ).encode()
    )
    assert chat.stream and chat.greedy and chat.prompt == "system:Be brief.\nuser:Hi\n"
    comp = parse_request(b'{"prompt": ["once"], "top_k": 1}')
    assert comp.prompt == "once" and comp.greedy and not comp.stream
    assert not parse_request(b'{"prompt": [1, 2, 3], "temperature": 0.7}').greedy
    for bad in (b"", b"{", b"[1]", b"\xff"):
        with pytest.raises(ValueError):
            parse_request(bad)


def test_parse_load_reads_kv_usage_and_queue() -> None:
    text = (
        "# HELP vllm:kv_cache_usage_perc KV\n# TYPE vllm:kv_cache_usage_perc gauge\n"
        'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{model_name="m"} 3.0\n'
        'vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 5.0\n'
    )
    assert parse_load(text) == (0.25, 3.0)
    assert parse_load("") == (None, None)


@pytest.mark.slow
def test_the_router_never_imports_torch_or_the_engine() -> None:
    """The router ships in the operator image, which has no torch."""
    code = (
        "import json, sys, kvpilot_engine.cli, kvpilot_operator.router.server, "
        "kvpilot_operator.router.bench, kvpilot_operator.router.batch.bench\n"
        "engine = sorted(m for m in sys.modules if m.startswith('kvpilot_engine.'))\n"
        "print(json.dumps({'torch': 'torch' in sys.modules, 'engine': engine}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    loaded = json.loads(out)
    assert loaded["torch"] is False
    # None of these imports torch: logs, the HTTP protocol, the batch file format.
    allowed = {"cli", "config", "server", "contracts", "server.logs", "server.http"}
    allowed |= {"batch", "batch.protocol"}
    assert set(loaded["engine"]) <= {f"kvpilot_engine.{m}" for m in allowed}, loaded
