"""`kvpilot bench spec`: speculative against plain decoding, same weights, same run.

Two engines are loaded side by side, one with --speculative-config (default: n-gram, adaptive)
and one without, and each workload is run on both, alternating, so load on the machine hits
both alike. Workloads:

  edit  input-grounded: the prompt holds a source file and the start of a copy of it; the
        answer repeats most of the file (prompt lookup hits)
  qa    a document (one of the project's docs) and a question on it, answered by quoting and
        summarising it (some lookups hit)
  chat  free generation with nothing to copy (lookups mostly miss)

each at one request in flight and at --concurrency in flight (different files/questions per
request), greedy, EOS ignored. At one in flight, REQUESTS_PER_SLOT requests one after another
(four files, documents or questions), --output-len tokens each. At --concurrency the load is a
closed loop of REQUESTS_PER_SLOT x concurrency requests of output lengths between half of and
all of --output-len, each finished one replaced by the next, as clients of a server keep it: the
tokens speculation gains for one request then free its slot sooner. (A single batch of
equal-length requests would finish no sooner unless every one of them gained, since its last
step is the same for all.) The figure is output tokens
per second of wall time from the first request added to the last token; the acceptance rate
and the mean tokens per verify step come from the engine's spec_decode counters.

With --compare-transformers, transformers' own assisted generation runs the same prompts at
one request in flight on the same weights in the same process: `generate` plain and with
prompt lookup (`prompt_lookup_num_tokens` = num_speculative_tokens), or for the draft_model
method with the same draft as its `assistant_model` (`num_assistant_tokens` =
num_speculative_tokens), timed the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from pathlib import Path
from typing import Any

from kvpilot_engine.bench.datasets import WORKLOADS
from kvpilot_engine.config import EngineArgs

REQUESTS_PER_SLOT = 4


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


def run_once(
    engine, prompts: list[str], output_len: int | list[int], in_flight: int | None = None
) -> tuple[int, float]:
    """Run every prompt with at most `in_flight` requests in the engine at once (all of them
    when None), the next added as soon as one finishes; output tokens and seconds.
    `output_len`: tokens per request, or each request's own."""
    from kvpilot_engine.sampling_params import SamplingParams

    lens = output_len if isinstance(output_len, list) else [output_len] * len(prompts)
    queue = list(enumerate(prompts))
    slots = len(queue) if in_flight is None else in_flight
    t0 = time.perf_counter()
    tokens = 0
    while queue or engine.has_unfinished_requests():
        while queue and engine.get_num_unfinished_requests() < slots:
            i, p = queue.pop(0)
            params = SamplingParams(temperature=0.0, max_tokens=lens[i], ignore_eos=True)
            engine.add_request(f"bench-{time.monotonic_ns()}-{i}", p, params)
        for out in engine.step():
            if out.finished:
                tokens += len(out.outputs[0].token_ids)
    return tokens, time.perf_counter() - t0


def closed_loop_lengths(num_requests: int, output_len: int, seed: int = 0) -> list[int]:
    """Output lengths for a closed loop: uniform in [output_len / 2, output_len], seeded, so
    requests end at different steps with or without speculation (equal lengths end together
    without it, and refill the batch in one prefill step: a synchrony real traffic lacks)."""
    rng = random.Random(seed)
    return [rng.randint(max(1, output_len // 2), output_len) for _ in range(num_requests)]


def run_spec_bench(ns: argparse.Namespace, args: EngineArgs) -> int:
    from kvpilot_engine.llm_engine import LLMEngine

    if args.speculative_config is None:
        args = dataclasses.replace(
            args, speculative_config={"method": "ngram", "num_speculative_tokens": 5}
        )
    plain = LLMEngine(dataclasses.replace(args, speculative_config=None))
    spec = LLMEngine(args, checkpoint=plain.checkpoint)
    runs: list[Run] = []
    hf_runs: dict[tuple[str, str], float] = {}
    hf = None
    if ns.compare_transformers:
        from kvpilot_engine.bench.throughput import Baseline, hf_model

        hf = hf_model(Baseline(plain.checkpoint, plain.dtype, plain.device, 0))
        cfg = args.speculative_config
        if cfg.method == "draft_model":
            # transformers' assisted generation with the same draft (its assistant_model).
            draft = spec.speculator.proposer.checkpoint  # type: ignore[union-attr]
            hf_extra = {
                "assistant_model": hf_model(Baseline(draft, plain.dtype, plain.device, 0)),
                "num_assistant_tokens": cfg.num_speculative_tokens,
            }
        else:
            hf_extra = {"prompt_lookup_num_tokens": cfg.num_speculative_tokens}
    for name in ns.workloads:
        for n in sorted({1, ns.concurrency}):
            prompts = WORKLOADS[name](REQUESTS_PER_SLOT * n)
            lens = ns.output_len if n == 1 else closed_loop_lengths(len(prompts), ns.output_len)
            for engine in (plain, spec):  # warm-up: allocator pools, the cost model's first fit
                run_once(engine, prompts[:n], min(16, ns.output_len))
            for _ in range(ns.num_iters):
                for engine in (plain, spec):
                    sp = engine.speculator
                    before = dataclasses.replace(sp.stats) if sp else None
                    tokens, seconds = run_once(engine, prompts, lens, n)
                    run = Run(name, n, sp is not None, tokens, seconds)
                    if sp is not None and before is not None:
                        drafted = sp.stats.num_draft_tokens - before.num_draft_tokens
                        accepted = sp.stats.num_accepted_tokens - before.num_accepted_tokens
                        steps = sp.stats.num_drafts - before.num_drafts
                        run.acceptance = accepted / drafted if drafted else None
                        run.tokens_per_step = (accepted + steps) / steps if steps else None
                    runs.append(run)
            if n == 1 and hf is not None:
                ids = [plain.tokenizer.encode(p) for p in prompts]
                hf_runs.update(hf_bench(hf, name, ids, ns.output_len, ns.num_iters, hf_extra))
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
    if hf_runs:
        print("transformers generate on the same weights, 1 in flight (best of the same runs):")
        key = "assistant_model" if "assistant_model" in hf_extra else "prompt_lookup"
        how = "assisted" if key == "assistant_model" else "lookup"
        print(f"{'workload':>8} {'plain tok/s':>11} {how + ' tok/s':>12} {'ours/' + how:>13}")
        for name in ns.workloads:
            if (name, "plain") not in hf_runs:
                continue
            ours = next(r for r in rows if r["workload"] == name and r["in_flight"] == 1)
            hp, hl = hf_runs[(name, "plain")], hf_runs[(name, "assisted")]
            ratio = ours["spec_tokens_per_s"] / hl
            print(f"{name:>8} {hp:11.1f} {hl:12.1f} {ratio:12.2f}x")
            ours.update(
                {
                    "hf_plain_tokens_per_s": round(hp, 2),
                    f"hf_{key}_tokens_per_s": round(hl, 2),
                    f"spec_over_hf_{key}": round(ratio, 3),
                }
            )
    if ns.json:
        Path(ns.json).write_text(json.dumps(rows, indent=2) + "\n")
    plain.shutdown()
    spec.shutdown()
    return 0


def hf_bench(
    model,
    workload: str,
    prompts: list[list[int]],
    output_len: int,
    iters: int,
    assisted: dict[str, Any],
) -> dict[tuple[str, str], float]:
    """transformers' generate on the engine's weights, one prompt at a time: plain greedy and
    assisted (`assisted`: prompt lookup's or assistant_model's arguments), output tokens per
    second of wall time, best of `iters`."""
    import torch

    device = next(model.parameters()).device
    ids = [torch.tensor([p], device=device) for p in prompts]
    out: dict[tuple[str, str], float] = {}
    for label, extra in (("plain", {}), ("assisted", assisted)):
        best = 0.0
        for _ in range(iters):
            tokens, t0 = 0, time.perf_counter()
            for x in ids:
                with torch.inference_mode():
                    y = model.generate(
                        input_ids=x,
                        attention_mask=torch.ones_like(x),
                        do_sample=False,
                        max_new_tokens=output_len,
                        min_new_tokens=output_len,
                        **extra,
                    )
                tokens += y.shape[1] - x.shape[1]
            best = max(best, tokens / (time.perf_counter() - t0))
        out[(workload, label)] = best
    return out
