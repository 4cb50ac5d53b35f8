"""`kvpilot bench throughput --lora`: many LoRA adapters mixed in one workload, in one run against

- the base model alone (the same requests on no adapter: the ceiling);
- one adapter at a time, the classic way to serve fine-tunes without multi-LoRA kernels: merge an
  adapter into the weights (W += scale * B @ A), run its requests as one batch, unmerge, swap to
  the next (on kvpilot's own engine, so only the strategy differs; the merges are timed too);
- peft's own mixed-adapter batches (`generate(..., adapter_names=[...])`) on transformers' model
  of the same weights, in static left-padded batches as `bench throughput` runs transformers.

The adapters are made here with peft: random (B not zero, so each changes the output), rank
`--lora-rank`, on `--lora-target-modules`, saved in PEFT's format and loaded from those folders by
every contestant. The workload is `bench throughput`'s random one, request i on adapter i mod N.
With `--num-iters` the rows take turns, pass after pass in a rotating order, and each keeps its
best: figures from a shared machine then compare like with like.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kvpilot_engine.bench.throughput import (
    Baseline,
    Workload,
    hf_model,
    left_padded,
    workload_from,
)
from kvpilot_engine.config import EngineArgs, ModelConfig
from kvpilot_engine.cpu_linear import repack_changed
from kvpilot_engine.lora.request import LoRARequest

# kvpilot's mixed batches against each row: at least this share of the base model's throughput,
# and this many times the one-at-a-time and peft rows.
TARGETS = {"base": 0.75, "one_at_a_time": 3.0, "peft": 3.0}


def make_adapters(
    model: torch.nn.Module, out: Path, n: int, rank: int, targets: list[str], seed: int
) -> tuple[torch.nn.Module, list[LoRARequest]]:
    """`n` random PEFT adapters on `model`, saved under `out/<name>`; returns the PeftModel
    holding them all (for peft's own mixed batches) and a LoRARequest per adapter."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=list(targets),
        lora_dropout=0.0,
        # Not peft's default (B = 0, an adapter that changes nothing): both A and B random.
        init_lora_weights=False,
    )
    names = [f"lora{i}" for i in range(n)]
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    peft_model.save_pretrained(str(out))  # adapters other than "default" go to out/<name>
    peft_model.eval()
    return peft_model, [LoRARequest(name, i + 1, str(out / name)) for i, name in enumerate(names)]


def adapter_deltas(lora: LoRARequest, config: ModelConfig) -> dict[str, torch.Tensor]:
    """The adapter's weight updates by HF module name (`model.layers.0.self_attn.q_proj`),
    B @ A as the engine reads the adapter (load_adapter: the scaling folded into B), which is
    the update peft merges."""
    from kvpilot_engine.lora.adapter import ATTENTION_MODULES, load_adapter

    adapter = load_adapter(lora, config, max_lora_rank=2**31)  # the rank is not in question
    return {
        f"model.layers.{layer}.{'self_attn' if m in ATTENTION_MODULES else 'mlp'}.{m}": b @ a
        for (layer, m), (a, b) in adapter.weights.items()
    }


def _param(params: dict[str, torch.nn.Parameter], module: str) -> torch.Tensor:
    for name in (f"{module}.weight", f"{module}.base_layer.weight"):
        if name in params:
            return params[name]
    raise KeyError(f"kvpilot's model has no weight for {module!r}")


def merge(model: torch.nn.Module, deltas: dict[str, torch.Tensor], sign: float) -> None:
    """Add (sign 1) or take back (sign -1) an adapter's updates in kvpilot's (fused) weights."""
    from kvpilot_engine.models.llama import _STACKED  # the checkpoint loader's fused layout

    params = dict(model.named_parameters())
    with torch.no_grad():
        for module, delta in deltas.items():
            parent, _, leaf = module.rpartition(".")
            if leaf in _STACKED:
                fused, index = _STACKED[leaf]
                offset, size = model._shard(fused, index)  # type: ignore[operator]
                w = _param(params, f"{parent}.{fused}")[offset : offset + size]
            else:
                w = _param(params, module)
            w.add_(delta.to(w.device, w.dtype), alpha=sign)
    repack_changed(model)  # CPU's prepacked copies of the merged weights: part of the swap's cost


def _params(work: Workload, order: list[int]) -> list:
    from kvpilot_engine.sampling_params import SamplingParams

    return [
        SamplingParams(temperature=0.0, max_tokens=work.output_lens[i], ignore_eos=True)
        for i in order
    ]


def _warm_up(llm, work: Workload, lora: LoRARequest | None = None) -> None:
    from kvpilot_engine.sampling_params import SamplingParams

    llm.generate(
        {"prompt_token_ids": work.prompts[0][:32]},
        SamplingParams(max_tokens=4, ignore_eos=True),
        use_tqdm=False,
        lora_request=lora,
    )


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) since `start`. On a shared machine the CPU
    time is the steadier figure: waiting for a core counts in the wall time only."""
    return time.perf_counter() - start[0], time.process_time() - start[1]


def _generated(outs: list) -> int:
    return sum(len(o.outputs[0].token_ids) for o in outs)


def bench_base(llm, work: Workload) -> tuple[float, float]:
    """(a) every request on the base model, one batch. (wall, CPU) seconds."""
    _warm_up(llm, work)
    order = list(range(len(work.prompts)))
    t0 = _clock()
    outs = llm.generate(
        [{"prompt_token_ids": work.prompts[i]} for i in order], _params(work, order), use_tqdm=True
    )
    elapsed = _since(t0)
    assert _generated(outs) == work.total_output
    return elapsed


def bench_mixed(
    llm, work: Workload, loras: list[LoRARequest], assign: list[int]
) -> tuple[float, float]:
    """kvpilot: every request on its adapter, all in one batch. (wall, CPU) seconds."""
    for lora in loras:  # first loads are not what we measure (they are the same for every row)
        _warm_up(llm, work, lora)
    order = list(range(len(work.prompts)))
    t0 = _clock()
    outs = llm.generate(
        [{"prompt_token_ids": work.prompts[i]} for i in order],
        _params(work, order),
        lora_request=[loras[assign[i]] for i in order],
        use_tqdm=True,
    )
    elapsed = _since(t0)
    assert _generated(outs) == work.total_output
    return elapsed


def bench_one_at_a_time(
    llm, work: Workload, loras: list[LoRARequest], assign: list[int]
) -> tuple[float, float, float]:
    """(b) each adapter merged into the base weights in turn, its requests run as one batch,
    then unmerged. (wall, CPU) seconds and the wall seconds of merging and unmerging."""
    engine = llm.llm_engine
    deltas = [adapter_deltas(lora, engine.model_config) for lora in loras]  # not timed: read first
    model = engine.model
    merge_time = 0.0
    generated = 0
    t0 = _clock()
    for k in tqdm(range(len(loras)), desc="one adapter at a time", unit="adapter"):
        order = [i for i in range(len(work.prompts)) if assign[i] == k]
        if not order:
            continue
        tm = time.perf_counter()
        merge(model, deltas[k], 1.0)
        merge_time += time.perf_counter() - tm
        outs = llm.generate(
            [{"prompt_token_ids": work.prompts[i]} for i in order],
            _params(work, order),
            use_tqdm=False,
        )
        generated += _generated(outs)
        tm = time.perf_counter()
        merge(model, deltas[k], -1.0)
        merge_time += time.perf_counter() - tm
    wall, cpu = _since(t0)
    assert generated == work.total_output
    return wall, cpu, merge_time


def bench_peft(
    peft_model: torch.nn.Module,
    base: Baseline,
    work: Workload,
    loras: list[LoRARequest],
    assign: list[int],
    batch_size: int,
) -> tuple[float, float]:
    """(c) peft's mixed-adapter batches: static left-padded batches, each row on its adapter.
    (wall, CPU) seconds."""
    order = list(range(len(work.prompts)))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    pad = base.pad_token_id
    t0 = _clock()
    for batch in tqdm(batches, desc="peft mixed batches", unit="batch"):
        ids, mask = left_padded([work.prompts[i] for i in batch], pad, base.device)
        with torch.inference_mode():
            peft_model.generate(
                input_ids=ids,
                attention_mask=mask,
                adapter_names=[loras[assign[i]].lora_name for i in batch],
                do_sample=False,
                max_new_tokens=max(work.output_lens[i] for i in batch),
                pad_token_id=pad,
            )
    return _since(t0)


def run_lora_bench(ns: argparse.Namespace, args: EngineArgs) -> int:
    from kvpilot_engine.llm import LLM

    work = workload_from(ns, args)

    if args.quantization not in ("none", None) or args.tensor_parallel_size != 1:
        raise ValueError("bench throughput --lora: merging needs unquantized, unsharded weights")
    n, rank = ns.num_loras, ns.lora_rank
    targets = [t.strip() for t in ns.lora_target_modules.split(",") if t.strip()]
    assign = [i % n for i in range(len(work.prompts))]
    print(
        f"adapters: {n} random (peft), rank {rank}, on {','.join(targets)}; "
        f"request i on adapter i mod {n}"
    )
    # No prefix caching: the one-at-a-time row reruns the base row's prompts on the same engine
    # and would find their KV cached (computed with other weights); random prompts share nothing
    # else, so no row loses by it.
    base_args = {**args.__dict__, "enable_lora": False, "enable_prefix_caching": False}
    lora_args = {
        **base_args,
        "enable_lora": True,
        "max_loras": max(args.max_loras, n),  # all of them in one batch: the point of the row
        "max_lora_rank": max(args.max_lora_rank, rank),
    }
    keys = ["base", "mixed", "one_at_a_time"] + ([] if ns.no_baseline else ["peft"])
    walls: dict[str, list[float]] = {k: [] for k in keys}
    cpus: dict[str, list[float]] = {k: [] for k in keys}
    merge_times: list[float] = []
    with tempfile.TemporaryDirectory(prefix="kvpilot-lora-bench-") as tmp:
        # Both engines up at once, so that the rows can take turns: on a shared or throttled
        # machine, rows run minutes apart would see different machines. (a) and (b) share the
        # base engine: (b) merges into its weights and takes each adapter back out.
        llm = LLM(**base_args)
        lora_llm = LLM(**lora_args)
        engine = llm.llm_engine
        base = Baseline(
            engine.checkpoint, engine.dtype, engine.device, engine.tokenizer.eos_token_id or 0
        )
        device = str(engine.device)
        # The adapters, made with peft on transformers' model of the same weights.
        peft_model, loras = make_adapters(
            hf_model(base), Path(tmp), n, rank, targets, ns.dataset_seed
        )

        def run(key: str) -> None:
            if key == "base":
                wall, cpu = bench_base(llm, work)
            elif key == "mixed":
                wall, cpu = bench_mixed(lora_llm, work, loras, assign)
            elif key == "one_at_a_time":
                wall, cpu, merging = bench_one_at_a_time(llm, work, loras, assign)
                merge_times.append(merging)
            else:
                wall, cpu = bench_peft(peft_model, base, work, loras, assign, ns.hf_batch_size)
            walls[key].append(wall)
            cpus[key].append(cpu)
            print(f"{key}: {wall:.1f} s wall, {cpu:.1f} s CPU", flush=True)

        for it in range(ns.num_iters):
            # Each pass in another order, so no row always runs first (cold caches) or last.
            shift = it % len(keys)
            for key in keys[shift:] + keys[:shift]:
                run(key)
        for done in (llm, lora_llm):
            done.llm_engine.shutdown()
    # Best of the passes: the run least disturbed by anything else on the machine.
    tps = {k: work.total_output / min(walls[k]) for k in keys}
    cpu_tps = {k: work.total_output / min(cpus[k]) for k in keys}
    labels = {
        "base": "base model alone (kvpilot, no adapter)",
        "mixed": f"kvpilot, {n} adapters mixed in one batch",
        "one_at_a_time": "one adapter at a time (merge, run, unmerge; kvpilot)",
        "peft": f"peft mixed-adapter batches of {ns.hf_batch_size} (transformers)",
    }
    print("\n| | output tok/s | per CPU second | kvpilot mixed vs this (wall / CPU) | target |")
    print("| --- | ---: | ---: | ---: | --- |")
    for key in keys:
        ratio, cpu_ratio = tps["mixed"] / tps[key], cpu_tps["mixed"] / cpu_tps[key]
        goal = TARGETS.get(key)
        verdict = "" if goal is None else f">= {goal:g}x: {'met' if ratio >= goal else 'NOT met'}"
        print(
            f"| {labels[key]} | {tps[key]:.1f} | {cpu_tps[key]:.1f} | "
            f"{ratio:.2f}x / {cpu_ratio:.2f}x | {verdict} |"
        )
    result = {
        "model": args.model,
        "device": device,
        "dtype": str(base.dtype),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "num_prompts": len(work.prompts),
        "total_input_tokens": work.total_input,
        "total_output_tokens": work.total_output,
        "num_loras": n,
        "lora_rank": rank,
        "lora_target_modules": targets,
        "num_iters": ns.num_iters,
        "wall_seconds": {k: [round(x, 2) for x in v] for k, v in walls.items()},
        "cpu_seconds": {k: [round(x, 2) for x in v] for k, v in cpus.items()},
        "output_tokens_per_s": {k: round(v, 1) for k, v in tps.items()},
        "output_tokens_per_cpu_s": {k: round(v, 1) for k, v in cpu_tps.items()},
        "mixed_vs": {k: round(tps["mixed"] / v, 3) for k, v in tps.items()},
        "mixed_vs_per_cpu_s": {k: round(cpu_tps["mixed"] / v, 3) for k, v in cpu_tps.items()},
        "one_at_a_time_merge_seconds": round(min(merge_times), 2),
    }
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0
