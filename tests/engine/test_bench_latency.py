"""Random-weight models of a named shape, `kvpilot bench latency`, and the GPU path's pieces that
can be checked without a GPU (graph batch sizes). The figures themselves are for a GPU
(docs/benchmarks.md); here the command must run end to end and report consistent numbers."""

from __future__ import annotations

import json

import pytest
import torch
from kvpilot_engine import LLM, SamplingParams
from kvpilot_engine.cli import main
from kvpilot_engine.config import UnsupportedModelError
from kvpilot_engine.cuda_graph import graph_batch_sizes
from kvpilot_engine.loader import RANDOM_SHAPES, load_checkpoint


def test_random_shapes_parse_as_their_architectures():
    llama = load_checkpoint("random:llama-3-8b").config
    assert (llama.hidden_size, llama.num_hidden_layers, llama.num_key_value_heads) == (4096, 32, 8)
    assert llama.rope_theta == 500000.0
    qwen = load_checkpoint("random:qwen3-0.6b").config
    assert qwen.qk_norm and qwen.head_dim == 128 and qwen.tie_word_embeddings
    assert set(RANDOM_SHAPES) >= {"llama-3-8b", "qwen3-0.6b", "tiny"}


def test_unknown_random_shape_is_a_clear_error():
    with pytest.raises(UnsupportedModelError, match="random:llama-3-8b"):
        load_checkpoint("random:gpt-5")


def test_random_model_generates_deterministically():
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    outs = [
        LLM(model="random:tiny", max_model_len=128, num_kv_blocks=32, seed=seed).generate(
            {"prompt_token_ids": [5, 6, 7, 8]}, params, use_tqdm=False
        )[0]
        for seed in (0, 0, 1)
    ]
    tokens = [o.outputs[0].token_ids for o in outs]
    assert len(tokens[0]) == 6
    assert tokens[0] == tokens[1]
    assert tokens[0] != tokens[2]  # another seed, other weights


@pytest.mark.slow
def test_bench_latency_reports_each_quantization(tmp_path, capsys):
    out = tmp_path / "latency.json"
    rc = main(
        [
            "bench",
            "latency",
            "random:tiny",
            "--input-len",
            "12",
            "--output-len",
            "10",
            "--num-iters",
            "2",
            "--max-model-len",
            "128",
            "--compare-quantization",
            "none",
            "int8",
            "--peak-bandwidth",
            "100",
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    report = json.loads(out.read_text())
    none, int8 = report["results"]
    assert [none["quantization"], int8["quantization"]] == ["none", "int8"]
    assert none["speedup"] == 1.0
    assert int8["weight_bytes"] < 0.55 * none["weight_bytes"]
    for r in (none, int8):
        assert 0 < r["decode_ms_p50"] <= r["decode_ms_p90"]
        assert r["tokens_per_s"] == pytest.approx(1000 / r["decode_ms_p50"], rel=1e-2)
        gbs = r["weight_bytes"] * r["tokens_per_s"] / 1e9
        assert r["bandwidth_gbs"] == pytest.approx(gbs, rel=1e-2, abs=0.1)
        assert r["share_of_peak"] == pytest.approx(r["bandwidth_gbs"] / 100, rel=1e-2, abs=1e-3)
    table = capsys.readouterr().out
    assert "int8" in table and "of peak" in table


def test_graph_batch_sizes_cover_every_batch():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    sizes = graph_batch_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 20
    # every batch up to the maximum has a captured size at or above it
    assert all(any(s >= b for s in sizes) for b in range(1, 257))


@pytest.mark.gpu
def test_gpu_kv_pool_fills_the_memory_budget():
    """Default sizing on a GPU: the profiled step plus the pool stay under the budget, and the
    pool takes most of what is left."""
    llm = LLM(model="random:qwen3-0.6b", gpu_memory_utilization=0.5, max_model_len=4096)
    engine = llm.llm_engine
    free, total = torch.cuda.mem_get_info()
    used = total - free
    assert used <= 0.55 * total  # the graphs and this generate come on top of the budget
    assert engine.kv_cache_bytes > 0.25 * total
    assert engine.graph_capture_time is not None
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": [5] * n} for n in (3, 40, 700)], params)
    assert all(len(o.outputs[0].token_ids) == 16 for o in outs)
