"""`kvpilot bench throughput --run-batch` end to end on a random-weight model: the run-batch path
on the same engine must answer every line of the workload's batch file with the requested
tokens (the command checks, and fails otherwise)."""

from __future__ import annotations

import json

import pytest
from kvpilot_engine.cli import main


@pytest.mark.slow
def test_run_batch_row_answers_the_same_workload(tmp_path, capsys):
    out = tmp_path / "throughput.json"
    argv = ["bench", "throughput", "random:tiny", "--num-prompts", "4", "--input-len", "8", "40"]
    argv += ["--output-len", "2", "9", "--max-model-len", "128", "--kv-cache-memory", "8MiB"]
    argv += ["--run-batch", "--no-baseline"]
    assert main([*argv, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["run_batch_seconds"] > 0 and r["kvpilot_seconds"] > 0
    table = capsys.readouterr().out
    assert "| kvpilot `run-batch` (same engine, batch file in and out) |" in table
    assert "transformers" not in table
