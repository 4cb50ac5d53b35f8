"""Prometheus metrics: vLLM's names and labels, so existing dashboards, KEDA recipes and the
Gateway API Inference Extension read a kvpilot pod as they read a vLLM one; plus kvpilot's own
per-step figures for a model-based autoscaler.

Histogram buckets are vLLM's edges with the usual SLO thresholds added, so that an SLO such as
"p99 TTFT under 200 ms" is a bucket edge and `histogram_quantile` / goodput ratios are exact.
Everything is written from the engine thread; prometheus_client is thread-safe.
"""

from __future__ import annotations

import dataclasses
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kvpilot_engine.contracts import (
    ITL_BUCKETS,
    REQUEST_LATENCY_BUCKETS,
    STEP_BUCKETS,
    TTFT_BUCKETS,
)
from kvpilot_engine.llm_engine import EngineStats
from kvpilot_engine.outputs import RequestOutput

TOKEN_BUCKETS = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        r, label = self.registry, ["model_name"]
        self.model_name = model_name

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, label, registry=r).labels(model_name)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, label, registry=r).labels(model_name)

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, label, buckets=buckets, registry=r).labels(model_name)

        self.running = gauge("vllm:num_requests_running", "Requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent.")
        self._cache_info = Gauge(
            "vllm:cache_config_info",
            "Information of the KV cache config.",
            ["model_name", "block_size", "num_gpu_blocks", "enable_prefix_caching", "cache_dtype"],
            registry=r,
        )
        self.ttft = hist(
            "vllm:time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS
        )
        self.itl = hist(
            "vllm:inter_token_latency_seconds", "Inter-token latency in seconds.", ITL_BUCKETS
        )
        self.e2e = hist(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.queue_time = hist(
            "vllm:request_queue_time_seconds",
            "Time spent waiting before the first scheduling, in seconds.",
            REQUEST_LATENCY_BUCKETS,
        )
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens", "Generation tokens processed.")
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries", "Prefix cache queries, in tokens."
        )
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.")
        self.preemptions = counter("vllm:num_preemptions", "Cumulative number of preemptions.")
        self._success = Counter(
            "vllm:request_success",
            "Finished requests, by finish reason.",
            ["model_name", "finished_reason"],
            registry=r,
        )
        for reason in ("stop", "length", "abort"):
            self._success.labels(model_name, reason)  # export zeros so rate() works from the start
        # Demand as it arrives (rejected requests included), which finished-request counters
        # understate exactly when an engine is saturated: the autoscaler's load signal.
        self._received = Counter(
            "kvpilot_engine_requests_received",
            "Requests received, by outcome (accepted, or rejected as overloaded).",
            ["model_name", "outcome"],
            registry=r,
        )
        self.received = self._received.labels(model_name, "accepted")
        self.rejected = self._received.labels(model_name, "rejected")
        self.step_time = hist(
            "kvpilot_engine_step_seconds", "Wall time of one engine step.", STEP_BUCKETS
        )
        self.step_prefill = hist(
            "kvpilot_engine_step_prefill_tokens",
            "Prefill tokens in one engine step.",
            TOKEN_BUCKETS,
        )
        self.step_decode = hist(
            "kvpilot_engine_step_decode_tokens", "Decode tokens in one engine step.", TOKEN_BUCKETS
        )
        self.spec_drafts = counter(
            "vllm:spec_decode_num_drafts", "Speculative verify steps with at least one draft."
        )
        self.spec_draft_tokens = counter(
            "vllm:spec_decode_num_draft_tokens", "Draft tokens verified."
        )
        self.spec_accepted_tokens = counter(
            "vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted."
        )
        self._spec_per_pos = Counter(
            "vllm:spec_decode_num_accepted_tokens_per_pos",
            "Draft tokens accepted, by position in the draft.",
            ["model_name", "position"],
            registry=r,
        )
        # LoRA adapters, per adapter name (`lora_name`: what clients send as `model`).
        self._lora_info: Gauge | None = None  # only with --enable-lora, as vLLM
        self._lora_info_labels: tuple[str, str, str] | None = None
        self._max_loras = "0"
        self._lora_prompt_tokens = Counter(
            "kvpilot_engine_lora_prompt_tokens",
            "Prefill tokens processed for requests on a LoRA adapter, by adapter.",
            ["model_name", "lora_name"],
            registry=r,
        )
        self._lora_generation_tokens = Counter(
            "kvpilot_engine_lora_generation_tokens",
            "Generation tokens processed for requests on a LoRA adapter, by adapter.",
            ["model_name", "lora_name"],
            registry=r,
        )
        self._lora_success = Counter(
            "kvpilot_engine_lora_request_success",
            "Finished requests on a LoRA adapter, by adapter and finish reason.",
            ["model_name", "lora_name", "finished_reason"],
            registry=r,
        )
        # The engine's cache counters are cumulative; we export their increments.
        self._last = EngineStats()

    def set_cache_config(
        self, block_size: int, num_blocks: int, prefix_caching: bool, dtype: str
    ) -> None:
        self._cache_info.labels(
            self.model_name, str(block_size), str(num_blocks), str(prefix_caching), dtype
        ).set(1)

    def set_engine_info(
        self, quantization: str, tensor_parallel_size: int, dtype: str, weight_bytes: int
    ) -> None:
        """The effective settings, so dashboards and the operator can see what a pod runs."""
        Gauge(
            "kvpilot_engine_info",
            "Effective engine settings (value 1).",
            ["model_name", "quantization", "tensor_parallel_size", "dtype"],
            registry=self.registry,
        ).labels(self.model_name, quantization, str(tensor_parallel_size), dtype).set(1)
        Gauge(
            "kvpilot_engine_weight_bytes",
            "Bytes of model weights held by the engine (quantized storage included).",
            ["model_name"],
            registry=self.registry,
        ).labels(self.model_name).set(weight_bytes)

    def set_lora_config(self, max_loras: int) -> None:
        """Export vllm:lora_requests_info (only engines with LoRA enabled do, as in vLLM)."""
        self._max_loras = str(max_loras)
        self._lora_info = Gauge(
            "vllm:lora_requests_info",
            "Running stats on lora requests.",
            ["max_lora", "waiting_lora_adapters", "running_lora_adapters"],
            registry=self.registry,
        )
        self._set_lora_info([], [])

    def _set_lora_info(self, running: list[str], waiting: list[str]) -> None:
        """vLLM's shape: the adapters as comma-joined labels, the value the time of the update
        (the Gateway API Inference Extension reads the newest series). Only the current label
        set is kept, so the series stay bounded; the new one is set before the old one goes, so
        a scrape never finds none."""
        assert self._lora_info is not None
        labels = (self._max_loras, ",".join(waiting), ",".join(running))
        self._lora_info.labels(*labels).set(time.time())
        old, self._lora_info_labels = self._lora_info_labels, labels
        if old is not None and old != labels:
            self._lora_info.remove(*old)

    def baseline(self, stats: EngineStats) -> None:
        """Count the engine's cumulative counters from here on."""
        self._last = dataclasses.replace(stats)
        self.kv_usage.set(stats.kv_cache_usage)

    def on_step(self, stats: EngineStats, num_pending: int, stepped: bool) -> None:
        """After every engine step. `num_pending`: requests accepted but not yet in the engine."""
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting + num_pending)
        self.kv_usage.set(stats.kv_cache_usage)
        last = self._last
        self.prefix_queries.inc(max(0, stats.prefix_cache_queries - last.prefix_cache_queries))
        self.prefix_hits.inc(max(0, stats.prefix_cache_hits - last.prefix_cache_hits))
        self.preemptions.inc(max(0, stats.num_preemptions - last.num_preemptions))
        last.prefix_cache_queries = stats.prefix_cache_queries
        last.prefix_cache_hits = stats.prefix_cache_hits
        last.num_preemptions = stats.num_preemptions
        if stats.spec_num_drafts != last.spec_num_drafts:
            self.spec_drafts.inc(max(0, stats.spec_num_drafts - last.spec_num_drafts))
            self.spec_draft_tokens.inc(
                max(0, stats.spec_num_draft_tokens - last.spec_num_draft_tokens)
            )
            self.spec_accepted_tokens.inc(
                max(0, stats.spec_num_accepted_tokens - last.spec_num_accepted_tokens)
            )
            now_per_pos = stats.spec_accepted_per_pos
            prev = last.spec_accepted_per_pos or (0,) * len(now_per_pos)
            for pos, (now, before) in enumerate(zip(now_per_pos, prev, strict=True)):
                if now > before:
                    self._spec_per_pos.labels(self.model_name, str(pos)).inc(now - before)
            last.spec_num_drafts = stats.spec_num_drafts
            last.spec_num_draft_tokens = stats.spec_num_draft_tokens
            last.spec_num_accepted_tokens = stats.spec_num_accepted_tokens
            last.spec_accepted_per_pos = stats.spec_accepted_per_pos
        if self._lora_info is not None:
            self._set_lora_info(stats.running_lora_adapters, stats.waiting_lora_adapters)
        if stepped:
            self.step_time.observe(stats.step_time)
            self.step_prefill.observe(stats.step_prefill_tokens)
            self.step_decode.observe(stats.step_decode_tokens)

    def on_output(self, out: RequestOutput, prev_token_time: float | None) -> None:
        """For every RequestOutput (DELTA kind). `prev_token_time` is the request's
        last_token_time as of its previous output, None before its first token."""
        m = out.metrics
        new_tokens = sum(len(c.token_ids) for c in out.outputs)
        self.generation_tokens.inc(new_tokens)
        lora = out.lora_request.lora_name if out.lora_request is not None else None
        if lora is not None and new_tokens:
            self._lora_generation_tokens.labels(self.model_name, lora).inc(new_tokens)
        if new_tokens and m.last_token_time is not None:
            if prev_token_time is None:
                if m.time_to_first_token is not None:
                    self.ttft.observe(m.time_to_first_token)
                    self.prompt_tokens.inc(len(out.prompt_token_ids))
                    if lora is not None:
                        self._lora_prompt_tokens.labels(self.model_name, lora).inc(
                            len(out.prompt_token_ids)
                        )
            elif m.last_token_time > prev_token_time:
                self.itl.observe(m.last_token_time - prev_token_time)
        if out.finished:
            reason = next((c.finish_reason for c in out.outputs if c.finish_reason), "abort")
            self._success.labels(self.model_name, reason).inc()
            if lora is not None:
                self._lora_success.labels(self.model_name, lora, reason).inc()
            if m.finished_time is not None:
                self.e2e.observe(m.finished_time - m.arrival_time)
            if m.queue_time is not None:
                self.queue_time.observe(m.queue_time)
