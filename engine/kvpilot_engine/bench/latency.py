"""`kvpilot bench latency`: batch-1 decode speed, the way gpt-fast reports it.

One sequence: a prompt of --input-len random tokens, then --output-len greedy tokens with EOS
ignored, stepped one at a time through the engine, each step timed (the GPU synchronised at the
end of each, by the sampler reading its token). The first step is the prefill; the decode figure
is the median of the others, as tokens/s. "Achieved bandwidth" is gpt-fast's: the bytes of the
weights (every weight is read once per decode step) times tokens/s, and its share of the
device's peak memory bandwidth when that is known or given. The KV cache read per step is
printed too; at these lengths it is a fraction of a percent of the weights.

--quantization takes several methods: each one loads the model afresh and runs the same prompt,
and the table gives every method's speed-up over the first (e.g. `none int8 int4 fp8`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import random
import statistics
import time

import torch
from tqdm.auto import tqdm

from kvpilot_engine.config import EngineArgs

# Peak HBM bandwidth in GB/s by device name (datasheet figures).
PEAK_BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0, "L40S": 864.0}


def peak_bandwidth(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BANDWIDTH_GBS.items() if k in name), None)


@dataclasses.dataclass
class LatencyResult:
    quantization: str
    weight_bytes: int
    kv_bytes_per_token: int
    prefill_ms: float
    decode_ms_p50: float
    decode_ms_p90: float

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 / self.decode_ms_p50

    @property
    def bandwidth_gbs(self) -> float:
        return self.weight_bytes * self.tokens_per_s / 1e9


def measure(args: EngineArgs, input_len: int, output_len: int, iters: int, seed: int):
    from kvpilot_engine.llm_engine import LLMEngine
    from kvpilot_engine.sampling_params import SamplingParams
    from kvpilot_engine.worker import kv_bytes_per_block

    engine = LLMEngine(args)
    rng = random.Random(seed)
    vocab = engine.model_config.vocab_size
    prompt = [rng.randrange(100, vocab) for _ in range(input_len)]
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)

    def run_once() -> list[float]:
        engine.add_request(f"latency-{time.monotonic_ns()}", prompt, params)
        times = []
        while engine.has_unfinished_requests():
            t0 = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t0)
        return times

    run_once()  # warm-up: Triton compiles, allocator pools, CPU thread pools
    prefill, decode = [], []
    for _ in tqdm(range(iters), desc=f"latency {args.quantization}", unit="run"):
        times = run_once()
        prefill.append(times[0])
        decode.extend(times[1:])
    engine.check_no_leaks()
    per_token = kv_bytes_per_block(engine.model.config, 1, engine.dtype)
    deciles = statistics.quantiles(decode, n=10)
    result = LatencyResult(
        quantization=args.quantization,
        weight_bytes=engine.weight_bytes,
        kv_bytes_per_token=per_token,
        prefill_ms=1000 * statistics.median(prefill),
        decode_ms_p50=1000 * statistics.median(decode),
        decode_ms_p90=1000 * deciles[8],
    )
    device = engine.device
    engine.shutdown()
    return result, device


def _release(device: torch.device) -> None:
    """Free the last engine's memory before the next one loads."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_latency_bench(ns: argparse.Namespace, args: EngineArgs) -> int:
    methods = ns.quantization_list or [args.quantization]
    results: list[LatencyResult] = []
    device = None
    for method in methods:
        r, device = measure(
            dataclasses.replace(args, quantization=method),
            ns.input_len,
            ns.output_len,
            ns.num_iters,
            ns.dataset_seed,
        )
        results.append(r)
        _release(device)
    assert device is not None
    peak = ns.peak_bandwidth or peak_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"model {args.model}, {name}, dtype {args.dtype}, batch 1, prompt {ns.input_len}, "
        f"{ns.output_len} tokens x {ns.num_iters} runs"
        + (f", peak bandwidth {peak:.0f} GB/s" if peak else "")
    )
    header = (
        f"{'quantization':>12} {'tok/s':>9} {'ms/tok p50':>10} {'p90':>7} {'prefill ms':>10} "
        f"{'weights GiB':>11} {'GB/s':>8} {'of peak':>8} {'speed-up':>8}"
    )
    print(header)
    rows = []
    for r in results:
        share = r.bandwidth_gbs / peak if peak else None
        speedup = r.tokens_per_s / results[0].tokens_per_s
        print(
            f"{r.quantization:>12} {r.tokens_per_s:9.1f} {r.decode_ms_p50:10.2f} "
            f"{r.decode_ms_p90:7.2f} {r.prefill_ms:10.1f} {r.weight_bytes / 2**30:11.2f} "
            f"{r.bandwidth_gbs:8.1f} {'' if share is None else f'{share:.1%}':>8} "
            f"{speedup:7.2f}x"
        )
        rows.append(
            {
                **dataclasses.asdict(r),
                "tokens_per_s": round(r.tokens_per_s, 2),
                "bandwidth_gbs": round(r.bandwidth_gbs, 1),
                "share_of_peak": None if share is None else round(share, 4),
                "speedup": round(speedup, 3),
            }
        )
    kv_mb = results[0].kv_bytes_per_token * (ns.input_len + ns.output_len) / 1e6
    print(f"(KV cache read per step at the last token: {kv_mb:.1f} MB, not counted above)")
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(
                {
                    "model": args.model,
                    "device": name,
                    "dtype": args.dtype,
                    "input_len": ns.input_len,
                    "output_len": ns.output_len,
                    "num_iters": ns.num_iters,
                    "peak_bandwidth_gbs": peak,
                    "results": rows,
                },
                f,
                indent=2,
            )
    return 0
