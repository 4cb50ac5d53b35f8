"""The LoRA serving pieces that need no model: `--lora-modules` parsing, the runtime endpoints
refused when runtime updating is off, LoRAError's HTTP mapping, and vllm:lora_requests_info kept
to one current series. (tests/server/test_lora_server.py runs them against a real server.)"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from kvpilot_engine.cli import build_parser
from kvpilot_engine.llm_engine import EngineStats
from kvpilot_engine.lora.request import LoRAError
from kvpilot_engine.server.api_server import build_app
from kvpilot_engine.server.async_engine import AsyncLLMEngine
from kvpilot_engine.server.metrics import ServerMetrics
from kvpilot_engine.server.serving_models import (
    LoRAModulePath,
    lora_error,
    parse_lora_module,
    resolve_lora_path,
)
from prometheus_client import generate_latest

from tests.support.engine import samples


def test_lora_modules_both_forms() -> None:
    assert parse_lora_module("sql=/adapters/sql") == LoRAModulePath("sql", "/adapters/sql")
    assert parse_lora_module("x=s3://bucket/a=b") == LoRAModulePath("x", "s3://bucket/a=b")
    raw = '{"name": "sql", "path": "hf://org/sql-lora", "base_model_name": "base"}'
    assert parse_lora_module(raw) == LoRAModulePath("sql", "hf://org/sql-lora", "base")
    for bad in ("sql", "=/p", "sql=", '{"name": "x"}', '{"name": "x", "path": "p", "r": 1}', "{"):
        with pytest.raises(ValueError, match="--lora-modules"):
            parse_lora_module(bad)
    ns = build_parser().parse_args(
        ["serve", "--enable-lora", "--max-loras", "4", "--lora-modules", "a=/a", "b=/b"]
    )
    assert ns.enable_lora and ns.max_loras == 4 and ns.lora_modules == ["a=/a", "b=/b"]
    assert not ns.allow_runtime_lora_updating


def test_local_paths_are_not_fetched(tmp_path) -> None:
    assert resolve_lora_path(str(tmp_path)) == str(tmp_path)
    # Not there and not a Hub repo id (no org/): the loader says NotFound, nothing is fetched.
    assert resolve_lora_path("missing-adapter") == "missing-adapter"
    assert resolve_lora_path("/no/such/adapter") == "/no/such/adapter"


def test_source_uris_are_fetched_once(tmp_path, monkeypatch) -> None:
    # A pvc:// claim (a mounted folder): the same download path as hf://, s3:// and oci://.
    claim = tmp_path / "pvc" / "adapters" / "sql"
    claim.mkdir(parents=True)
    (claim / "adapter_config.json").write_text('{"r": 8}')
    (claim / "adapter_model.safetensors").write_bytes(b"weights")
    monkeypatch.setenv("KVPILOT_PVC_ROOT", str(tmp_path / "pvc"))
    cache = tmp_path / "cache"
    local = resolve_lora_path("pvc://adapters/sql", str(cache))
    assert local.startswith(str(cache)) and (Path(local) / "adapter_config.json").is_file()
    assert resolve_lora_path("pvc://adapters/sql", str(cache)) == local  # reused
    with pytest.raises(LoRAError) as info:
        resolve_lora_path("pvc://adapters/nothing-here", str(cache))
    assert info.value.reason == "NotFound"


def test_lora_errors_map_to_openai_errors() -> None:
    e = lora_error(LoRAError("RankTooLarge", "rank 64 is above 16"))
    assert (e.status, e.code, e.param) == (400, "RankTooLarge", "lora_path")
    assert e.message == "RankTooLarge: rank 64 is above 16"
    assert lora_error(LoRAError("NotFound", "no folder")).status == 404


def test_runtime_endpoints_refused_unless_allowed() -> None:
    # No engine runs: the refusal comes before anything reaches it.
    engine = AsyncLLMEngine(lambda: None)  # type: ignore[arg-type,return-value]
    app = build_app(engine, "base", ServerMetrics("base"))

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for path, body in [
                ("/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/a"}),
                ("/v1/unload_lora_adapter", {"lora_name": "a"}),
            ]:
                r = await c.post(path, json=body)
                assert r.status_code == 404, r.text
                error = r.json()["error"]
                assert error["code"] == "runtime_lora_updating_disabled"
                assert "--allow-runtime-lora-updating" in error["message"]
            r = await c.post("/v1/load_lora_adapter", json={"lora_name": "a"})
            assert r.status_code == 400 and r.json()["error"]["param"] == "lora_path"
            r = await c.post("/v1/completions", json={"model": "a", "prompt": "hi"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"

    asyncio.run(main())


def _lora_info(metrics: ServerMetrics) -> dict[str, float]:
    text = generate_latest(metrics.registry).decode()
    return {k: v for k, v in samples(text).items() if k.startswith("vllm:lora_requests_info")}


def test_lora_requests_info_keeps_one_current_series() -> None:
    metrics = ServerMetrics("base")
    assert _lora_info(metrics) == {}  # LoRA off: not exported, as in vLLM
    metrics.set_lora_config(4)
    stats = EngineStats()
    stats.running_lora_adapters, stats.waiting_lora_adapters = ["sql", "chat"], ["late"]
    metrics.on_step(stats, 0, True)
    info = _lora_info(metrics)
    key = (
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="sql,chat",'
        'waiting_lora_adapters="late"}'
    )
    assert list(info) == [key] and info[key] > 1.7e9  # the time of the update
    stats.running_lora_adapters, stats.waiting_lora_adapters = [], []
    metrics.on_step(stats, 0, True)
    assert list(_lora_info(metrics)) == [
        'vllm:lora_requests_info{max_lora="4",running_lora_adapters="",waiting_lora_adapters=""}'
    ]
