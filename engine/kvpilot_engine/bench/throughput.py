"""`kvpilot bench throughput`: offline generation, kvpilot against transformers in one run.

The dataset is random token ids with uniformly drawn input and output lengths (vLLM's "random"
dataset); EOS is ignored so both sides generate exactly the requested lengths. transformers runs
`generate` on left-padded static batches, the way offline batch jobs use it; its throughput
counts only the requested output tokens, not the padding it also computes. `--run-batch` adds
`kvpilot run-batch`'s path on the same loaded engine: the workload written as an OpenAI batch
file of `/v1/completions` lines, answered by `run_batch` into a results file (parsing, checking
and writing every line included). `--lora` runs bench/lora.py instead, on the same workload.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from kvpilot_engine.config import EngineArgs

if TYPE_CHECKING:
    from kvpilot_engine.llm import LLM


@dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]

    @property
    def total_output(self) -> int:
        return sum(self.output_lens)

    @property
    def total_input(self) -> int:
        return sum(len(p) for p in self.prompts)


def make_workload(
    n: int, input_len: tuple[int, int], output_len: tuple[int, int], vocab_size: int, seed: int
) -> Workload:
    rng = random.Random(seed)
    # Skip the first ids: special tokens in most vocabularies.
    prompts = [
        [rng.randrange(100, vocab_size) for _ in range(rng.randint(*input_len))] for _ in range(n)
    ]
    return Workload(prompts, [rng.randint(*output_len) for _ in range(n)])


def bench_kvpilot(args: EngineArgs, work: Workload) -> tuple[float, object]:
    from kvpilot_engine.llm import LLM
    from kvpilot_engine.sampling_params import SamplingParams

    llm = LLM(**{**args.__dict__})
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in work.output_lens
    ]
    # Warm-up: first-call allocations and thread pools are not what we measure.
    llm.generate(
        {"prompt_token_ids": work.prompts[0][:32]},
        SamplingParams(max_tokens=4, ignore_eos=True),
        use_tqdm=False,
    )
    # The warm-up's prompt is the first one's start: no prefix-cache hit for it either.
    llm.llm_engine.block_manager.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in work.prompts], params, use_tqdm=True)
    elapsed = time.perf_counter() - t0
    got = sum(len(o.outputs[0].token_ids) for o in outs)
    assert got == work.total_output, f"kvpilot generated {got} tokens, expected {work.total_output}"
    llm.llm_engine.check_no_leaks()
    return elapsed, llm


def batch_file(work: Workload, model: str) -> bytes:
    """The workload as an OpenAI batch file: one `/v1/completions` line a prompt, its token ids,
    its output length, greedy, EOS ignored (vLLM's `ignore_eos`, which kvpilot's server takes)."""
    lines = (
        {
            "custom_id": f"request-{i}",
            "method": "POST",
            "url": "/v1/completions",
            "body": {
                "model": model,
                "prompt": prompt,
                "max_tokens": n,
                "temperature": 0.0,
                "ignore_eos": True,
            },
        }
        for i, (prompt, n) in enumerate(zip(work.prompts, work.output_lens, strict=True))
    )
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def bench_run_batch(llm: LLM, work: Workload, model: str) -> float:
    """`kvpilot run-batch` on the engine `llm` holds: the workload written as a batch file and
    answered into a results file by `run_batch`, which is all the command does past loading the
    model. Every line must come back once, answered, with the requested tokens."""
    from kvpilot_engine.batch.protocol import check_results
    from kvpilot_engine.batch.run_batch import run_batch

    # LLM.generate has just run the same prompts: every one would be a prefix-cache hit.
    llm.llm_engine.block_manager.reset_prefix_cache()
    with tempfile.TemporaryDirectory(prefix="kvpilot-bench-run-batch-") as tmp:
        requests, results = Path(tmp, "requests.jsonl"), Path(tmp, "results.jsonl")
        requests.write_bytes(batch_file(work, model))
        summary = run_batch(llm, str(requests), str(results), model)
        ids = [f"request-{i}" for i in range(len(work.prompts))]
        check = check_results(results.read_bytes(), ids)
    assert not check.problems, f"run-batch: {'; '.join(check.problems)}"
    assert check.succeeded == len(ids) and check.completion_tokens == work.total_output, (
        f"run-batch answered {check.succeeded} of {len(ids)} lines with "
        f"{check.completion_tokens} tokens, expected {work.total_output}"
    )
    llm.llm_engine.check_no_leaks()
    return summary.seconds


@dataclass
class Baseline:
    """What transformers' side needs from kvpilot's engine: the same weights, dtype, device."""

    checkpoint: object
    dtype: torch.dtype
    device: torch.device
    pad_token_id: int


def hf_model(base: Baseline) -> torch.nn.Module:
    """transformers' model of the engine's checkpoint: the same weights, dtype and device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from kvpilot_engine.loader import RandomCheckpoint

    ckpt, dtype, dev = base.checkpoint, base.dtype, base.device
    if isinstance(ckpt, RandomCheckpoint):
        # The same shape with its own random weights: EOS is ignored, values do not matter.
        assert ckpt.hf_config is not None
        hf = {k: v for k, v in ckpt.hf_config.items() if k not in ("architectures", "model_type")}
        config = AutoConfig.for_model(ckpt.hf_config["model_type"], **hf)
        with torch.device(dev):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif ckpt.path.suffix == ".gguf":
        model = AutoModelForCausalLM.from_pretrained(
            str(ckpt.path.parent), gguf_file=ckpt.path.name, dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(ckpt.path), dtype=dtype)
    model = model.to(dev).eval()
    model.generation_config.eos_token_id = None  # ignore EOS, like kvpilot's ignore_eos
    return model


def left_padded(
    prompts: list[list[int]], pad: int, dev: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """A static batch as `generate` takes it: left-padded ids and their attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(p)
        mask[row, width - len(p) :] = 1
    return ids.to(dev), mask.to(dev)


def bench_transformers(base: Baseline, work: Workload, batch_size: int) -> float:
    model = hf_model(base)
    dev, pad = base.device, base.pad_token_id
    order = list(range(len(work.prompts)))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    t0 = time.perf_counter()
    for batch in tqdm(batches, desc="transformers", unit="batch"):
        ids, mask = left_padded([work.prompts[i] for i in batch], pad, dev)
        with torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max(work.output_lens[i] for i in batch),
                pad_token_id=pad,
            )
    return time.perf_counter() - t0


def workload_from(ns: argparse.Namespace, args: EngineArgs) -> Workload:
    """The command's workload, described on stdout."""
    from kvpilot_engine.loader import load_checkpoint

    vocab = load_checkpoint(args.model).config.vocab_size
    work = make_workload(
        ns.num_prompts, tuple(ns.input_len), tuple(ns.output_len), vocab, ns.dataset_seed
    )
    print(
        f"workload: {ns.num_prompts} prompts, input {ns.input_len[0]}-{ns.input_len[1]} "
        f"(total {work.total_input}), output {ns.output_len[0]}-{ns.output_len[1]} "
        f"(total {work.total_output}) tokens, seed {ns.dataset_seed}, EOS ignored"
    )
    return work


def run_throughput_bench(ns: argparse.Namespace, args: EngineArgs) -> int:
    work = workload_from(ns, args)
    kv_time, llm = bench_kvpilot(args, work)
    kv_tps = work.total_output / kv_time
    result = {
        "model": args.model,
        "device": str(llm.llm_engine.device),
        "dtype": str(llm.llm_engine.dtype),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "num_prompts": ns.num_prompts,
        "total_input_tokens": work.total_input,
        "total_output_tokens": work.total_output,
        "kvpilot_seconds": round(kv_time, 2),
        "kvpilot_output_tokens_per_s": round(kv_tps, 1),
        "kvpilot_total_tokens_per_s": round((work.total_input + work.total_output) / kv_time, 1),
        "kvpilot_preemptions": llm.llm_engine.scheduler.num_preemptions,
    }
    # (row, seconds) in the order run; the table puts each against LLM.generate and transformers.
    rows = [("kvpilot `LLM.generate`", kv_time)]
    if ns.run_batch:
        rb_time = bench_run_batch(llm, work, args.model)
        rows.append(("kvpilot `run-batch` (same engine, batch file in and out)", rb_time))
        result.update(
            {
                "run_batch_seconds": round(rb_time, 2),
                "run_batch_output_tokens_per_s": round(work.total_output / rb_time, 1),
                "run_batch_vs_generate": round(kv_time / rb_time, 2),
            }
        )
    engine = llm.llm_engine
    base = Baseline(
        engine.checkpoint, engine.dtype, engine.device, engine.tokenizer.eos_token_id or 0
    )
    # kvpilot's KV pool takes most of a GPU's memory: give it back before transformers loads.
    engine.shutdown()
    del llm, engine
    gc.collect()
    if base.device.type == "cuda":
        torch.cuda.empty_cache()
    hf_time = None
    if not ns.no_baseline:
        hf_time = bench_transformers(base, work, ns.hf_batch_size)
        hf_tps = work.total_output / hf_time
        rows.append((f"transformers `generate` (static batches of {ns.hf_batch_size})", hf_time))
        result.update(
            {
                "transformers_batch_size": ns.hf_batch_size,
                "transformers_seconds": round(hf_time, 2),
                "transformers_output_tokens_per_s": round(hf_tps, 1),
                "speedup": round(kv_tps / hf_tps, 2),
            }
        )
        if ns.run_batch:
            result["run_batch_speedup"] = round(hf_time / rb_time, 2)
    print()
    print(throughput_table(rows, work.total_output, kv_time, hf_time))
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def throughput_table(
    rows: list[tuple[str, float]], output_tokens: int, generate: float, hf: float | None
) -> str:
    """Markdown: each row's seconds and output tokens/s, and its speed against LLM.generate's
    and transformers' (a ratio of times: the workload is the same)."""
    head = "| | seconds | output tok/s | vs `LLM.generate` |"
    rule = "| --- | ---: | ---: | ---: |"
    if hf is not None:
        head, rule = head + " vs transformers |", rule + " ---: |"
    lines = [head, rule]
    for name, seconds in rows:
        line = f"| {name} | {seconds:.1f} | {output_tokens / seconds:.1f} | "
        line += f"{generate / seconds:.2f}x |"
        if hf is not None:
            line += f" {hf / seconds:.2f}x |"
        lines.append(line)
    return "\n".join(lines)
