"""`kvpilot bench spec` end to end on a random-weight model of SmolLM2's shape: every workload
(code edit, document QA, chat) on both engines, and transformers' generate (plain and with prompt
lookup) on the same weights, each producing the asked number of tokens. The figures themselves
are in docs/benchmarks.md; here the command must run and report consistent numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kvpilot_engine.bench.datasets import WORKLOADS, qa_prompts
from kvpilot_engine.bench.serve import dataset_prompts
from kvpilot_engine.cli import main


def test_qa_prompts_hold_a_document_and_a_question() -> None:
    prompts = qa_prompts(4)
    assert len(set(prompts)) == 4
    assert all("Question:" in p and len(p) > 1000 for p in prompts)
    assert set(WORKLOADS) == {"edit", "qa", "chat"}
    # `bench serve --dataset qa`: the same prompts, output lengths in the given range.
    served = dataset_prompts("qa", 4, (8, 16), seed=0)
    assert [p for p, _ in served] == prompts and all(8 <= n <= 16 for _, n in served)


@pytest.mark.slow
def test_bench_spec_with_transformers_prompt_lookup(tmp_path: Path, capsys) -> None:
    out = tmp_path / "spec.json"
    rc = main(
        [
            "bench", "spec", "random:tiny", "--max-model-len", "1024",
            "--kv-cache-memory", "64MiB", "--workloads", "qa", "chat",
            "--concurrency", "2", "--output-len", "6", "--num-iters", "1",
            "--compare-transformers", "--json", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    rows = {(r["workload"], r["in_flight"]): r for r in json.loads(out.read_text())}
    assert set(rows) == {("qa", 1), ("qa", 2), ("chat", 1), ("chat", 2)}
    for (_, n), r in rows.items():
        assert r["plain_tokens_per_s"] > 0 and r["spec_tokens_per_s"] > 0
        hf = [k for k in r if k.startswith("hf_")]
        # transformers runs one request at a time: only beside the 1-in-flight rows.
        assert bool(hf) == (n == 1), r
        if n == 1:
            assert r["hf_prompt_lookup_tokens_per_s"] > 0 and r["hf_plain_tokens_per_s"] > 0
            ratio = r["spec_tokens_per_s"] / r["hf_prompt_lookup_tokens_per_s"]
            assert abs(ratio - r["spec_over_hf_prompt_lookup"]) < 1e-2
    assert "ours/lookup" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_spec_draft_model_against_transformers_assistant_model(tmp_path: Path, capsys):
    # The draft method is compared with transformers' assisted generation on the same draft.
    out = tmp_path / "spec.json"
    draft = '{"method": "draft_model", "model": "random:tiny", "num_speculative_tokens": 3}'
    rc = main(
        [
            "bench", "spec", "random:tiny", "--max-model-len", "512", "--kv-cache-memory",
            "64MiB", "--workloads", "chat", "--concurrency", "1", "--output-len", "6",
            "--num-iters", "1", "--compare-transformers", "--speculative-config", draft,
            "--json", str(out),
        ]
    )  # fmt: skip
    assert rc == 0
    (row,) = json.loads(out.read_text())
    assert row["hf_assistant_model_tokens_per_s"] > 0 and row["hf_plain_tokens_per_s"] > 0
    ratio = row["spec_tokens_per_s"] / row["hf_assistant_model_tokens_per_s"]
    assert abs(ratio - row["spec_over_hf_assistant_model"]) < 1e-2
    assert "ours/assisted" in capsys.readouterr().out
