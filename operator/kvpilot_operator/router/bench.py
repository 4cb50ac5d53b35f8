"""`kvpilot bench router`: what the router costs.

1. Added latency: the same streaming requests go straight to an engine and through a router in
   front of it, interleaved pair by pair (alternating which goes first), so that both paths see
   the same engine, cache and CPU state. TTFT is the first SSE event that carries text.
2. Most requests/s: the router in front of a trivial upstream (in this process) that answers a
   fixed completion at once, driven by a raw keep-alive HTTP/1.1 client, so that the router, not
   the engine or the load generator, is the bottleneck.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from kvpilot_operator.router.sse import choice_texts

WORDS = [
    "the",
    "quick",
    "brown",
    "fox",
    "jumps",
    "over",
    "a",
    "lazy",
    "dog",
    "while",
    "seven",
    "wise",
    "owls",
    "watch",
]
_TRIVIAL_BODY = json.dumps(
    {
        "id": "cmpl-bench",
        "object": "text_completion",
        "created": 0,
        "model": "trivial",
        "choices": [{"index": 0, "text": " ok", "finish_reason": "length", "logprobs": None}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
).encode()
_TRIVIAL_RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
    b"content-length: " + str(len(_TRIVIAL_BODY)).encode() + b"\r\n\r\n" + _TRIVIAL_BODY
)


# ---- processes ----------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url} exited {proc.returncode}; see {log}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s; see {log}")


@contextlib.contextmanager
def kvpilot_process(args: list[str], log: Path, port: int, timeout: float) -> Iterator[str]:
    """`kvpilot ARGS` on loopback until the block ends; yields its URL."""
    cmd = [sys.executable, "-m", "kvpilot_engine.cli", *args, "--host", "127.0.0.1"]
    with log.open("wb") as out:
        proc = subprocess.Popen([*cmd, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log, timeout)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def router_process(
    tmp: Path, name: str, upstream: str, *flags: str
) -> contextlib.AbstractContextManager[str]:
    """`kvpilot router FLAGS` in front of one upstream, with a route file in `tmp`."""
    routes = {
        "service": "bench",
        "revisions": [{"name": name, "weight": 1}],
        "endpoints": [{"url": upstream, "revision": name}],
    }
    config = tmp / f"routes-{name}.json"
    config.write_text(json.dumps(routes))
    args = ["router", "--config", str(config), *flags]
    return kvpilot_process(args, tmp / f"router-{name}.log", free_port(), timeout=60)


# ---- 1. added latency ---------------------------------------------------------------------------
@dataclass
class Timing:
    ttft: float
    e2e: float


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> Timing:
    t0 = time.perf_counter()
    ttft = None
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if ttft is None and line.startswith("data: {") and choice_texts(json.loads(line[6:])):
                ttft = time.perf_counter() - t0
    e2e = time.perf_counter() - t0
    return Timing(e2e if ttft is None else ttft, e2e)


async def _latency(
    engine: str, router: str, model: str, ns: argparse.Namespace
) -> list[dict[str, Timing]]:
    prompt = " ".join(WORDS[i % len(WORDS)] for i in range(ns.prompt_words))
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": ns.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    out: list[dict[str, Timing]] = []
    limits = httpx.Limits(max_connections=2 * ns.concurrency)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        for url in (engine, router, engine, router):  # warm up connections and the engine
            await stream_chat(client, url, body)
        pairs = iter(range(ns.num_requests))
        bar = tqdm(total=ns.num_requests, desc="request pairs", unit="pair")

        async def worker() -> None:
            for i in pairs:
                pair: dict[str, Timing] = {}
                for path in ("direct", "router") if i % 2 == 0 else ("router", "direct"):
                    target = engine if path == "direct" else router
                    pair[path] = await stream_chat(client, target, body)
                out.append(pair)
                bar.update()

        await asyncio.gather(*(worker() for _ in range(ns.concurrency)))
        bar.close()
    return out


# ---- 2. most requests/s -------------------------------------------------------------------------
async def _trivial_upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Any request, one fixed completion, at once (HTTP/1.1 keep-alive)."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            writer.write(_TRIVIAL_RESPONSE)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


async def _raw_client(port: int, request: bytes, todo: list[int], bar: tqdm) -> tuple[int, int]:
    """One keep-alive connection sending requests while any are left; (ok, failed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ok = failed = 0
    try:
        while todo:
            todo.pop()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 200"):
                ok += 1
            else:
                failed += 1
            bar.update()
    finally:
        writer.close()
    return ok, failed


async def _throughput(tmp: Path, ns: argparse.Namespace) -> dict[str, Any]:
    server = await asyncio.start_server(_trivial_upstream, "127.0.0.1", 0)
    upstream = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    body = b'{"model": "trivial", "prompt": "hi", "max_tokens": 1}'
    async with server:
        with router_process(tmp, "trivial", upstream) as router:
            port = int(router.rsplit(":", 1)[1])
            request = (
                b"POST /v1/completions HTTP/1.1\r\nhost: bench\r\n"
                b"content-type: application/json\r\ncontent-length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            warm = list(range(200))
            with tqdm(total=len(warm), desc="warm-up", unit="req", leave=False) as bar:
                await asyncio.gather(*(_raw_client(port, request, warm, bar) for _ in range(8)))
            todo = list(range(ns.trivial_requests))
            with tqdm(total=len(todo), desc="trivial upstream", unit="req") as bar:
                t0 = time.perf_counter()
                results = await asyncio.gather(
                    *(_raw_client(port, request, todo, bar) for _ in range(ns.trivial_concurrency))
                )
                elapsed = time.perf_counter() - t0
        await asyncio.sleep(0.2)  # the router is gone: let its upstream connections close here
    ok = sum(r[0] for r in results)
    return {
        "requests": ns.trivial_requests,
        "connections": ns.trivial_concurrency,
        "ok": ok,
        "failed": sum(r[1] for r in results),
        "seconds": elapsed,
        "requests_per_s": ok / elapsed,
    }


# ---- the report ---------------------------------------------------------------------------------
def _ms(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000


def engine_url(ns: argparse.Namespace, stack: contextlib.ExitStack, tmp: Path) -> str:
    """`--engine-url`, or a `kvpilot serve MODEL [--engine-arg ...]` started on loopback for
    the length of `stack`."""
    if ns.engine_url is not None:
        return str(ns.engine_url)
    print(f"starting `kvpilot serve {ns.model}` ...", file=sys.stderr)
    return str(
        stack.enter_context(
            kvpilot_process(
                ["serve", ns.model, *ns.engine_arg], tmp / "engine.log", free_port(), timeout=900
            )
        )
    )


def run_router_bench(ns: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="kvpilot-bench-router-") as scratch:
        tmp = Path(scratch)
        with contextlib.ExitStack() as stack:
            engine = engine_url(ns, stack, tmp)
            engine = engine.rstrip("/")
            model = httpx.get(f"{engine}/v1/models", timeout=30).json()["data"][0]["id"]
            router = stack.enter_context(router_process(tmp, "engine", engine))
            timings = asyncio.run(_latency(engine, router, model, ns))
        throughput = asyncio.run(_throughput(tmp, ns))

    figures: dict[str, Any] = {
        "engine": engine,
        "model": model,
        "num_request_pairs": ns.num_requests,
        "concurrency": ns.concurrency,
        "max_tokens": ns.max_tokens,
        "prompt_words": ns.prompt_words,
        "cpu_count": os.cpu_count(),
    }
    print()
    print(
        f"kvpilot bench router: {ns.num_requests} streamed chat requests per path "
        f"(max_tokens {ns.max_tokens}, {ns.prompt_words}-word prompt, concurrency "
        f"{ns.concurrency}), direct and through the router, interleaved per pair"
    )
    print(f"engine {engine} ({model})")
    print()
    print(
        "| ms   | direct p50 | router p50 | added p50 | direct p99 | router p99 | added p99 "
        "| paired added p50 |"
    )
    print("|------|" + "-----------:|" * 6 + "-----------------:|")
    for metric in ("ttft", "e2e"):
        row: dict[str, float] = {}
        for path in ("direct", "router"):
            values = [getattr(pair[path], metric) for pair in timings]
            row[f"{path}_p50_ms"], row[f"{path}_p99_ms"] = _ms(values, 50), _ms(values, 99)
        row["added_p50_ms"] = row["router_p50_ms"] - row["direct_p50_ms"]
        row["added_p99_ms"] = row["router_p99_ms"] - row["direct_p99_ms"]
        # Per pair, router minus direct: engine noise common to both requests cancels.
        added = [getattr(p["router"], metric) - getattr(p["direct"], metric) for p in timings]
        row["paired_added_p50_ms"] = _ms(added, 50)
        figures[metric] = row
        print(
            f"| {metric.upper():<4} | {row['direct_p50_ms']:10.2f} | {row['router_p50_ms']:10.2f} "
            f"| {row['added_p50_ms']:9.2f} | {row['direct_p99_ms']:10.2f} "
            f"| {row['router_p99_ms']:10.2f} | {row['added_p99_ms']:9.2f} "
            f"| {row['paired_added_p50_ms']:16.2f} |"
        )
    figures["trivial_upstream"] = throughput
    print()
    print(
        f"router max throughput: {throughput['requests_per_s']:.0f} requests/s "
        f"({throughput['ok']} ok, {throughput['failed']} failed, "
        f"{throughput['connections']} keep-alive connections, {throughput['seconds']:.1f} s)"
    )
    print(
        "  against a trivial in-process upstream that answers a fixed completion at once: the "
        "router (one process, one core) is the bottleneck, not the engine"
    )
    if ns.json:
        Path(ns.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {ns.json}")
    return 0 if throughput["failed"] == 0 else 1
