"""`kvpilot bench spec`: speculative against plain decoding, same weights, same run.

Two engines are loaded side by side, one with --speculative-config (default: n-gram, adaptive)
and one without, and each workload is run on both, alternating, so load on the machine hits
both alike. Workloads:

  edit  input-grounded: the prompt holds a source file and the start of a copy of it; the
        answer repeats most of the file (prompt lookup hits)
  chat  free generation with nothing to copy (lookups mostly miss)

each at one request in flight and at --concurrency in flight (different files/questions per
request), greedy, EOS ignored, --output-len tokens per request. The figure is output tokens
per second of wall time from the first request added to the last token; the acceptance rate
and the mean tokens per verify step come from the engine's spec_decode counters.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from kvpilot_engine.config import EngineArgs

_SOURCES = ["block_manager.py", "scheduler.py", "sequence.py", "sampling_params.py"]
_QUESTIONS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how vaccines train the immune system, for a curious twelve-year-old.",
    "Describe a walk through a busy market in a city you invent.",
    "What are the pros and cons of working from home? Discuss in detail.",
]


def edit_prompts(n: int, chars: int = 1500) -> list[str]:
    here = Path(__file__).resolve().parent.parent
    out = []
    for i in range(n):
        code = (here / _SOURCES[i % len(_SOURCES)]).read_text()[:chars]
        out.append(f"Copy this code exactly.\n\n{code}\n\nCopy:\n\n{code[:80]}")
    return out


def chat_prompts(n: int) -> list[str]:
    return [_QUESTIONS[i % len(_QUESTIONS)] + "\n\n" for i in range(n)]


@dataclasses.dataclass
class Run:
    workload: str
    in_flight: int
    speculative: bool
    tokens: int
    seconds: float
    acceptance: float | None = None
    tokens_per_step: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds


def run_once(engine, prompts: list[str], output_len: int) -> tuple[int, float]:
    from kvpilot_engine.sampling_params import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)
    tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
    return tokens, time.perf_counter() - t0


def run_spec_bench(ns: argparse.Namespace, args: EngineArgs) -> int:
    from kvpilot_engine.llm_engine import LLMEngine

    if args.speculative_config is None:
        args = dataclasses.replace(
            args, speculative_config={"method": "ngram", "num_speculative_tokens": 5}
        )
    plain = LLMEngine(dataclasses.replace(args, speculative_config=None))
    spec = LLMEngine(args)
    workloads = {"edit": edit_prompts, "chat": chat_prompts}
    runs: list[Run] = []
    for name in ns.workloads:
        for n in sorted({1, ns.concurrency}):
            prompts = workloads[name](n)
            for engine in (plain, spec):  # warm-up: allocator pools, the cost model's first fit
                run_once(engine, prompts, min(16, ns.output_len))
            for _ in range(ns.num_iters):
                for engine in (plain, spec):
                    sp = engine.speculator
                    before = dataclasses.replace(sp.stats) if sp else None
                    tokens, seconds = run_once(engine, prompts, ns.output_len)
                    run = Run(name, n, sp is not None, tokens, seconds)
                    if sp is not None and before is not None:
                        drafted = sp.stats.num_draft_tokens - before.num_draft_tokens
                        accepted = sp.stats.num_accepted_tokens - before.num_accepted_tokens
                        steps = sp.stats.num_drafts - before.num_drafts
                        run.acceptance = accepted / drafted if drafted else None
                        run.tokens_per_step = (accepted + steps) / steps if steps else None
                    runs.append(run)
    plain.check_no_leaks()
    spec.check_no_leaks()
    cfg = args.speculative_config
    print(
        f"model {args.model}, {plain.device}, dtype {args.dtype}, {ns.output_len} tokens per "
        f"request, greedy, best of {ns.num_iters}; "
        f"speculative: {json.dumps(dataclasses.asdict(cfg))}"
    )
    print(
        f"{'workload':>8} {'in flight':>9} {'plain tok/s':>11} {'spec tok/s':>10} "
        f"{'speed-up':>8} {'accepted':>8} {'tok/verify':>10}"
    )
    rows = []
    for name in ns.workloads:
        for n in sorted({1, ns.concurrency}):
            mine = [r for r in runs if r.workload == name and r.in_flight == n]
            best_plain = max((r for r in mine if not r.speculative), key=lambda r: r.tokens_per_s)
            best_spec = max((r for r in mine if r.speculative), key=lambda r: r.tokens_per_s)
            speedup = best_spec.tokens_per_s / best_plain.tokens_per_s
            acc = best_spec.acceptance
            tps = best_spec.tokens_per_step
            print(
                f"{name:>8} {n:>9} {best_plain.tokens_per_s:11.1f} {best_spec.tokens_per_s:10.1f} "
                f"{speedup:7.2f}x {'-' if acc is None else f'{acc:.0%}':>8} "
                f"{'-' if tps is None else f'{tps:.2f}':>10}"
            )
            rows.append(
                {
                    "workload": name,
                    "in_flight": n,
                    "plain_tokens_per_s": round(best_plain.tokens_per_s, 2),
                    "spec_tokens_per_s": round(best_spec.tokens_per_s, 2),
                    "speedup": round(speedup, 3),
                    "acceptance": acc,
                    "tokens_per_verify_step": tps,
                }
            )
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=2) + "\n")
    plain.shutdown()
    spec.shutdown()
    return 0
