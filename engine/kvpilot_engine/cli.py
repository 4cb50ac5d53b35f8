"""The `kvpilot` command. Subcommands import their heavy modules lazily, so commands that do not
run a model never import torch."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Flags for every EngineArgs field: the same names `kvpilot serve` will accept."""
    from kvpilot_engine.config import EngineArgs
    from kvpilot_engine.contracts import QUANTIZATIONS

    d = EngineArgs()
    p.add_argument(
        "model",
        nargs="?",
        default=d.model,
        help="HF folder, GGUF file, or a bundled model (default: smollm2)",
    )
    p.add_argument(
        "--revision",
        default=None,
        help="with a Hub model (org/repo): the branch, tag or commit (default: main)",
    )
    p.add_argument(
        "--download-dir",
        default=None,
        help="with a Hub model: the Hugging Face cache to download into (default: HF_HOME's); "
        "with an s3:// or pvc:// model: the folder (default: ~/.cache/kvpilot/models/...)",
    )
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda[:N]")
    p.add_argument("--max-model-len", type=int, default=d.max_model_len)
    p.add_argument("--block-size", type=int, default=d.block_size)
    p.add_argument(
        "--kv-cache-memory",
        default=d.kv_cache_memory,
        help="bytes for the KV pool, e.g. 2GiB (default: 2GiB on CPU; on a GPU what is left "
        "under --gpu-memory-utilization after the weights and the largest step)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=d.gpu_memory_utilization,
        help="share of the GPU's memory this engine may use (default 0.9)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        default=d.enforce_eager,
        help="GPU: no CUDA graphs for decode steps",
    )
    p.add_argument("--num-kv-blocks", type=int, default=d.num_kv_blocks)
    p.add_argument("--max-num-seqs", type=int, default=d.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=d.max_num_batched_tokens)
    p.add_argument(
        "--no-enable-prefix-caching",
        dest="enable_prefix_caching",
        action="store_false",
        default=d.enable_prefix_caching,
    )
    p.add_argument(
        "--no-enable-chunked-prefill",
        dest="enable_chunked_prefill",
        action="store_false",
        default=d.enable_chunked_prefill,
    )
    p.add_argument("--scheduling-policy", default=d.scheduling_policy, choices=["fcfs", "priority"])
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--quantization",
        default=d.quantization,
        choices=QUANTIZATIONS,
        help="weight storage: int8/int4 weight-only, fp8 (e4m3), gguf (keep the file's grids)",
    )
    p.add_argument(
        "--quantization-group-size",
        type=int,
        default=d.quantization_group_size,
        help="int4 group size along the input dimension (default: 32 when the checkpoint is "
        "already quantized, keeping its grid; else 128)",
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=d.tensor_parallel_size,
        help="processes (GPUs on CUDA) to shard the model over",
    )
    p.add_argument(
        "--speculative-config",
        default=None,
        metavar="JSON",
        help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 5}\' '
        '(methods: ngram, suffix, draft_model with "model")',
    )
    p.add_argument(
        "--enable-lora",
        action="store_true",
        default=d.enable_lora,
        help="serve LoRA adapters (PEFT format), several mixed in one batch",
    )
    p.add_argument(
        "--max-loras",
        type=_positive_int,
        default=d.max_loras,
        help="adapters resident for the running batch at once (default: 1)",
    )
    p.add_argument(
        "--max-lora-rank",
        type=_positive_int,
        default=d.max_lora_rank,
        help="the highest adapter rank accepted (default: 16)",
    )
    p.add_argument(
        "--max-cpu-loras",
        type=_positive_int,
        default=d.max_cpu_loras,
        help="adapters kept in host memory, least recently used dropped (default: --max-loras)",
    )


def fetch_model(ns: argparse.Namespace) -> None:
    """A model that is not here (a Hub repo id `org/repo`, or an hf://, s3:// or pvc:// URI) is
    downloaded first, as vLLM does, and `ns.model` becomes the local folder; the served name
    stays what the user wrote."""
    from kvpilot_engine.contracts import BUNDLED_ALIASES, BUNDLED_MODELS

    model = ns.model
    if (
        not model
        or os.path.exists(os.path.expanduser(model))
        or BUNDLED_ALIASES.get(model.lower(), model.lower()) in BUNDLED_MODELS
    ):
        return
    from kvpilot_engine.sources import SourceError, download, parse_uri
    from kvpilot_engine.sources.base import cache_folder, source_uri

    uri = source_uri(model)
    if uri is None:
        return  # the loader says what is wrong with it
    revision = getattr(ns, "revision", None)
    download_dir = getattr(ns, "download_dir", None)
    try:
        if uri.startswith("hf://"):
            from kvpilot_engine.sources.hub import snapshot_to_cache

            src = parse_uri(uri)
            path = str(snapshot_to_cache(src.location, revision or src.revision, download_dir))
        else:
            path = download_dir or str(cache_folder(uri, "~/.cache/kvpilot/models"))
            download(uri, path, revision=revision)
    except SourceError as e:
        raise ValueError(f"{e.reason}: {e}") from e
    if getattr(ns, "served_model_name", "") is None:
        ns.served_model_name = ns.model
    ns.model = path


def engine_args_from(ns: argparse.Namespace):
    from kvpilot_engine.config import EngineArgs

    fetch_model(ns)
    names = {f.name for f in dataclasses.fields(EngineArgs)}
    return EngineArgs(**{k: v for k, v in vars(ns).items() if k in names})


def cmd_generate(ns: argparse.Namespace) -> int:
    from kvpilot_engine.llm import LLM
    from kvpilot_engine.llm_engine import LLMEngine
    from kvpilot_engine.sampling_params import RequestOutputKind, SamplingParams

    engine = LLMEngine(engine_args_from(ns))
    params = SamplingParams(
        temperature=ns.temperature,
        top_p=ns.top_p,
        top_k=ns.top_k,
        max_tokens=ns.max_tokens,
        seed=ns.sampling_seed,
        output_kind=RequestOutputKind.DELTA,
    )
    prompt: str | list[int] = ns.prompt
    if not ns.raw:
        tok = LLM.from_engine(engine).get_tokenizer()
        if tok.chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": ns.prompt}])
            prompt = tok.encode(text, add_special_tokens=False)
    engine.add_request("cli", prompt, params)
    n_tokens = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            n_tokens += len(out.outputs[0].token_ids)
            sys.stdout.write(out.outputs[0].text)
            sys.stdout.flush()
            if out.finished:
                m = out.metrics
                sys.stdout.write("\n")
                print(
                    f"[{n_tokens} tokens, finish_reason="
                    f"{out.outputs[0].finish_reason}, TTFT {m.time_to_first_token * 1000:.0f} ms]",
                    file=sys.stderr,
                )
    return 0


def cmd_serve(ns: argparse.Namespace) -> int:
    args = engine_args_from(ns)  # flag errors surface before the server starts
    from kvpilot_engine.server.api_server import run_server
    from kvpilot_engine.server.guard import API_KEY_ENV, GuardSettings
    from kvpilot_engine.server.serving_models import runtime_lora_updating_env
    from kvpilot_engine.server.tools import ToolSettings

    if ns.enable_auto_tool_choice and not ns.tool_call_parser:
        raise SystemExit("kvpilot serve: --enable-auto-tool-choice needs --tool-call-parser")
    loras, lora_sources = lora_modules_from(ns)
    allow_runtime_loras = ns.allow_runtime_lora_updating or runtime_lora_updating_env()

    guard = GuardSettings(
        # The environment is how a Secret reaches the pod without showing in its command line.
        api_key=ns.api_key or os.environ.get(API_KEY_ENV) or None,
        max_request_bytes=ns.max_request_bytes,
        trust_priority_header=ns.trust_priority_header,
        max_connections=ns.max_connections,
        max_header_bytes=ns.max_header_bytes,
        header_timeout=ns.header_timeout,
    )

    return run_server(
        args,
        host=ns.host,
        port=ns.port,
        served_model_name=ns.served_model_name or ns.model,
        max_waiting=ns.max_waiting,
        drain_timeout=ns.drain_timeout,
        log_level=ns.log_level,
        inject_step_delay=ns.inject_step_delay,
        guard=guard,
        tools=ToolSettings(ns.enable_auto_tool_choice, ns.tool_call_parser),
        lora_modules=loras,
        lora_sources=lora_sources,
        allow_runtime_lora_updating=allow_runtime_loras,
    )


def lora_modules_from(ns: argparse.Namespace) -> tuple[list, dict[str, str]]:
    """`--lora-modules` as LoRARequests (ids 1, 2, ...), each source URI downloaded first so
    that the server is ready only with its adapters; and what each was given as."""
    from kvpilot_engine.lora.request import LoRARequest
    from kvpilot_engine.server.serving_models import parse_lora_module, resolve_lora_path

    modules = [parse_lora_module(v) for v in ns.lora_modules or ()]
    if modules and not ns.enable_lora:
        raise SystemExit("kvpilot serve: --lora-modules needs --enable-lora")
    served = ns.served_model_name or ns.model
    names = [m.name for m in modules]
    for m in modules:
        if names.count(m.name) > 1 or m.name == served:
            raise SystemExit(f"kvpilot serve: --lora-modules: the name {m.name!r} is taken")
    loras = [
        LoRARequest(m.name, i, resolve_lora_path(m.path), m.base_model_name)
        for i, m in enumerate(modules, start=1)
    ]
    return loras, {m.name: m.path for m in modules}


def cmd_download(ns: argparse.Namespace) -> int:
    from kvpilot_engine.sources import SourceError, download
    from kvpilot_engine.sources.progress import log_event

    try:
        fetched = download(ns.uri, ns.dest, revision=ns.revision, log_interval=ns.log_interval)
    except SourceError as e:
        # The last line: a failed init container's termination message, read by the operator.
        log_event("download failed", uri=ns.uri, reason=e.reason, error=f"{e.reason}: {e}")
        return 1
    summary = json.dumps(fetched.summary(), sort_keys=True)
    print(summary)
    if ns.termination_message_path:
        # What the pod's status carries to the operator (the resolved revision).
        with contextlib.suppress(OSError):
            Path(ns.termination_message_path).write_text(summary)
    return 0


def cmd_run_batch(ns: argparse.Namespace) -> int:
    args = engine_args_from(ns)
    from kvpilot_engine.batch.run_batch import main as run_batch_main

    return run_batch_main(ns, args)


def cmd_bench_throughput(ns: argparse.Namespace) -> int:
    if ns.lora:
        from kvpilot_engine.bench.lora import run_lora_bench

        return run_lora_bench(ns, engine_args_from(ns))
    from kvpilot_engine.bench.throughput import run_throughput_bench

    return run_throughput_bench(ns, engine_args_from(ns))


def cmd_bench_latency(ns: argparse.Namespace) -> int:
    from kvpilot_engine.bench.latency import run_latency_bench

    return run_latency_bench(ns, engine_args_from(ns))


def cmd_bench_spec(ns: argparse.Namespace) -> int:
    from kvpilot_engine.bench.spec_decode import run_spec_bench

    return run_spec_bench(ns, engine_args_from(ns))


def cmd_bench_decode_attention(ns: argparse.Namespace) -> int:
    from kvpilot_engine.bench.decode_attention import run_decode_attention_bench

    return run_decode_attention_bench(ns)


def cmd_export(ns: argparse.Namespace) -> int:
    import torch

    from kvpilot_engine.export import export_hf

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    out = export_hf(ns.model, ns.out, dtype[ns.dtype])
    print(f"wrote a Hugging Face folder of {ns.model} to {out}")
    return 0


def cmd_eval_perplexity(ns: argparse.Namespace) -> int:
    from kvpilot_engine.eval import load_text, perplexity
    from kvpilot_engine.llm_engine import LLMEngine

    methods = ns.compare.split(",") if ns.compare else [ns.quantization]
    rows = []
    for method in methods:
        ns.quantization = method.strip()
        engine = LLMEngine(engine_args_from(ns))
        ids = engine.tokenizer.encode(load_text(ns.text))[: ns.max_tokens]
        result = perplexity(engine, ids, ns.context)
        rows.append((ns.quantization, result, engine.weight_bytes))
        mib = engine.weight_bytes / 2**20
        print(
            f"{ns.quantization}: perplexity {result.perplexity:.4f} over {result.tokens} tokens "
            f"({result.windows} windows of {ns.context}), weights {mib:.1f} MiB",
            flush=True,
        )
        del engine
    if len(rows) > 1:
        base_ppl, base_bytes = rows[0][1].perplexity, rows[0][2]
        print(f"\n| quantization | perplexity | vs {rows[0][0]} | weight MiB | vs {rows[0][0]} |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for method, r, nbytes in rows:
            print(
                f"| {method} | {r.perplexity:.3f} | {100 * (r.perplexity / base_ppl - 1):+.2f}% "
                f"| {nbytes / 2**20:.1f} | {100 * nbytes / base_bytes:.0f}% |"
            )
    return 0


def cmd_bench_serve(ns: argparse.Namespace) -> int:
    from kvpilot_engine.bench.serve import run_serve_bench

    return run_serve_bench(ns)


def _positive_int(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def _positive_float(value: str) -> float:
    x = float(value)
    if not x > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return x


def build_parser() -> argparse.ArgumentParser:
    from kvpilot_engine.contracts import QUANTIZATIONS

    parser = argparse.ArgumentParser(prog="kvpilot", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt (chat template applied)")
    add_engine_args(g)
    g.add_argument("-p", "--prompt", default="Explain in two sentences what a KV cache is.")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, no chat template")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--sampling-seed", type=int, default=None)
    g.set_defaults(func=cmd_generate)

    s = sub.add_parser("serve", help="serve the OpenAI-compatible API, /metrics, /health, /ready")
    add_engine_args(s)
    s.add_argument("--host", default="0.0.0.0", help="address to bind (default: all, as vLLM)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument(
        "--served-model-name",
        default=None,
        help="the name clients send as `model` (default: MODEL)",
    )
    s.add_argument(
        "--max-waiting",
        type=_positive_int,
        default=256,
        help="requests allowed to wait for a slot; beyond, 503 with Retry-After",
    )
    s.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds to let in-flight requests finish before aborting them",
    )
    s.add_argument(
        "--api-key",
        default=None,
        help="require Authorization: Bearer KEY on /v1/* (default: $KVPILOT_API_KEY; probes and "
        "/metrics stay open)",
    )
    s.add_argument(
        "--max-request-bytes",
        type=_positive_int,
        default=8 * 2**20,
        help="larger request bodies get 413 (default: 8 MiB)",
    )
    s.add_argument(
        "--max-connections",
        type=_positive_int,
        default=2048,
        help="connections served at once; beyond, 503 at once (default: 2048)",
    )
    s.add_argument(
        "--max-header-bytes",
        type=_positive_int,
        default=64 * 2**10,
        help="request lines and headers still incomplete past this are refused with 400 (a slow "
        "trickle, or a block longer than one read; default: 64 KiB)",
    )
    s.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds a connection has to send each request's headers, from connecting or the "
        "last response; past it 408 and close (default: 30)",
    )
    s.add_argument(
        "--trust-priority-header",
        action="store_true",
        help="schedule by the X-KVPilot-Priority header (set by kvpilot router from the caller's "
        "API key; lower first); a request body's `priority` is refused either way",
    )
    s.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='let the model decide when to call tools (tool_choice "auto"); needs '
        "--tool-call-parser",
    )
    s.add_argument(
        "--tool-call-parser",
        choices=["hermes", "llama3_json", "mistral"],
        default=None,
        help="how the model writes tool calls: hermes (<tool_call> JSON; also the format of "
        "kvpilot's tool prompt for templates without tool support), llama3_json, mistral",
    )
    s.add_argument(
        "--lora-modules",
        nargs="+",
        default=None,
        metavar="NAME=PATH",
        help="LoRA adapters served by name (needs --enable-lora): name=path or "
        '\'{"name": ..., "path": ..., "base_model_name": ...}\'; a path is a folder or a '
        "source URI (hf://, s3://, pvc://, oci://), downloaded before the server is ready",
    )
    s.add_argument(
        "--allow-runtime-lora-updating",
        action="store_true",
        help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter (also: "
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)",
    )
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.add_argument(
        "--inject-step-delay",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="fault injection: sleep this long before every engine step (tests, canary drills)",
    )
    s.set_defaults(func=cmd_serve)

    rb = sub.add_parser(
        "run-batch",
        help="answer an OpenAI batch file (JSONL) offline; resumable (vLLM's run-batch)",
    )
    add_engine_args(rb)
    rb.add_argument("-i", "--input-file", required=True, help="batch requests, one JSON a line")
    rb.add_argument(
        "-o", "--output-file", required=True, help="results (appended; ids already there skipped)"
    )
    rb.add_argument(
        "--served-model-name", default=None, help="the `model` the lines must name (default: MODEL)"
    )
    rb.add_argument(
        "--max-inflight",
        type=_positive_int,
        default=1024,
        help="engine requests in flight at once (default: 1024)",
    )
    rb.add_argument("--disable-progress-bar", action="store_true")
    rb.set_defaults(func=cmd_run_batch)

    dl = sub.add_parser(
        "download",
        help="fetch a model (hf://org/repo[@rev], s3://bucket/prefix, pvc://claim/path) into "
        "a folder: pinned, resumable, checksums verified",
    )
    dl.add_argument("uri", help="hf://org/repo[@revision], s3://bucket[/prefix], pvc://claim/path")
    dl.add_argument("dest", help="folder to download into (a second run resumes or reuses it)")
    dl.add_argument(
        "--revision",
        default=None,
        help="pin: a Hub branch, tag or commit (wins over the URI's @revision), or the "
        "revision an S3 or PVC download reported (the source must not have changed)",
    )
    dl.add_argument(
        "--log-interval", type=float, default=5.0, help="seconds between progress lines"
    )
    dl.add_argument(
        "--termination-message-path",
        default=None,
        help="write the result (JSON: uri, revision, bytes) here too, e.g. /dev/termination-log",
    )
    dl.set_defaults(func=cmd_download)

    e = sub.add_parser("export", help="write a model (e.g. a GGUF) as a Hugging Face folder")
    e.add_argument("model", help="HF folder, GGUF file, or a bundled model")
    e.add_argument("out", help="folder to write")
    e.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    e.set_defaults(func=cmd_export)

    ev = sub.add_parser("eval", help="model quality").add_subparsers(dest="eval", required=True)
    pp = ev.add_parser("perplexity", help="perplexity on a fixed English text (CPython's docs)")
    add_engine_args(pp)
    pp.add_argument("--text", default=None, help="a UTF-8 file (default: pydoc_data.topics)")
    pp.add_argument("--max-tokens", type=int, default=16384, help="tokens of the text to score")
    pp.add_argument("--context", type=int, default=1024, help="tokens per scored window")
    pp.add_argument(
        "--compare", default=None, help="comma list of quantizations, e.g. none,int8,int4"
    )
    pp.set_defaults(func=cmd_eval_perplexity)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench", required=True)
    t = bench.add_parser("throughput", help="offline generation throughput, vs transformers")
    add_engine_args(t)
    t.add_argument("--num-prompts", type=int, default=64)
    t.add_argument("--input-len", type=int, nargs=2, default=[32, 512], metavar=("MIN", "MAX"))
    t.add_argument("--output-len", type=int, nargs=2, default=[32, 256], metavar=("MIN", "MAX"))
    t.add_argument("--dataset-seed", type=int, default=0)
    t.add_argument(
        "--hf-batch-size",
        type=int,
        default=16,
        help="static batch size for the transformers baseline",
    )
    t.add_argument("--no-baseline", action="store_true", help="skip transformers (or peft)")
    t.add_argument(
        "--run-batch",
        action="store_true",
        help="also `kvpilot run-batch` on the same engine and workload, written as a batch file "
        "of /v1/completions lines (not with --lora)",
    )
    t.add_argument(
        "--lora",
        action="store_true",
        help="random LoRA adapters mixed in the workload, against the base model, one adapter "
        "at a time (merged) and peft's mixed batches",
    )
    t.add_argument("--num-loras", type=_positive_int, default=8, help="with --lora (default 8)")
    t.add_argument("--lora-rank", type=_positive_int, default=16, help="with --lora (default 16)")
    t.add_argument(
        "--lora-target-modules",
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        help="with --lora: the modules the adapters change (default: every linear layer)",
    )
    t.add_argument(
        "--num-iters",
        type=_positive_int,
        default=1,
        help="with --lora: passes over every row, in turns; the best of each row is kept",
    )
    t.add_argument("--json", default=None, help="also write the figures to this file")
    t.set_defaults(func=cmd_bench_throughput)

    lat = bench.add_parser("latency", help="batch-1 decode: tokens/s and achieved bandwidth")
    add_engine_args(lat)
    lat.add_argument("--input-len", type=int, default=128)
    lat.add_argument("--output-len", type=int, default=256)
    lat.add_argument("--num-iters", type=int, default=3, help="timed runs after one warm-up")
    lat.add_argument("--dataset-seed", type=int, default=0)
    lat.add_argument(
        "--compare-quantization",
        dest="quantization_list",
        nargs="+",
        default=None,
        choices=QUANTIZATIONS,
        help="run each method in turn; speed-ups are over the first (e.g. none int8 int4 fp8)",
    )
    lat.add_argument(
        "--peak-bandwidth",
        type=float,
        default=None,
        help="the device's peak memory bandwidth in GB/s (default: known GPUs, e.g. H200 4800)",
    )
    lat.add_argument("--json", default=None, help="also write the figures to this file")
    lat.set_defaults(func=cmd_bench_latency)

    sp = bench.add_parser(
        "spec", help="speculative against plain decoding: code editing and free chat, same run"
    )
    add_engine_args(sp)
    sp.add_argument(
        "--workloads",
        nargs="+",
        default=["edit", "chat"],
        choices=["edit", "qa", "chat"],
        help="edit: repeat a given file; qa: answer from a given document; chat: free text",
    )
    sp.add_argument(
        "--compare-transformers",
        action="store_true",
        help="also transformers' generate, plain and with prompt lookup, at 1 in flight",
    )
    sp.add_argument("--concurrency", type=int, default=4, help="requests in flight besides 1")
    sp.add_argument("--output-len", type=int, default=128)
    sp.add_argument("--num-iters", type=int, default=2, help="timed runs per engine; best kept")
    sp.add_argument("--json", default=None, help="also write the figures to this file")
    sp.set_defaults(func=cmd_bench_spec)

    da = bench.add_parser(
        "decode-attention", help="CPU decode attention: the C++ kernel vs the PyTorch reference"
    )
    da.add_argument("--seqs", type=int, default=64)
    da.add_argument("--min-len", type=int, default=200)
    da.add_argument("--max-len", type=int, default=600)
    da.add_argument("--heads", type=int, default=9)
    da.add_argument("--kv-heads", type=int, default=3)
    da.add_argument("--head-dim", type=int, default=64)
    da.add_argument("--block-size", type=int, default=16)
    da.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    da.add_argument("--iters", type=int, default=30)
    da.add_argument("--seed", type=int, default=0)
    da.add_argument("--json", default=None, help="also write the figures to this file")
    da.set_defaults(func=cmd_bench_decode_attention)

    b = bench.add_parser("serve", help="online load against any OpenAI-compatible server(s)")
    b.add_argument(
        "--base-url",
        nargs="+",
        default=["http://127.0.0.1:8000"],
        help="one or more servers, measured one after the other with the same load",
    )
    b.add_argument("--model", default=None, help="model name to send (default: the first served)")
    b.add_argument("--num-prompts", type=int, default=64)
    b.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests/s with Poisson arrivals (default: inf, all at once)",
    )
    b.add_argument(
        "--max-concurrency",
        type=_positive_int,
        nargs="*",
        default=None,
        help="cap on requests in flight; several values run one after the other",
    )
    b.add_argument(
        "--input-len",
        type=int,
        nargs=2,
        default=[64, 256],
        metavar=("MIN", "MAX"),
        help="prompt length in words (about one token each)",
    )
    b.add_argument("--output-len", type=int, nargs=2, default=[32, 128], metavar=("MIN", "MAX"))
    b.add_argument(
        "--dataset",
        default="random",
        choices=["random", "edit", "qa", "chat"],
        help="random words of --input-len, or text for speculative decoding: edit (repeat a "
        "given file), qa (answer from a given document), chat (free text)",
    )
    b.add_argument("--seed", type=int, default=0)
    b.add_argument(
        "--no-ignore-eos",
        dest="ignore_eos",
        action="store_false",
        help="do not send vLLM's ignore_eos extension",
    )
    b.add_argument("--slo-ttft-ms", type=float, default=None, help="TTFT target for goodput")
    b.add_argument("--slo-tpot-ms", type=float, default=None, help="TPOT target for goodput")
    b.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    b.add_argument("--json", default=None, help="also write the figures to this file")
    b.set_defaults(func=cmd_bench_serve)

    # The control plane's commands live with it (and import neither torch nor the engine).
    from kvpilot_operator.cli import add_commands

    add_commands(sub, bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    try:
        return int(ns.func(ns) or 0)
    except (FileNotFoundError, ValueError) as e:
        print(f"kvpilot: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
