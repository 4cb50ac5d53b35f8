"""LoRA adapters on SmolLM2 against peft on transformers' SmolLM2: randomly initialised adapters
(B not zero) of several ranks and target sets, saved by peft, served by one engine with fewer
slots than adapters. One engine and one peft model serve the whole module."""

from __future__ import annotations

import pytest
import torch
from kvpilot_engine import LoRARequest, SamplingParams
from kvpilot_engine.lora import LoRAError

pytestmark = pytest.mark.slow  # SmolLM2 twice: the engine and transformers

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
# name -> (r, lora_alpha, target_modules, use_rslora)
ADAPTERS = {
    "attn8": (8, 16, ATTENTION, False),
    "all16": (16, 32, ATTENTION + MLP, False),
    "mlp8rs": (8, 8, MLP, True),
    "qv4": (4, 8, ["q_proj", "v_proj"], False),
}
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
MAX_TOKENS = 4


def _hf_greedy(model, ids: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens by full forward passes (EOS or not), and the prompt's logits."""
    out, first = list(ids), None
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=torch.tensor([out])).logits[0]
            if first is None:
                first = logits.float()
            out.append(int(logits[-1].argmax()))
    assert first is not None
    return out[len(ids) :], first


@pytest.fixture(scope="module")
def oracle(hf_smollm2, smollm2_checkpoint, tmp_path_factory):
    """Adapters made by peft on transformers' model, saved, and peft's greedy tokens and logits
    for each (and for the base). The shared transformers model is restored afterwards."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora")
    tok = smollm2_checkpoint.tokenizer
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    peft_model = None
    try:
        for i, (name, (r, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
            cfg = LoraConfig(
                r=r,
                lora_alpha=alpha,
                target_modules=targets,
                use_rslora=rslora,
                init_lora_weights=False,  # B random too: the adapter changes the output
            )
            torch.manual_seed(100 + i)
            if peft_model is None:
                peft_model = get_peft_model(hf_smollm2, cfg, adapter_name=name)
            else:
                peft_model.add_adapter(name, cfg)
            # peft's non-zero init is large for a trained model; scaled so that outputs stay
            # text-like and greedy picks are not near ties.
            with torch.no_grad():
                for n, p in peft_model.named_parameters():
                    if f"lora_B.{name}." in n:
                        p.mul_(0.05)
        assert peft_model is not None
        peft_model.eval()
        peft_model.save_pretrained(str(root))
        result: dict[str | None, list[tuple[list[int], torch.Tensor]]] = {}
        for name in ADAPTERS:
            peft_model.set_adapter(name)
            result[name] = [_hf_greedy(peft_model, ids, MAX_TOKENS) for ids in prompt_ids]
        with peft_model.disable_adapter():
            result[None] = [_hf_greedy(peft_model, ids, MAX_TOKENS) for ids in prompt_ids]
        # peft saves an adapter that is not "default" under a folder of its name.
        paths = {name: str(root / name) for name in ADAPTERS}
        yield paths, prompt_ids, result
    finally:
        if peft_model is not None:
            peft_model.unload()  # hf_smollm2 is the session's: give it back unadapted


def _req(paths: dict[str, str], name: str) -> LoRARequest:
    return LoRARequest(name, list(ADAPTERS).index(name) + 1, paths[name])


@pytest.fixture(scope="module")
def llm(make_smollm2):
    # Two slots and two host entries for four adapters: every test exercises the LRU.
    return make_smollm2(
        enable_lora=True,
        max_loras=2,
        max_lora_rank=16,
        max_model_len=1024,
        num_kv_blocks=256,
        max_num_seqs=16,
    )


GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


def test_each_adapter_matches_peft(llm, oracle):
    paths, prompt_ids, ref = oracle
    engine = llm.llm_engine
    for name in ADAPTERS:
        req = _req(paths, name)
        logits = engine.score(prompt_ids[0], lora_request=req)
        want = ref[name][0][1]
        err = (logits - want).abs().max().item() / want.abs().max().item()
        assert err < 1e-4, f"{name}: relative logit error {err}"
        # and the adapter matters: the base's logits are far from these
        base_err = (ref[None][0][1] - want).abs().max().item() / want.abs().max().item()
        assert base_err > 100 * err
    for name in ADAPTERS:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False, lora_request=_req(paths, name))
        for out, (tokens, _) in zip(outs, ref[name], strict=True):
            assert out.outputs[0].token_ids == tokens, name
            assert out.lora_request == _req(paths, name)
    engine.check_no_leaks()


def test_mixed_batch_matches_each_alone(llm, oracle):
    """Two adapters and the base in the same steps, then more adapters than slots in one call:
    every request gets its own adapter's (peft's) tokens."""
    paths, prompt_ids, ref = oracle
    engine = llm.llm_engine
    names: list[str | None] = ["attn8", "all16", None]
    for name in names[:2]:
        engine.add_lora(_req(paths, name))  # on the host: the step need not wait for a load
    for i, name in enumerate(names):
        engine.add_request(
            f"mix{i}", prompt_ids[i % 2], GREEDY, lora_request=name and _req(paths, name)
        )
    outs: dict[str, list[int]] = {}
    engine.step()
    assert engine.stats.num_running == 3  # all three in one step
    assert sorted(engine.stats.running_lora_adapters) == ["all16", "attn8"]
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
    for i, name in enumerate(names):
        assert outs[f"mix{i}"] == ref[name][i % 2][0], name

    # Four adapters and the base over two slots: some wait for a slot, none fails.
    assert engine.lora_manager is not None
    slot_loads = engine.lora_manager.num_slot_loads
    choice = [*ADAPTERS, None, *reversed(ADAPTERS)]
    loras = [None if n is None else _req(paths, n) for n in choice]
    prompts = [prompt_ids[i % 2] for i in range(len(choice))]
    outs2 = llm.generate(
        [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False, lora_request=loras
    )
    for i, (name, out) in enumerate(zip(choice, outs2, strict=True)):
        assert out.outputs[0].token_ids == ref[name][i % 2][0], (i, name)
    assert engine.lora_manager.num_slot_loads >= slot_loads + 2
    engine.check_no_leaks()


def test_prefix_cache_is_per_adapter(llm, oracle):
    paths, _, _ = oracle
    engine = llm.llm_engine
    tok = engine.tokenizer
    # Three full blocks of a shared prompt, each adapter's answer must be its own.
    prompt = tok.encode(" ".join(["The quick brown fox jumps over the lazy dog."] * 5))
    assert len(prompt) > 48
    got = {}
    for name in ["attn8", "all16", None, "attn8"]:
        req = name and _req(paths, name)
        out = llm.generate(
            [{"prompt_token_ids": prompt}], GREEDY, use_tqdm=False, lora_request=req
        )[0]
        got.setdefault(name, []).append((out.outputs[0].token_ids, out.num_cached_tokens))
    # The first run on each adapter found nothing of the others' in the cache...
    assert got["attn8"][0][1] == 0 and got["all16"][0][1] == 0
    # ... the base may hit blocks cached by earlier base runs only; the second attn8 run hits
    # its own.
    assert got["attn8"][1][1] >= 48
    assert got["attn8"][1][0] == got["attn8"][0][0]
    want = {n: engine.score(prompt, lora_request=n and _req(paths, n)) for n in got}
    for name, runs in got.items():
        assert runs[0][0][0] == int(want[name][-1].argmax()), name
    # (the adapters do change this prompt's logits, whatever the greedy picks)
    assert (want["attn8"] - want["all16"]).abs().max() > 0.1
    assert (want["attn8"] - want[None]).abs().max() > 0.1
    engine.check_no_leaks()


def test_bad_adapters_and_aborts(llm, oracle, tmp_path):
    import shutil

    paths, prompt_ids, _ = oracle
    engine = llm.llm_engine
    # rank above max_lora_rank
    big = tmp_path / "big"
    shutil.copytree(paths["all16"], big)
    cfg = (big / "adapter_config.json").read_text().replace('"r": 16', '"r": 32')
    (big / "adapter_config.json").write_text(cfg)
    with pytest.raises(LoRAError) as e:
        engine.add_lora(LoRARequest("big", 90, str(big)))
    assert e.value.reason == "RankTooLarge"
    # corrupt weights
    bad = tmp_path / "bad"
    shutil.copytree(paths["attn8"], bad)
    (bad / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(LoRAError) as e:
        llm.generate(
            PROMPTS[:1], GREEDY, use_tqdm=False, lora_request=LoRARequest("b", 91, str(bad))
        )
    assert e.value.reason == "Corrupt"
    # no config
    (bad / "adapter_config.json").unlink()
    with pytest.raises(LoRAError) as e:
        engine.add_lora(LoRARequest("b2", 92, str(bad)))
    assert e.value.reason == "MissingConfig"
    with pytest.raises(LoRAError) as e:
        engine.add_request(
            "nf", "hi", GREEDY, lora_request=LoRARequest("nf", 93, str(tmp_path / "x"))
        )
    assert e.value.reason == "NotFound"
    # A corrupt adapter named only by a request (loaded in the background) fails that request
    # alone; the others finish.
    # (attn8's own config: big's r=32 would fail on its rank before the weights are read)
    shutil.copy(f"{paths['attn8']}/adapter_config.json", bad)
    engine.add_request(
        "broken", prompt_ids[0], GREEDY, lora_request=LoRARequest("b3", 94, str(bad))
    )
    engine.add_request("fine", prompt_ids[0], GREEDY, lora_request=_req(paths, "qv4"))
    finals = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out.outputs[0].finish_reason
    assert finals == {"broken": "abort", "fine": "length"}

    # Aborts in every state (waiting for a slot, running) leave no KV block or slot pinned.
    for i, name in enumerate([*ADAPTERS, None]):
        engine.add_request(
            f"ab{i}", prompt_ids[i % 2], GREEDY, lora_request=name and _req(paths, name)
        )
    engine.step()
    engine.step()
    engine.abort_request([f"ab{i}" for i in range(len(ADAPTERS) + 1)])
    while engine.has_unfinished_requests():
        engine.step()
    engine.check_no_leaks()
    assert {r.lora_name for r in engine.list_loras()} >= {"qv4"}
    assert engine.remove_lora(4) and not engine.remove_lora(4)
    assert engine.stats.running_lora_adapters == [] and engine.stats.waiting_lora_adapters == []
