"""LoRA adapters through a real `kvpilot serve --enable-lora` and the official `openai` client:
the `model` field selects an adapter (the same tokens as the engine run directly on it), unknown
names are OpenAI's 404, /v1/models lists adapters with their parent, runtime load/unload (and each
kind of bad adapter refused with its reason), a load while requests stream loses none, and the
adapter metrics. One server for the module; the adapters are PEFT's format, random, B not zero
(tests/support/lora.py; tests/engine/test_lora.py holds the engine to peft itself).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.support.engine import MODEL, Server, run_server, scrape, wait_idle
from tests.support.lora import write_adapter, write_corrupt_adapter

pytestmark = pytest.mark.slow

PROMPT = [504, 3575, 282, 4649, 314, 3575, 282]  # token ids: both sides tokenise nothing
# name -> (rank, target modules, seed): differing ranks and target sets
ADAPTERS = {
    "sql": (8, ["q_proj", "v_proj"], 1),
    "chat": (16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 2),
    "late": (4, ["o_proj", "down_proj"], 3),  # loaded at runtime
    "big": (32, ["q_proj"], 4),  # above --max-lora-rank 16
}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    paths = {
        name: write_adapter(root / name, rank, targets, seed)
        for name, (rank, targets, seed) in ADAPTERS.items()
    }
    for path in paths.values():  # strong enough to change a few greedy tokens
        config = json.loads((path / "adapter_config.json").read_text())
        config["lora_alpha"] = 32 * config["r"]
        (path / "adapter_config.json").write_text(json.dumps(config))
    # Broken ones, each for one reason.
    missing = write_adapter(root / "missing_config")
    (missing / "adapter_config.json").unlink()
    corrupt = write_corrupt_adapter(root / "corrupt")
    mismatch = root / "mismatch"  # an adapter of another model: its q_proj is 2x wider
    shutil.copytree(paths["sql"], mismatch)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(mismatch / "adapter_model.safetensors"))
    save_file(
        {k: v.repeat(1, 2) if ".lora_A." in k else v for k, v in tensors.items()},
        str(mismatch / "adapter_model.safetensors"),
    )
    return {**paths, "missing_config": missing, "corrupt": corrupt, "mismatch": mismatch}


@pytest.fixture(scope="module")
def lora_server(
    tmp_path_factory: pytest.TempPathFactory, adapters: dict[str, Path]
) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve-lora") / "serve.log"
    # vLLM's switch for the runtime endpoints (the flag is --allow-runtime-lora-updating).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
        with run_server(
            log,
            "--max-num-seqs", "8",
            "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",
            "--lora-modules", f"sql={adapters['sql']}",
            json.dumps({"name": "chat", "path": str(adapters["chat"])}),
        ) as s:  # fmt: skip
            yield s


@pytest.fixture(scope="module")
def client(lora_server: Server) -> OpenAI:
    return OpenAI(base_url=f"{lora_server.url}/v1", api_key="x", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def direct(make_smollm2):
    """The engine run directly (LLM.generate with a LoRARequest): what the server must match."""
    return make_smollm2(
        enable_lora=True, max_loras=2, max_lora_rank=16, max_model_len=256, kv_cache_memory="32MiB"
    )


def _direct_text(direct, lora, max_tokens: int) -> str:
    from kvpilot_engine import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    out = direct.generate({"prompt_token_ids": PROMPT}, params, lora_request=lora, use_tqdm=False)
    return out[0].outputs[0].text


def _load(server: Server, name: str, path: Path | str) -> httpx.Response:
    body = {"lora_name": name, "lora_path": str(path)}
    return httpx.post(f"{server.url}/v1/load_lora_adapter", json=body, timeout=60)


def _unload(server: Server, name: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/unload_lora_adapter", json={"lora_name": name}, timeout=60)


def test_models_lists_adapters_with_parent(client: OpenAI, adapters: dict[str, Path]) -> None:
    cards = {m.id: m for m in client.models.list().data}
    assert list(cards) == [MODEL, "sql", "chat"]
    assert getattr(cards[MODEL], "parent", None) is None
    for name in ("sql", "chat"):
        assert cards[name].parent == MODEL  # type: ignore[attr-defined]
        assert cards[name].root == str(adapters[name])  # type: ignore[attr-defined]
        assert cards[name].object == "model"


def test_adapters_by_name_match_the_engine(client: OpenAI, direct, adapters) -> None:
    from kvpilot_engine import LoRARequest

    texts = {}
    for int_id, name in enumerate([None, "sql", "chat"]):
        r = client.completions.create(
            model=name or MODEL, prompt=PROMPT, max_tokens=6, temperature=0
        )
        assert r.model == (name or MODEL)
        lora = LoRARequest(name, int_id, str(adapters[name])) if name else None
        assert r.choices[0].text == _direct_text(direct, lora, 6), name
        texts[name] = r.choices[0].text
    assert len(set(texts.values())) == 3  # each adapter changes the output
    chat = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0
    )
    assert chat.model == "chat" and chat.usage is not None and chat.usage.completion_tokens == 3


def test_unknown_model_is_openai_404(client: OpenAI, lora_server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    error = info.value.response.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["type"] == "invalid_request_error" and "'nope'" in error["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
        )


def test_runtime_load_and_unload(client: OpenAI, lora_server: Server, adapters, direct) -> None:
    from kvpilot_engine import LoRARequest

    r = _load(lora_server, "late", adapters["late"])
    assert r.status_code == 200, r.text
    assert [m.id for m in client.models.list().data] == [MODEL, "sql", "chat", "late"]
    text = client.completions.create(model="late", prompt=PROMPT, max_tokens=5, temperature=0)
    expected = _direct_text(direct, LoRARequest("late", 7, str(adapters["late"])), 5)
    assert text.choices[0].text == expected
    again = _load(lora_server, "late", adapters["late"])
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert _load(lora_server, MODEL, adapters["late"]).status_code == 400  # the base's name

    assert _unload(lora_server, "late").status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt=PROMPT, max_tokens=2)
    gone = _unload(lora_server, "late")
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "lora_not_found"
    assert [m.id for m in client.models.list().data] == [MODEL, "sql", "chat"]


@pytest.mark.parametrize(
    ("adapter", "status", "reason"),
    [
        ("big", 400, "RankTooLarge"),
        ("missing_config", 400, "MissingConfig"),
        ("corrupt", 400, "Corrupt"),
        ("mismatch", 400, "BaseModelMismatch"),
        ("nowhere", 404, "NotFound"),
    ],
)
def test_bad_adapter_refused_with_reason(
    lora_server: Server, client: OpenAI, adapters, adapter: str, status: int, reason: str
) -> None:
    path = adapters.get(adapter, "/nonexistent/kvpilot-adapter")
    r = _load(lora_server, f"bad-{adapter}", path)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == reason and error["message"].startswith(f"{reason}: ")
    assert f"bad-{adapter}" not in [m.id for m in client.models.list().data]


def test_load_while_streaming_loses_no_request(lora_server: Server, adapters) -> None:
    async def main() -> None:
        aclient = AsyncOpenAI(
            base_url=f"{lora_server.url}/v1", api_key="x", max_retries=0, timeout=120
        )
        started = asyncio.Event()
        seen_running: set[str] = set()

        async def stream(model: str) -> tuple[str, int, str | None]:
            chunks = await aclient.completions.create(
                model=model,
                prompt=PROMPT,
                max_tokens=16,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"ignore_eos": True},
            )
            text, tokens, reason = "", 0, None
            async for c in chunks:
                started.set()
                if c.choices:
                    text += c.choices[0].text
                    reason = c.choices[0].finish_reason or reason
                if c.usage is not None:
                    tokens = c.usage.completion_tokens
            return text, tokens, reason

        models = [MODEL, "sql", "chat", "sql"]
        tasks = [asyncio.ensure_future(stream(m)) for m in models]

        async def watch_info() -> None:  # what vllm:lora_requests_info says meanwhile
            while not all(t.done() for t in tasks):
                for key in await asyncio.to_thread(scrape, lora_server.url):
                    if key.startswith("vllm:lora_requests_info{"):
                        running = key.split('running_lora_adapters="')[1].split('"')[0]
                        seen_running.update(filter(None, running.split(",")))
                await asyncio.sleep(0.05)

        watcher = asyncio.ensure_future(watch_info())
        await started.wait()
        assert not all(t.done() for t in tasks)  # the load below lands mid-stream
        async with httpx.AsyncClient(timeout=60) as http:
            body = {"lora_name": "midstream", "lora_path": str(adapters["late"])}
            r = await http.post(f"{lora_server.url}/v1/load_lora_adapter", json=body)
            assert r.status_code == 200, r.text
        results = await asyncio.gather(*tasks)
        await watcher
        assert [(n, why) for _, n, why in results] == [(16, "length")] * 4
        # Greedy: the same texts as each request alone, after the load.
        for model, (text, _, _) in zip(models, results, strict=True):
            alone = await aclient.completions.create(
                model=model,
                prompt=PROMPT,
                max_tokens=16,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            assert alone.choices[0].text == text, model
        assert seen_running <= {"sql", "chat"} and seen_running, seen_running

    asyncio.run(main())
    assert _unload(lora_server, "midstream").status_code == 200


def test_lora_metrics(client: OpenAI, lora_server: Server) -> None:
    client.completions.create(model="chat", prompt=PROMPT, max_tokens=3, temperature=0)
    m = wait_idle(lora_server.url)
    labels = 'lora_name="chat",model_name="smollm2"'
    assert m[f"kvpilot_engine_lora_generation_tokens_total{{{labels}}}"] >= 3
    assert m[f"kvpilot_engine_lora_prompt_tokens_total{{{labels}}}"] >= len(PROMPT)
    done = 'finished_reason="length",lora_name="chat",model_name="smollm2"'
    assert m[f"kvpilot_engine_lora_request_success_total{{{done}}}"] >= 1
    info = [k for k in m if k.startswith("vllm:lora_requests_info{")]
    # One series, now idle: nothing running or waiting; its value is the time of the update.
    assert info == [
        'vllm:lora_requests_info{max_lora="2",running_lora_adapters="",waiting_lora_adapters=""}'
    ]
    assert m[info[0]] > 1.7e9
