"""`kvpilot bench batch`: does an interactive load keep its TTFT SLO while a batch drains?

A steady interactive load (streaming chat requests: a fixed number in flight, or a fixed rate)
runs through a router first alone for `--duration` seconds, then again from the moment a batch
of short chat requests is created through the Batch API (the official `openai` client:
files.create, batches.create, then polling) until the batch is done. The report holds the two
TTFT distributions side by side against the SLO of a ServingPolicy preset (interactive-chat's by
default), the batch's completion time and counts, and a check of its results: every custom_id
answered exactly once.

Against a running router (`--router-url`), or on loopback: `kvpilot serve MODEL` (or
`--engine-url`) and a `kvpilot router --batch-dir` in front of it, started here.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np

from kvpilot_operator.router.bench import (
    WORDS,
    Timing,
    engine_url,
    router_process,
    stream_chat,
)

if TYPE_CHECKING:
    from openai import AsyncOpenAI
    from openai.types import Batch

# Batch statuses after which nothing more happens (OpenAI's, which the router's Batch API uses).
_DONE = ("completed", "failed", "expired", "cancelled")


def _prompt(label: str, words: int) -> str:
    # A distinct start for each request: no prompt is a prefix-cache hit of another's.
    return f"{label}: " + " ".join(WORDS[i % len(WORDS)] for i in range(words))


def _chat(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,  # vLLM's extension: every request generates exactly max_tokens
    }


def batch_lines(model: str, n: int, max_tokens: int, words: int) -> bytes:
    """The batch: `n` chat requests of `max_tokens` tokens, as an OpenAI batch JSONL file."""
    lines = (
        {
            "custom_id": f"bench-{i}",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": _chat(model, _prompt(f"Batch line {i}", words), max_tokens),
        }
        for i in range(n)
    )
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


# ---- the interactive load -----------------------------------------------------------------------
@dataclass
class Phase:
    """The interactive requests sent in one phase: their timings, and why others failed."""

    seconds: float = 0.0
    timings: list[Timing] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def ttft_ms(self, q: float) -> float:
        return float(np.percentile([t.ttft for t in self.timings], q)) * 1000


@dataclass
class Load:
    """A steady interactive load: `concurrency` requests always in flight (a closed loop), or,
    with `rate`, that many requests a second evenly spaced whatever the answers' pace (open)."""

    router: str
    model: str
    max_tokens: int
    prompt_words: int
    concurrency: int
    rate: float | None
    sent: itertools.count[int] = field(default_factory=itertools.count)

    def body(self, label: str) -> dict[str, Any]:
        prompt = _prompt(label, self.prompt_words)
        return {**_chat(self.model, prompt, self.max_tokens), "stream": True}

    async def run(self, client: httpx.AsyncClient, stop: asyncio.Event) -> Phase:
        """Send until `stop` is set; requests already sent are waited for and counted."""
        phase = Phase()
        t0 = time.perf_counter()

        async def one() -> None:
            body = self.body(f"Request {next(self.sent)}")
            try:
                phase.timings.append(await stream_chat(client, self.router, body))
            except (httpx.HTTPError, RuntimeError) as e:
                phase.failures.append(f"{type(e).__name__}: {e}")
                await asyncio.sleep(0.1)  # refused at once: a closed loop would spin on it

        if self.rate is None:

            async def worker() -> None:
                while not stop.is_set():
                    await one()

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        else:
            tasks, due = [], time.monotonic()
            while not stop.is_set():
                tasks.append(asyncio.create_task(one()))
                due += 1 / self.rate
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), max(0.0, due - time.monotonic()))
            await asyncio.gather(*tasks)
        phase.seconds = time.perf_counter() - t0
        return phase


# ---- the batch ----------------------------------------------------------------------------------
@dataclass
class BatchRun:
    batch: Batch
    seconds: float  # from batches.create until the client saw it done (polled every 0.5 s)
    results: bytes  # the output and error files together


async def _submit(oa: AsyncOpenAI, data: bytes) -> Batch:
    upload = await oa.files.create(file=("bench-batch.jsonl", data), purpose="batch")
    return await oa.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )


async def _drain(oa: AsyncOpenAI, batch: Batch, t0: float, timeout: float) -> BatchRun:
    """Poll until the batch is done (cancelled past `timeout`), then download its results."""
    while batch.status not in _DONE:
        if time.perf_counter() - t0 > timeout and batch.status != "cancelling":
            print(f"the batch is not done after {timeout:.0f} s: cancelling it", file=sys.stderr)
            await oa.batches.cancel(batch.id)
        await asyncio.sleep(0.5)
        batch = await oa.batches.retrieve(batch.id)
    seconds = time.perf_counter() - t0
    results = b""
    for file_id in (batch.output_file_id, batch.error_file_id):
        if file_id:
            results += (await oa.files.content(file_id)).content
    return BatchRun(batch, seconds, results)


async def measure(
    load: Load, oa: AsyncOpenAI, batch_data: bytes, duration: float, timeout: float
) -> tuple[Phase, Phase, BatchRun]:
    """The load alone for `duration` s, then the load while the batch drains."""
    headers = {"Authorization": f"Bearer {oa.api_key}"}
    limits = httpx.Limits(max_connections=max(64, 4 * load.concurrency))
    async with httpx.AsyncClient(timeout=600, limits=limits, headers=headers) as client:
        for i in range(2):  # warm up the connection and the engine; not measured
            await stream_chat(client, load.router, load.body(f"Warm-up {i}"))
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(duration, stop.set)
        alone = await load.run(client, stop)

        batch = await _submit(oa, batch_data)
        t0 = time.perf_counter()
        stop = asyncio.Event()
        during_task = asyncio.create_task(load.run(client, stop))
        try:
            run = await _drain(oa, batch, t0, timeout)
        finally:
            stop.set()
        during = await during_task
    return alone, during, run


# ---- the command --------------------------------------------------------------------------------
def _slo(ns: argparse.Namespace) -> tuple[int, float]:
    """(percentile, target ms) of the interactive TTFT SLO: the preset's, or --ttft-slo-ms."""
    from kvpilot_operator.api.policies import load_presets

    presets = load_presets()
    if ns.policy not in presets:
        raise ValueError(f"unknown policy {ns.policy!r} (presets: {', '.join(sorted(presets))})")
    ttft = presets[ns.policy].spec.slo.ttft if presets[ns.policy].spec.slo else None
    percentile = ttft.percentile if ttft else 95
    target = ns.ttft_slo_ms or (ttft.target_ms if ttft else None)
    if target is None:
        raise ValueError(f"policy {ns.policy!r} has no TTFT SLO: pass --ttft-slo-ms")
    return percentile, float(target)


def run_batch_bench(ns: argparse.Namespace) -> int:
    try:
        from openai import AsyncOpenAI
    except ImportError:
        print("kvpilot bench batch needs the openai client: pip install openai", file=sys.stderr)
        return 2
    rate = ns.request_rate
    if ns.concurrency < 1 or ns.batch_size < 1 or (rate is not None and rate <= 0):
        raise ValueError("--concurrency, --batch-size and --request-rate must be positive")
    percentile, slo_ms = _slo(ns)
    api_key = ns.api_key or os.environ.get("OPENAI_API_KEY") or "none"
    with tempfile.TemporaryDirectory(prefix="kvpilot-bench-batch-") as scratch:
        tmp = Path(scratch)
        with contextlib.ExitStack() as stack:
            router = ns.router_url
            if router is None:
                engine = engine_url(ns, stack, tmp)
                # The SLO goes to the router as the operator renders it from spec.slo: batch
                # admission holds interactive latency under it (--router-arg overrides).
                flags = ["--batch-dir", str(tmp / "batches")]
                flags += ["--batch-slo-ttft-ms", str(slo_ms)]
                flags += ["--batch-slo-percentile", str(percentile), *ns.router_arg]
                router = stack.enter_context(
                    router_process(tmp, "engine", engine.rstrip("/"), *flags)
                )
            router = router.rstrip("/")
            model = httpx.get(
                f"{router}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=30
            ).json()["data"][0]["id"]
            load = Load(
                router, model, ns.max_tokens, ns.prompt_words, ns.concurrency, ns.request_rate
            )
            oa = AsyncOpenAI(base_url=f"{router}/v1", api_key=api_key, max_retries=0)
            data = batch_lines(model, ns.batch_size, ns.batch_max_tokens, ns.prompt_words)
            print(
                f"interactive load alone for {ns.duration:.0f} s, then while a batch of "
                f"{ns.batch_size} requests drains ...",
                file=sys.stderr,
            )
            alone, during, run = asyncio.run(measure(load, oa, data, ns.duration, ns.timeout))
    return report(ns, router, model, (percentile, slo_ms), alone, during, run)


def report(
    ns: argparse.Namespace,
    router: str,
    model: str,
    slo: tuple[int, float],
    alone: Phase,
    during: Phase,
    run: BatchRun,
) -> int:
    """The markdown table and verdicts on stdout (and --json); 1 if the batch lost, repeated or
    failed a request, or an interactive request failed: the figures would not be comparable."""
    from kvpilot_engine.batch.protocol import check_results

    percentile, slo_ms = slo
    pace = (
        f"{ns.request_rate:g} requests/s"
        if ns.request_rate is not None
        else f"{ns.concurrency} in flight"
    )
    print()
    print(
        f"kvpilot bench batch: interactive streaming chat ({pace}, {ns.max_tokens} output "
        f"tokens, {ns.prompt_words}-word prompts) alone, then while a batch of {ns.batch_size} "
        f"chat requests ({ns.batch_max_tokens} output tokens) drains through the Batch API"
    )
    source = ns.policy + (", target from --ttft-slo-ms" if ns.ttft_slo_ms else "")
    print(f"router {router} ({model}); TTFT SLO p{percentile} <= {slo_ms:.0f} ms ({source})")
    print()
    print(
        f"| interactive TTFT | seconds | requests | failed | p50 ms | p90 ms | p99 ms "
        f"| p{percentile} ms | SLO |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    figures: dict[str, Any] = {
        "router": router,
        "model": model,
        "cpu_count": os.cpu_count(),
        "slo": {"policy": ns.policy, "percentile": percentile, "target_ms": slo_ms},
    }
    verdicts = {}
    phases = (("alone", "alone", alone), ("with_batch", "while the batch drains", during))
    for key, name, phase in phases:
        row: dict[str, Any] = {
            "seconds": round(phase.seconds, 1),
            "requests": len(phase.timings),
            "failed": len(phase.failures),
        }
        if phase.timings:
            for q in sorted({50, 90, 99, percentile}):
                row[f"ttft_p{q}_ms"] = round(phase.ttft_ms(q), 1)
            row["slo_met"] = row[f"ttft_p{percentile}_ms"] <= slo_ms
        verdicts[name] = "met" if row.get("slo_met") else "missed"
        cells = [f"{row.get(f'ttft_p{q}_ms', float('nan')):.0f}" for q in (50, 90, 99, percentile)]
        print(
            f"| {name} | {row['seconds']:.0f} | {row['requests']} | {row['failed']} | "
            + " | ".join(cells)
            + f" | {verdicts[name]} |"
        )
        figures[key] = row
    check = check_results(run.results, (f"bench-{i}" for i in range(ns.batch_size)))
    counts = run.batch.request_counts
    batch = {
        "status": run.batch.status,
        "seconds": round(run.seconds, 1),
        "completed": counts.completed if counts else None,
        "failed": counts.failed if counts else None,
        "completion_tokens": check.completion_tokens,
        "output_tokens_per_s": round(check.completion_tokens / run.seconds, 1),
        "problems": check.problems,
    }
    figures["batch"] = batch
    print()
    print(
        f"batch: {run.batch.status} in {run.seconds:.1f} s, {batch['completed']} completed and "
        f"{batch['failed']} failed of {ns.batch_size}, {check.completion_tokens} output tokens "
        f"({batch['output_tokens_per_s']:.1f}/s)"
    )
    print(
        "results: every custom_id answered exactly once"
        if not check.problems
        else "results: " + "; ".join(check.problems)
    )
    print(
        f"SLO p{percentile} TTFT <= {slo_ms:.0f} ms: {verdicts['alone']} alone, "
        f"{verdicts['while the batch drains']} while the batch drains"
    )
    for phase in (alone, during):
        for failure in phase.failures[:3]:
            print(f"interactive request failed: {failure}", file=sys.stderr)
    if ns.json:
        Path(ns.json).write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {ns.json}")
    ok = run.batch.status == "completed" and not check.problems
    return 0 if ok and not alone.failures and not during.failures else 1
