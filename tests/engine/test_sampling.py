"""Sampling on the real SmolLM2: seeds, filters, n, stop conditions, logprobs, penalties and
logit_bias (against a plain PyTorch reference and transformers' logits processors)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from kvpilot_engine import SamplingParams
from kvpilot_engine.sampler import Sampler, process_logits

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
        dict(presence_penalty=2.5),
        dict(frequency_penalty=-2.01),
        dict(presence_penalty=float("nan")),
        dict(repetition_penalty=0.0),
        dict(repetition_penalty=-1.0),
        dict(repetition_penalty=float("inf")),
        dict(logit_bias={1: 100.5}),
        dict(logit_bias={1: -101}),
        dict(logit_bias={-1: 1.0}),
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)


def test_sampling_params_penalty_defaults_and_bias_keys():
    p = SamplingParams()
    assert not p.has_penalties and p.logit_bias is None
    assert SamplingParams(repetition_penalty=1.1).has_penalties
    assert SamplingParams(frequency_penalty=-0.5).has_penalties
    # JSON keys arrive as strings; the sampler wants ints. An empty bias is no bias.
    assert SamplingParams(logit_bias={"7": 2}).logit_bias == {7: 2.0}
    assert SamplingParams(logit_bias={}).logit_bias is None


# ---- penalties and logit_bias against plain references -----------------------------------------
def _reference(
    row: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams
) -> torch.Tensor:
    """The definitions, token by token: bias, then repetition over prompt + output, then
    frequency and presence over the output (vLLM's order)."""
    row = row.clone()
    for tok, bias in (p.logit_bias or {}).items():
        row[tok] += bias
    for tok in set(prompt) | set(output):
        r = p.repetition_penalty
        row[tok] = row[tok] / r if row[tok] > 0 else row[tok] * r
    for tok, count in Counter(output).items():
        row[tok] -= p.frequency_penalty * count + p.presence_penalty
    return row


def test_penalties_and_bias_match_reference():
    g = torch.Generator().manual_seed(0)
    vocab = 64
    params = [
        SamplingParams(),  # untouched, next to rows that are not
        SamplingParams(repetition_penalty=1.7),
        SamplingParams(repetition_penalty=0.6),  # below 1 favours repeats
        SamplingParams(frequency_penalty=0.8),
        SamplingParams(presence_penalty=-1.5),
        SamplingParams(logit_bias={3: 100.0, 60: -42.5}),
        SamplingParams(
            repetition_penalty=1.3,
            frequency_penalty=1.1,
            presence_penalty=0.4,
            logit_bias={5: 7.0},
        ),
        SamplingParams(frequency_penalty=2.0),  # nothing generated yet: no change
    ]
    logits = torch.randn(len(params), vocab, generator=g) * 4
    token_ids, num_prompt = [], []
    for i in range(len(params)):
        n_prompt = int(torch.randint(1, 30, (1,), generator=g))
        n_out = 0 if i == len(params) - 1 else int(torch.randint(1, 40, (1,), generator=g))
        # A narrow range, so that tokens repeat and prompt and output overlap.
        ids = torch.randint(0, 24, (n_prompt + n_out,), generator=g).tolist()
        token_ids.append(ids)
        num_prompt.append(n_prompt)
    before = logits.clone()
    out = process_logits(logits, params, token_ids, num_prompt)
    assert torch.equal(logits, before)  # the raw logits are left for the logprobs
    for i, p in enumerate(params):
        ids, n = token_ids[i], num_prompt[i]
        ref = _reference(logits[i], ids[:n], ids[n:], p)
        torch.testing.assert_close(out[i], ref, rtol=0, atol=1e-5, msg=f"row {i}: {p}")
    assert torch.equal(out[0], logits[0])
    assert torch.equal(out[-1], logits[-1])


def test_no_penalties_cost_nothing():
    logits = torch.randn(4, 32)
    params = [SamplingParams(), SamplingParams(temperature=0.0)] * 2
    # No copy, and no token history needed at all.
    assert process_logits(logits, params, None, None) is logits


def test_repetition_penalty_matches_transformers():
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 100, generator=g) * 5
    ids = torch.randint(0, 100, (3, 40), generator=g)
    for penalty in (0.5, 1.2, 2.0):
        params = [SamplingParams(repetition_penalty=penalty)] * 3
        ours = process_logits(logits, params, ids.tolist(), [25, 10, 39])
        theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_logit_bias_forces_and_bans_tokens_when_sampling():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    assert set(_draw(SamplingParams(logit_bias={4: 100}), logits).tolist()) == {4}
    banned = _draw(SamplingParams(logit_bias={0: -100, 1: -100}), logits)
    assert set(banned.tolist()) == {2, 3, 4}


def test_sampler_penalises_per_row_with_raw_logprobs():
    logits = torch.tensor([[2.0, 1.9, 0.0], [2.0, 1.9, 0.0]])
    params = [
        SamplingParams(temperature=0.0, presence_penalty=0.5, logprobs=1),
        SamplingParams(temperature=0.0, logprobs=1),
    ]
    history = [[2, 0], [2, 0]]  # prompt [2], generated [0]
    res = Sampler()(logits, params, [None, None], torch.Generator(), history, [1, 1])
    assert [r.token_id for r in res] == [1, 0]  # only the first row pays for having said 0
    raw = torch.log_softmax(logits[0], dim=-1)
    assert math.isclose(res[0].logprob, float(raw[1]), abs_tol=1e-6)  # vLLM's raw_logprobs
    assert res[0].sampled_rank == 2


# ---- through the engine on SmolLM2 -------------------------------------------------------------
def test_logit_bias_forces_a_token(llm):
    tok = llm.get_tokenizer().encode(" banana", add_special_tokens=False)[-1]
    out = gen(llm, temperature=0.0, max_tokens=4, logit_bias={tok: 100.0}).outputs[0]
    assert out.token_ids == [tok] * 4
    sampled = gen(llm, temperature=1.0, seed=3, max_tokens=4, logit_bias={tok: 100.0})
    assert sampled.outputs[0].token_ids == [tok] * 4


def test_logit_bias_out_of_vocab_is_refused(llm):
    from kvpilot_engine.llm_engine import InvalidRequestError

    vocab = llm.llm_engine.model_config.vocab_size
    with pytest.raises(InvalidRequestError) as e:
        gen(llm, max_tokens=2, logit_bias={vocab: 1.0})
    assert e.value.param == "logit_bias"
    llm.llm_engine.check_no_leaks()


@pytest.mark.parametrize(
    "penalties",
    [
        dict(repetition_penalty=1.5),
        dict(frequency_penalty=1.5),
        dict(presence_penalty=1.5),
        dict(repetition_penalty=1.2, frequency_penalty=0.7, presence_penalty=0.3),
    ],
    ids=["repetition", "frequency", "presence", "all"],
)
def test_greedy_with_penalties_replays_against_reference(llm, penalties):
    """Every greedy step is the argmax of the reference-penalised logits of the sequence so far
    (the engine's own logits, recomputed densely by score())."""
    params = dict(temperature=0.0, max_tokens=24, ignore_eos=True, **penalties)
    out = gen(llm, **params).outputs[0]
    plain = gen(llm, temperature=0.0, max_tokens=24, ignore_eos=True).outputs[0]
    assert out.token_ids != plain.token_ids  # the penalties change this list-y continuation
    prompt = llm.get_tokenizer().encode(PROMPT)
    logits = llm.llm_engine.score(prompt + out.token_ids)
    p = SamplingParams(**params)
    for step, tok in enumerate(out.token_ids):
        row = _reference(logits[len(prompt) - 1 + step], prompt, out.token_ids[:step], p)
        assert tok == int(row.argmax()), f"step {step}"


def test_penalties_in_a_mixed_batch_leave_others_alone(llm):
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    penalised = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, presence_penalty=2)
    alone = llm.generate([PROMPT], plain, use_tqdm=False)[0].outputs[0].token_ids
    both = llm.generate([PROMPT, PROMPT], [plain, penalised], use_tqdm=False)
    assert both[0].outputs[0].token_ids == alone
    assert both[1].outputs[0].token_ids != alone
    llm.llm_engine.check_no_leaks()
