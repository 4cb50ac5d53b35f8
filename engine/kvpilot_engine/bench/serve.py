"""`kvpilot bench serve`: an online load generator for any OpenAI-compatible server.

In the spirit of vLLM's `bench serve`: a random dataset with set input and output lengths (or
one of bench.datasets' input-grounded sets, `--dataset edit|qa|chat`),
Poisson (or burst) arrivals, an optional concurrency cap, streaming requests timed chunk by
chunk. Reports TTFT, TPOT and ITL percentiles, throughput, and goodput against given SLOs.
Needs nothing but the URL: prompts are text, so the target may serve any model.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

# Common English words; most BPE vocabularies encode each, with its leading space, as one token,
# so a prompt of N words is close to N tokens. The server's usage report gives the exact count.
_WORDS = [
    "time",
    "year",
    "people",
    "way",
    "day",
    "man",
    "thing",
    "woman",
    "life",
    "child",
    "world",
    "school",
    "state",
    "family",
    "student",
    "group",
    "country",
    "problem",
    "hand",
    "part",
    "place",
    "case",
    "week",
    "company",
    "system",
    "program",
    "question",
    "work",
    "government",
    "number",
    "night",
    "point",
    "home",
    "water",
    "room",
    "mother",
    "area",
    "money",
    "story",
    "fact",
    "month",
    "lot",
    "right",
    "study",
    "book",
    "eye",
    "job",
    "word",
    "business",
    "issue",
    "side",
    "kind",
    "head",
    "house",
    "service",
    "friend",
    "father",
    "power",
    "hour",
    "game",
    "line",
    "end",
    "member",
    "law",
    "car",
    "city",
    "community",
    "name",
    "president",
    "team",
    "minute",
    "idea",
    "kid",
    "body",
    "information",
    "back",
    "parent",
    "face",
    "others",
    "level",
    "office",
    "door",
    "health",
    "person",
    "art",
    "war",
    "history",
    "party",
    "result",
    "change",
    "morning",
    "reason",
    "research",
    "girl",
    "guy",
    "moment",
    "air",
    "teacher",
    "force",
]


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else 0.0


def make_prompts(n: int, input_len: tuple[int, int], output_len: tuple[int, int], seed: int):
    rng = random.Random(seed)
    return [
        (
            " ".join(rng.choice(_WORDS) for _ in range(rng.randint(*input_len))),
            rng.randint(*output_len),
        )
        for _ in range(n)
    ]


async def _one_request(
    client, url: str, model: str, prompt: str, max_tokens: int, extra: dict
) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }
    start = time.perf_counter()
    res = RequestResult(ok=False)
    last = start
    try:
        async with client.stream("POST", url, json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens", 0)
                    res.output_tokens = chunk["usage"].get("completion_tokens", 0)
                choices = chunk.get("choices") or []
                if choices and choices[0].get("text"):
                    now = time.perf_counter()
                    if res.ttft == 0.0:
                        res.ttft = now - start
                    else:
                        res.itls.append(now - last)
                    last = now
        res.e2e = time.perf_counter() - start
        res.ok = res.ttft > 0.0
        if not res.ok:
            res.error = "no tokens streamed"
        if res.output_tokens == 0:  # a server without usage in streams: count the chunks
            res.output_tokens = len(res.itls) + 1
    except Exception as e:  # the benchmark reports failures; it does not stop on them
        res.error = f"{type(e).__name__}: {e}"
    return res


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


async def run_load(
    base_url: str,
    model: str | None,
    prompts,
    request_rate: float,
    max_concurrency: int | None,
    seed: int,
    extra: dict,
    timeout: float,
    progress: bool = True,
) -> tuple[list[RequestResult], float, str]:
    import httpx
    from tqdm.auto import tqdm

    base = base_url.rstrip("/")
    if not base.endswith("/v1"):
        base += "/v1"
    limits = httpx.Limits(max_connections=max_concurrency or len(prompts) or 1)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        if model is None:
            models = (await client.get(f"{base}/models")).json()["data"]
            model = models[0]["id"]
        # One short request first: lazy initialisation on the server is not what we measure.
        await _one_request(client, f"{base}/completions", model, "Hello", 4, extra)
        rng = random.Random(seed)
        sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
        bar = tqdm(total=len(prompts), desc=f"bench {base}", unit="req", disable=not progress)

        async def fire(prompt: str, out_len: int) -> RequestResult:
            if sem is None:
                r = await _one_request(client, f"{base}/completions", model, prompt, out_len, extra)
            else:
                async with sem:
                    r = await _one_request(
                        client, f"{base}/completions", model, prompt, out_len, extra
                    )
            bar.update(1)
            return r

        tasks = []
        start = time.perf_counter()
        for prompt, out_len in prompts:
            tasks.append(asyncio.create_task(fire(prompt, out_len)))
            if math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))  # Poisson arrivals
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
    return list(results), duration, model


def summarize(
    results: list[RequestResult], duration: float, slo_ttft: float | None, slo_tpot: float | None
) -> dict:
    ok = [r for r in results if r.ok]
    ttfts = [r.ttft for r in ok]
    tpots = [r.tpot for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itls]
    out_tokens = sum(r.output_tokens for r in ok)
    good = [
        r
        for r in ok
        if (slo_ttft is None or r.ttft <= slo_ttft) and (slo_tpot is None or r.tpot <= slo_tpot)
    ]
    summary = {
        "requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "duration_s": round(duration, 2),
        "request_throughput": round(len(ok) / duration, 3),
        "output_throughput": round(out_tokens / duration, 1),
        "total_prompt_tokens": sum(r.prompt_tokens for r in ok),
        "total_output_tokens": out_tokens,
        "goodput_req_s": round(len(good) / duration, 3),
    }
    for name, vals in (("ttft_ms", ttfts), ("tpot_ms", tpots), ("itl_ms", itls)):
        summary[f"mean_{name}"] = round(1000 * sum(vals) / len(vals), 2) if vals else None
        for q in (50, 90, 99):
            summary[f"p{q}_{name}"] = round(1000 * _pct(vals, q), 2) if vals else None
    errors = [r.error for r in results if not r.ok]
    if errors:
        summary["first_error"] = errors[0]
    return summary


def print_summary(s: dict, label: str) -> None:
    print(f"---- {label} ----")
    print(
        f"requests: {s['completed']}/{s['requests']} ok in {s['duration_s']} s; "
        f"{s['request_throughput']} req/s, {s['output_throughput']} output tok/s, "
        f"goodput {s['goodput_req_s']} req/s"
    )
    for name in ("ttft_ms", "tpot_ms", "itl_ms"):
        print(
            f"{name.split('_')[0].upper():5s} ms  mean {s[f'mean_{name}']}  p50 {s[f'p50_{name}']}"
            f"  p90 {s[f'p90_{name}']}  p99 {s[f'p99_{name}']}"
        )
    if s.get("first_error"):
        print(f"first error: {s['first_error']}")


def dataset_prompts(name: str, n: int, output_len: tuple[int, int], seed: int):
    """One of bench.datasets' prompt sets (edit, qa, chat: input-grounded or not, for
    speculative decoding), with output lengths drawn as for the random set."""
    from kvpilot_engine.bench.datasets import WORKLOADS

    rng = random.Random(seed)
    return [(p, rng.randint(*output_len)) for p in WORKLOADS[name](n)]


def run_serve_bench(ns: argparse.Namespace) -> int:
    if ns.dataset == "random":
        prompts = make_prompts(ns.num_prompts, tuple(ns.input_len), tuple(ns.output_len), ns.seed)
    else:
        prompts = dataset_prompts(ns.dataset, ns.num_prompts, tuple(ns.output_len), ns.seed)
    extra = {"ignore_eos": True} if ns.ignore_eos else {}
    all_results = {}
    for url in ns.base_url:
        for conc in ns.max_concurrency or [None]:
            results, duration, model = asyncio.run(
                run_load(
                    url,
                    ns.model,
                    prompts,
                    ns.request_rate,
                    conc,
                    ns.seed,
                    extra,
                    ns.timeout,
                )
            )
            s = summarize(
                results,
                duration,
                ns.slo_ttft_ms / 1000 if ns.slo_ttft_ms else None,
                ns.slo_tpot_ms / 1000 if ns.slo_tpot_ms else None,
            )
            label = f"{url} model={model} concurrency={conc or 'unbounded'} rate={ns.request_rate}"
            print_summary(s, label)
            all_results[label] = s
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(all_results, f, indent=2)
    return 0 if all(s["failed"] == 0 for s in all_results.values()) else 1
