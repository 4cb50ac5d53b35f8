"""Disconnects free KV blocks, /metrics is vLLM-shaped and agrees with the client, overload is a
503, and SIGTERM drains in-flight streams before a clean exit."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.support.engine import MODEL, metric, run_server, scrape, wait_idle

pytestmark = pytest.mark.slow  # every test starts `kvpilot serve`

LONG = {"max_tokens": 200, "ignore_eos": True}  # far longer than any test waits for

VLLM_NAMES = [
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:cache_config_info",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:request_success_total",
    "kvpilot_engine_requests_received_total",
    "kvpilot_engine_info",
    "kvpilot_engine_weight_bytes",
    "kvpilot_engine_step_seconds_bucket",
    "kvpilot_engine_step_prefill_tokens_bucket",
    "kvpilot_engine_step_decode_tokens_bucket",
]


def _stream_lines(client: httpx.Client, url: str, body: dict[str, object]):
    return client.stream("POST", url, json={"model": MODEL, "stream": True, **body})


def test_dropped_stream_frees_blocks(base_url: str) -> None:
    wait_idle(base_url)
    aborted = metric(scrape(base_url), "vllm:request_success_total", finished_reason="abort")
    with (
        httpx.Client(timeout=60) as client,
        _stream_lines(
            client, f"{base_url}/v1/completions", {"prompt": "Tell a story", **LONG}
        ) as r,
    ):
        assert r.status_code == 200
        events = 0
        for line in r.iter_lines():  # leaving this loop early closes the connection
            events += line.startswith("data:")
            if events == 3:
                m = scrape(base_url)
                assert metric(m, "vllm:kv_cache_usage_perc") > 0.0
                assert metric(m, "vllm:num_requests_running") == 1
                break
        assert events == 3
    # The connection is closed mid-stream: the request is aborted and its blocks freed.
    m = wait_idle(base_url, timeout=20)
    assert metric(m, "vllm:request_success_total", finished_reason="abort") == aborted + 1


def test_abandoned_non_streaming_request_frees_blocks(base_url: str) -> None:
    wait_idle(base_url)
    body = {"model": MODEL, "prompt": "Tell a story", **LONG}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base_url}/v1/completions", json=body, timeout=httpx.Timeout(30, read=1.0))
    wait_idle(base_url, timeout=20)


def test_metrics_names_and_buckets(base_url: str) -> None:
    text = httpx.get(f"{base_url}/metrics").text
    for name in VLLM_NAMES:
        assert f'{name}{{model_name="{MODEL}"' in text or f"{name}{{" in text, name
    m = scrape(base_url)
    for le in ("0.1", "0.2", "0.25", "0.5", "1.0", "2.0"):
        metric(m, "vllm:time_to_first_token_seconds_bucket", le=le)
    for le in ("0.02", "0.05", "0.1"):
        metric(m, "vllm:inter_token_latency_seconds_bucket", le=le)
    info = [k for k in m if k.startswith("vllm:cache_config_info{")]
    assert len(info) == 1 and 'block_size="16"' in info[0] and m[info[0]] == 1.0


def test_ttft_histogram_agrees_with_client(base_url: str) -> None:
    wait_idle(base_url)
    before = scrape(base_url)
    client_ttfts: list[float] = []
    with httpx.Client(timeout=60) as client:
        for prompt in ("The sky is", "My favourite food is", "In 1492, Columbus"):
            t0 = time.monotonic()
            with _stream_lines(
                client, f"{base_url}/v1/completions", {"prompt": prompt, "max_tokens": 3}
            ) as r:
                first = None
                for line in r.iter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.monotonic() - t0
                assert first is not None
                client_ttfts.append(first)
    after = wait_idle(base_url)
    name = "vllm:time_to_first_token_seconds"
    count = metric(after, f"{name}_count") - metric(before, f"{name}_count")
    server_sum = metric(after, f"{name}_sum") - metric(before, f"{name}_sum")
    assert count == 3
    # The server's clock starts after the request arrived and stops before the chunk is sent.
    assert 0 < server_sum <= sum(client_ttfts) + 0.01
    assert sum(client_ttfts) - server_sum < 0.3 * 3, (server_sum, client_ttfts)
    generated = metric(after, "vllm:generation_tokens_total") - metric(
        before, "vllm:generation_tokens_total"
    )
    assert generated == 9
    assert metric(after, "vllm:e2e_request_latency_seconds_count") >= 3
    assert metric(after, "vllm:request_success_total", finished_reason="length") >= 3
    received = "kvpilot_engine_requests_received_total"
    assert (
        metric(after, received, outcome="accepted") - metric(before, received, outcome="accepted")
        == 3
    )


def test_unsupported_engine_flags_fail_fast() -> None:
    for flag, message in (
        (["--quantization", "awq"], "invalid choice: 'awq'"),
        (["--quantization-group-size", "100"], "power of two"),
        (["--tensor-parallel-size", "0"], "tensor_parallel_size must be at least 1, got 0"),
    ):
        r = subprocess.run(
            [sys.executable, "-m", "kvpilot_engine.cli", "serve", *flag],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 2 and message in r.stderr, r.stderr


class _Reader(threading.Thread):
    """Reads one SSE stream to the end in the background."""

    def __init__(self, url: str, body: dict[str, object]):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.status: int | None = None
        self.events: list[str] = []
        self.accepted = threading.Event()  # the status line arrived
        self.first_event = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with (
                httpx.Client(timeout=120) as client,
                _stream_lines(client, self.url, self.body) as r,
            ):
                self.status = r.status_code
                self.accepted.set()
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.first_event.set()
        except BaseException as e:
            self.error = e
        finally:
            self.accepted.set()
            self.first_event.set()

    @property
    def text(self) -> str:
        return "".join(json.loads(e)["choices"][0]["text"] for e in self.events[:-1] if "{" in e)


def test_overload_then_sigterm_drains(tmp_path: Path) -> None:
    with run_server(
        tmp_path / "serve.log", "--max-num-seqs", "1", "--max-waiting", "1", "--drain-timeout", "60"
    ) as srv:
        url = f"{srv.url}/v1/completions"
        a = _Reader(url, {"prompt": "Tell a story", "max_tokens": 40, "ignore_eos": True})
        a.start()
        assert a.first_event.wait(60) and a.status == 200, a.error
        # A runs (max_num_seqs=1), so B waits; a third request finds the waiting room full.
        b = _Reader(url, {"prompt": "Hello", "max_tokens": 3})
        b.start()
        assert b.accepted.wait(60) and b.status == 200, b.error
        assert not b.first_event.is_set()  # B is waiting
        r = httpx.post(url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"].isdigit() and r.json()["error"]["code"] == "overloaded"
        m = scrape(srv.url)
        received = "kvpilot_engine_requests_received_total"
        assert metric(m, received, outcome="rejected") == 1
        assert metric(m, received, outcome="accepted") == 2

        srv.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(f"{srv.url}/ready").status_code == 200:
            assert time.monotonic() < deadline, "/ready still 200 after SIGTERM"
            time.sleep(0.05)
        r = httpx.post(url, json={"model": MODEL, "prompt": "Hi", "max_tokens": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"

        a.join(120)
        b.join(120)
        assert srv.proc.wait(60) == 0, srv.log_tail()
        for reader in (a, b):
            assert reader.error is None, reader.error
            assert reader.events[-1] == "[DONE]"
            final = json.loads(reader.events[-2])["choices"][0]
            assert final["finish_reason"] == "length"
        assert a.text


def test_sigterm_past_drain_timeout_aborts_and_exits(tmp_path: Path) -> None:
    """A stream that cannot finish within --drain-timeout is aborted (its client gets a final
    chunk and [DONE], not a cut connection) and the server still exits 0."""
    with run_server(tmp_path / "serve.log", "--drain-timeout", "1") as srv:
        url = f"{srv.url}/v1/completions"
        long = _Reader(url, {"prompt": "Tell a story", "max_tokens": 400, "ignore_eos": True})
        long.start()
        assert long.first_event.wait(60) and long.status == 200, long.error
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0, srv.log_tail()
        exited_s = time.monotonic() - t0
        long.join(30)
        assert long.error is None, long.error
        assert long.events[-1] == "[DONE]"
        final = json.loads(long.events[-2])["choices"][0]
        assert final["finish_reason"] == "abort", final
        assert len(long.text) > 0
        assert exited_s < 15, f"took {exited_s:.1f}s to exit with --drain-timeout 1"
        assert "drain timeout" in srv.log_tail(200)
