"""Sampling on the real SmolLM2: seeds, filters, n, stop conditions, logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from kvpilot_engine import SamplingParams
from kvpilot_engine.sampler import Sampler

PROMPT = "Here is a list of fruits: apple, banana,"


@pytest.fixture(scope="module")
def llm(make_smollm2):
    return make_smollm2()


def gen(llm, prompt=PROMPT, **kw):
    return llm.generate(prompt, SamplingParams(**kw), use_tqdm=False)[0]


def test_seed_reproducible_and_distinct(llm):
    a = gen(llm, temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)
    b = gen(llm, temperature=1.0, seed=7, max_tokens=24, ignore_eos=True)
    c = gen(llm, temperature=1.0, seed=8, max_tokens=24, ignore_eos=True)
    assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert a.outputs[0].token_ids != c.outputs[0].token_ids


def test_top_k_one_is_greedy(llm):
    greedy = gen(llm, temperature=0.0, max_tokens=16)
    topk1 = gen(llm, temperature=1.5, top_k=1, seed=3, max_tokens=16)
    assert topk1.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_n_completions_differ_and_share_prompt(llm):
    out = gen(llm, n=3, temperature=1.0, seed=11, max_tokens=12, ignore_eos=True)
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    llm.llm_engine.check_no_leaks()


def test_max_tokens_and_length_reason(llm):
    out = gen(llm, temperature=0.0, max_tokens=5, ignore_eos=True).outputs[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"


def test_stop_string_truncates_text(llm):
    full = gen(llm, temperature=0.0, max_tokens=30, ignore_eos=True).outputs[0].text
    stop = full.strip().split()[2]  # a word the greedy output certainly contains
    out = gen(llm, temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop]).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full[: full.index(stop)]
    kept = gen(
        llm,
        temperature=0.0,
        max_tokens=30,
        ignore_eos=True,
        stop=[stop],
        include_stop_str_in_output=True,
    ).outputs[0]
    assert kept.text == full[: full.index(stop) + len(stop)]


def test_stop_token_ids(llm):
    ids = gen(llm, temperature=0.0, max_tokens=20, ignore_eos=True).outputs[0].token_ids
    out = gen(llm, temperature=0.0, max_tokens=20, ignore_eos=True, stop_token_ids=[ids[3]])
    c = out.outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == ids[3]
    assert c.token_ids == ids[: ids.index(ids[3]) + 1]


def test_eos_stops_unless_ignored(llm):
    chat = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    out = gen(llm, chat, temperature=0.0, max_tokens=200).outputs[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2
    assert "<|im_end|>" not in out.text
    forced = gen(llm, chat, temperature=0.0, max_tokens=len(out.token_ids) + 5, ignore_eos=True)
    assert len(forced.outputs[0].token_ids) == len(out.token_ids) + 5


def test_logprobs_match_log_softmax(llm):
    out = gen(llm, temperature=0.0, max_tokens=4, logprobs=3).outputs[0]
    assert len(out.logprobs) == 4
    prompt_ids = llm.get_tokenizer().encode(PROMPT)
    logits = llm.llm_engine.score(prompt_ids + out.token_ids)
    ref = torch.log_softmax(logits, dim=-1)
    total = 0.0
    for step, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs, strict=True)):
        row = ref[len(prompt_ids) - 1 + step]
        assert entry[tok].rank == 1  # greedy picks the top token
        assert math.isclose(entry[tok].logprob, float(row[tok]), abs_tol=1e-4)
        top = row.topk(3).indices.tolist()
        assert set(top) <= set(entry)
        total += entry[tok].logprob
    assert math.isclose(out.cumulative_logprob, total, abs_tol=1e-4)


def test_min_tokens_suppresses_early_stop(llm):
    chat = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    short = gen(llm, chat, temperature=0.0, max_tokens=200).outputs[0]
    out = gen(llm, chat, temperature=0.0, max_tokens=200, min_tokens=len(short.token_ids) + 3)
    assert len(out.outputs[0].token_ids) >= len(short.token_ids) + 3


# ---- the sampler alone, on hand-made logits ----------------------------------------------------
def _draw(params: SamplingParams, logits: torch.Tensor, n: int = 4000) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    batch = logits.expand(n, -1)
    res = Sampler()(batch, [params] * n, [None] * n, g)
    return torch.tensor([r.token_id for r in res])


def test_sampler_filters():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert set(_draw(SamplingParams(top_k=2), logits).tolist()) == {0, 1}
    # top_p=0.6: 0.5 alone is short of 0.6, so {0, 1}; 0.7 >= 0.6 stops there.
    assert set(_draw(SamplingParams(top_p=0.6), logits).tolist()) == {0, 1}
    # min_p=0.35: keep p >= 0.175 -> {0, 1}.
    assert set(_draw(SamplingParams(min_p=0.35), logits).tolist()) == {0, 1}
    # Unfiltered sampling follows the distribution.
    counts = torch.bincount(_draw(SamplingParams(), logits, 20000), minlength=5).float() / 20000
    assert torch.allclose(counts, torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]), atol=0.02)
    # Temperature sharpens: at 0.25 the top token dominates (0.5^4 / sum p^4 ~ 0.92).
    hot = torch.bincount(_draw(SamplingParams(temperature=0.25), logits), minlength=5)
    assert hot[0] / hot.sum() > 0.85


def test_sampling_params_validation():
    for bad in (
        dict(temperature=-1),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(top_k=-2),
        dict(max_tokens=0),
        dict(n=0),
        dict(min_p=2),
        dict(logprobs=50),
        dict(stop=[""]),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
