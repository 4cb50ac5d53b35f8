"""`kvpilot bench decode-attention`: one layer's decode attention over the paged KV cache, the
C++ CPU kernel against the PyTorch reference (gather + SDPA) on the same inputs, in one run.

The shape defaults to SmolLM2's (9 query heads over 3 KV heads of 64) at 64 sequences of
200-600 cached tokens in blocks scattered through the pool, the decode step the offline
throughput benchmark spends its time in.
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable

import torch

from kvpilot_engine.attention import (
    AttentionMetadata,
    Workspace,
    build_decode_groups,
    paged_attention,
)
from kvpilot_engine.kernels import cpu_decode


def _time(fn: Callable[[], object], iters: int) -> float:
    fn()  # warm-up (first-touch of buffers)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


def run_decode_attention_bench(ns: argparse.Namespace) -> int:
    if not cpu_decode.load():
        print("the C++ CPU decode kernel is unavailable here (see the warning above)")
        return 1
    gen = torch.Generator().manual_seed(ns.seed)
    heads, kv_heads, head_dim, bs, n = ns.heads, ns.kv_heads, ns.head_dim, ns.block_size, ns.seqs
    lens = torch.randint(ns.min_len, ns.max_len + 1, (n,), generator=gen).tolist()
    num_blocks = sum(-(-length // bs) for length in lens)
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[order.pop() for _ in range(-(-length // bs))] for length in lens]
    width = max(len(t) for t in tables)
    rows = []
    for name in ns.dtypes:
        dtype = getattr(torch, name)
        key_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=gen).to(dtype)
        value_cache = torch.randn(num_blocks, bs, kv_heads, head_dim, generator=gen).to(dtype)
        query = torch.randn(n, heads, head_dim, generator=gen).to(dtype)
        result = {}
        for kernel in (False, True):
            meta = AttentionMetadata(
                slot_mapping=torch.empty(0, dtype=torch.long),
                query_start_loc=list(range(n + 1)),
                context_lens=lens,
                block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables]),
                decode_seqs=list(range(n)),
                prefill_seqs=[],
                max_context_len=max(lens),
            )
            workspace = Workspace((bs, kv_heads, head_dim), dtype, torch.device("cpu"))
            meta.decode_groups = build_decode_groups(meta, bs, workspace, cpu_kernel=kernel)
            step = functools.partial(
                paged_attention, query, key_cache, value_cache, meta, head_dim**-0.5
            )
            out = step()
            secs = _time(step, ns.iters)
            result[kernel] = (secs, out.float())
        (ref_s, ref_out), (ker_s, ker_out) = result[False], result[True]
        kv_bytes = 2 * sum(lens) * kv_heads * head_dim * key_cache.element_size()
        rows.append(
            {
                "dtype": name,
                "reference_ms": ref_s * 1e3,
                "kernel_ms": ker_s * 1e3,
                "speedup": ref_s / ker_s,
                "kernel_kv_gb_per_s": kv_bytes / ker_s / 1e9,
                "max_abs_diff": (ref_out - ker_out).abs().max().item(),
            }
        )
    print(
        f"decode attention, {n} sequences of {ns.min_len}-{ns.max_len} tokens ({sum(lens)} in "
        f"all), {heads} heads over {kv_heads} KV heads of {head_dim}, block {bs}, "
        f"{torch.get_num_threads()} threads, {ns.iters} iterations"
    )
    print("| dtype | reference (gather + SDPA) | C++ kernel | speed-up | KV read | max abs diff |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['dtype']} | {r['reference_ms']:.2f} ms | {r['kernel_ms']:.2f} ms | "
            f"{r['speedup']:.2f}x | {r['kernel_kv_gb_per_s']:.1f} GB/s | {r['max_abs_diff']:.1e} |"
        )
    if ns.json:
        with open(ns.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0
