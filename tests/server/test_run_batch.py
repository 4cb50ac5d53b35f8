"""`kvpilot run-batch`: an OpenAI batch file answered offline, checked line by line against the
same requests sent one by one to `kvpilot serve` (greedy, so the answers must be equal), with bad
lines that become error lines and an output left by an interrupted run that is resumed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.support.engine import MAX_MODEL_LEN, MODEL, Server

pytestmark = pytest.mark.slow

TOPICS = ["tea", "rain", "maps", "bees", "salt", "glass", "wind", "moss", "ink", "clay"]


def _good_lines() -> list[dict]:
    lines = []
    for i, topic in enumerate(TOPICS * 2):
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"Say one thing about {topic} ({i})."}],
            "max_tokens": 6 + i % 5,
            "temperature": 0,
        }
        if i == 3:
            body |= {"logprobs": True, "top_logprobs": 2}
        lines.append({"custom_id": f"chat-{i}", "url": "/v1/chat/completions", "body": body})
    for i, topic in enumerate(TOPICS[:6]):
        body = {
            "model": MODEL,
            "prompt": f"A short note on {topic}:",
            "max_tokens": 8,
            "temperature": 0,
        }
        if i == 1:  # several prompts, n samples each: choices numbered across them
            body |= {"prompt": [f"{topic} is", f"{topic} was"], "n": 2}
        if i == 2:
            body |= {"echo": True, "stop": ["."]}
        lines.append({"custom_id": f"cmpl-{i}", "url": "/v1/completions", "body": body})
    return [{**x, "method": "POST"} for x in lines]


BAD = [
    "{not json",
    json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
    json.dumps({"custom_id": "chat-0", "method": "POST", "url": "/v1/completions", "body": {}}),
    json.dumps(
        {
            "custom_id": "bad-model",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": "gpt-4o", "prompt": "hi"},
        }
    ),
    json.dumps(
        {
            "custom_id": "bad-field",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {
                "model": MODEL,
                "messages": [{"role": "user", "content": "hi"}],
                "temperature": "warm",
            },
        }
    ),
    json.dumps(
        {
            "custom_id": "too-long",
            "method": "POST",
            "url": "/v1/completions",
            "body": {"model": MODEL, "prompt": "word " * 2000, "max_tokens": 4},
        }
    ),
]

# Left by a run killed after writing these: kept as they are, not redone; the torn last line is.
RESUMED = ["chat-5", "cmpl-4"]


def _comparable(body: dict) -> dict:
    body = dict(body)
    for key in ("id", "created"):
        body.pop(key)
    return body


def _same(got: object, want: object) -> bool:
    """Equal, logprobs to 1e-3: another batch's composition changes the float sums a little."""
    if isinstance(got, float) and isinstance(want, float):
        return abs(got - want) < 1e-3
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(_same(got[k], want[k]) for k in got)
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(_same(a, b) for a, b in zip(got, want, strict=True))
    return got == want


def test_run_batch_answers_as_the_server_does_and_resumes(server: Server, tmp_path: Path) -> None:
    good = _good_lines()
    inp, out = tmp_path / "requests.jsonl", tmp_path / "results.jsonl"
    text = [json.dumps(x) for x in good]
    inp.write_text("\n".join(text[:10] + BAD[:3] + text[10:] + BAD[3:]) + "\n\n")
    kept = [
        json.dumps({"id": f"old-{c}", "custom_id": c, "response": {"status_code": 200,
                    "request_id": "old", "body": {"kept": True}}, "error": None})
        for c in RESUMED
    ]  # fmt: skip
    # A run writes the lines that are no request first; one without a custom_id is known to be
    # done by the output not being empty.
    error = {"code": "invalid_json", "message": "line 11"}
    kept.insert(0, json.dumps({"id": "x", "custom_id": None, "response": None, "error": error}))
    torn = json.dumps({"id": "old-x", "custom_id": "chat-7", "response": None})[:30]
    out.write_text("\n".join(kept) + "\n" + torn)

    cmd = [
        sys.executable, "-m", "kvpilot_engine.cli", "run-batch", MODEL, "-i", str(inp),
        "-o", str(out), "--dtype", "float32", "--kv-cache-memory", "64MiB",
        "--max-model-len", str(MAX_MODEL_LEN), "--max-num-seqs", "16",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = done.stderr.strip().splitlines()[-1]
    want = (
        f"{len(good) - len(RESUMED)} succeeded, {len(BAD) - 1} failed, {len(RESUMED) + 1} already"
    )
    assert want in summary, summary

    results = [json.loads(x) for x in out.read_text().splitlines()]
    assert results[: len(kept)] == [json.loads(k) for k in kept]  # untouched; the torn line gone
    by_id: dict[str | None, list[dict]] = {}
    for r in results:
        by_id.setdefault(r["custom_id"], []).append(r)
    # Every request exactly once (chat-0 twice: its answer, and its duplicate's error line).
    assert set(by_id) == {x["custom_id"] for x in good} | {None, *BAD_IDS}
    assert len(by_id["chat-0"]) == 2 and len(by_id[None]) == 1
    assert all(len(v) == 1 for k, v in by_id.items() if k not in ("chat-0", None))

    assert by_id[None][0]["error"]["code"] == "invalid_json"
    assert by_id["bad-url"][0]["error"]["code"] == "invalid_url"
    dup = [r for r in by_id["chat-0"] if r["error"]]
    assert dup and dup[0]["error"]["code"] == "duplicate_custom_id"
    for cid, status, param in [
        ("bad-model", 404, "model"),
        ("bad-field", 400, "temperature"),
        ("too-long", 400, "prompt"),
    ]:
        (r,) = by_id[cid]
        assert r["error"] is None and r["response"]["status_code"] == status
        assert r["response"]["body"]["error"]["param"] == param, r

    # The oracle: each request sent on its own to `kvpilot serve` (same model, greedy).
    with httpx.Client(base_url=server.url, timeout=120) as client:
        for line in good:
            if line["custom_id"] in RESUMED:
                continue
            want = client.post(line["url"], json=line["body"])
            assert want.status_code == 200, want.text
            (got,) = [r for r in by_id[line["custom_id"]] if r["response"]]
            assert got["error"] is None and got["response"]["status_code"] == 200
            got_body, want_body = _comparable(got["response"]["body"]), _comparable(want.json())
            assert _same(got_body, want_body), (line, got_body, want_body)


BAD_IDS = ["bad-url", "bad-model", "bad-field", "too-long"]
