"""`kvpilot bench throughput --lora`'s one-adapter-at-a-time row: an adapter merged into the base
weights (bench.lora.merge, with the update the engine reads) scores as the engine applying the
adapter does, and unmerging gives the base back. The throughput figures are in
docs/benchmarks.md; here the row must compare like with like."""

from __future__ import annotations

import json

import pytest
from kvpilot_engine import LoRARequest
from kvpilot_engine.bench.lora import adapter_deltas, merge

from tests.support.lora import write_adapter

pytestmark = pytest.mark.slow  # SmolLM2 twice

PROMPT = [504, 3575, 282, 4649, 314, 3575, 282]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def test_merged_adapter_scores_as_the_engine_applies_it(make_smollm2, tmp_path) -> None:
    path = write_adapter(tmp_path / "all", 8, TARGETS, seed=5)
    config = json.loads((path / "adapter_config.json").read_text())
    config["lora_alpha"] = 32 * config["r"]  # strong enough to matter
    (path / "adapter_config.json").write_text(json.dumps(config))
    lora = LoRARequest("all", 1, str(path))
    small = {"max_model_len": 256, "kv_cache_memory": "32MiB"}

    want = make_smollm2(enable_lora=True, max_lora_rank=8, **small).llm_engine.score(PROMPT, lora)
    base = make_smollm2(**small).llm_engine
    before = base.score(PROMPT)
    deltas = adapter_deltas(lora, base.model_config)
    merge(base.model, deltas, 1.0)
    merged = base.score(PROMPT)
    merge(base.model, deltas, -1.0)
    after = base.score(PROMPT)

    scale = want.abs().max().item()
    assert (merged - want).abs().max().item() / scale < 1e-4
    assert (before - want).abs().max().item() / scale > 1e-2  # the adapter changes the logits
    assert (after - before).abs().max().item() / scale < 1e-5
