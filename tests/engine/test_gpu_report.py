"""`scripts/gpu-check.sh`'s table, from a folder laid out as the script leaves it: figures beside
their targets, and a step that failed or timed out reported as such, not as a figure."""

from __future__ import annotations

import json

from kvpilot_engine.bench.gpu_report import report

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.engine.test_triton_model" name="test_gpu_greedy_matches_cpu[True]"/>
<testcase classname="tests.engine.test_triton_kernels" name="test_bfloat16_kernels_gpu[1]">
<failure message="AssertionError: rel err 0.2&#10;more">trace</failure></testcase>
</testsuite></testsuites>"""


def _row(method: str, tps: float, share: float, speedup: float) -> dict:
    return {
        "quantization": method, "weight_bytes": 2**30, "kv_bytes_per_token": 1,
        "prefill_ms": 10.0, "decode_ms_p50": 1000 / tps, "decode_ms_p90": 1000 / tps,
        "tokens_per_s": tps, "bandwidth_gbs": share * 4800, "share_of_peak": share,
        "speedup": speedup,
    }  # fmt: skip


def test_report_puts_figures_beside_targets(tmp_path):
    (tmp_path / "env.txt").write_text("NVIDIA H200\ntorch 2.11")
    (tmp_path / "steps.txt").write_text("tests 1 57\nlatency 0 60\nthroughput 124 300\n")
    (tmp_path / "tests.xml").write_text(JUNIT)
    latency = {
        "model": "random:llama-3-8b", "device": "NVIDIA H200", "dtype": "bfloat16",
        "input_len": 128, "output_len": 256, "num_iters": 3, "peak_bandwidth_gbs": 4800.0,
        "results": [_row("none", 200, 0.8, 1.0), _row("int8", 300, 0.6, 1.5)],
    }  # fmt: skip
    (tmp_path / "latency.json").write_text(json.dumps(latency))
    md = report(tmp_path)
    assert "NVIDIA H200" in md
    assert "| `test_triton_model::test_gpu_greedy_matches_cpu[True]` | passed |" in md
    assert "| `test_triton_kernels::test_bfloat16_kernels_gpu[1]` | failure: AssertionError" in md
    none_row = next(line for line in md.splitlines() if line.startswith("| none |"))
    assert "80.0%" in none_row and none_row.endswith("| met |")  # 80% of peak >= 75%
    int8_row = next(line for line in md.splitlines() if line.startswith("| int8 |"))
    assert int8_row.endswith("| >= 1.6x | not met |")  # 1.5x < 1.6x
    assert "No figures (timed out after 300 s)." in md  # throughput left no JSON


def test_spec_step_appears_only_when_run(tmp_path):
    (tmp_path / "steps.txt").write_text("tests 0 50\n")
    assert "Speculative decoding" not in report(tmp_path)  # opt-in: absent unless asked for
    (tmp_path / "steps.txt").write_text("tests 0 50\nspec 0 200\n")
    rows = [
        {"workload": "edit", "in_flight": 1, "plain_tokens_per_s": 100.0,
         "spec_tokens_per_s": 250.0, "speedup": 2.5, "acceptance": 0.8},
        {"workload": "chat", "in_flight": 16, "plain_tokens_per_s": 900.0,
         "spec_tokens_per_s": 850.0, "speedup": 0.944, "acceptance": None},
    ]  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(rows))
    md = report(tmp_path)
    edit = next(line for line in md.splitlines() if line.startswith("| edit | 1 |"))
    assert "80%" in edit and edit.endswith(">= 2.0x: met |")
    chat = next(line for line in md.splitlines() if line.startswith("| chat | 16 |"))
    assert chat.endswith(">= 1.0x: not met |")
    (tmp_path / "spec.json").unlink()
    assert "No figures (exit 0, 200 s)." in report(tmp_path)
