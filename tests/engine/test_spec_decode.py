"""Speculative decoding on the real SmolLM2: output equal to plain decoding, token for token.

Greedy requests must give exactly the tokens of the engine without speculation; seeded sampled
requests too (the verifier consumes a request's random stream as plain decoding does). The
prompts are ones where prompt lookup hits (code to repeat with an edit, a repeating list), so
drafts are accepted and rejected in the same runs, next to chunked prefills, prefix-cache hits,
preemptions, n > 1, logprobs, stop strings and aborts.
"""

from __future__ import annotations

import pytest
from kvpilot_engine import SamplingParams
from kvpilot_engine.sampling_params import RequestOutputKind

pytestmark = pytest.mark.slow

CODE = """def free(self, seq):
    for block_id in reversed(seq.block_table):
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self._free[block_id] = None
    seq.block_table = []
"""
PROMPTS = [
    f"```python\n{CODE}```\nThe same function with `seq` renamed to `sequence`:\n```python\n",
    "Monday, Tuesday, Wednesday, Thursday, Friday. Monday, Tuesday, Wednesday,",
    "The capital of France is",
    f"Copy this code exactly.\n{CODE}\nCopy:\n{CODE[:60]}",
]
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}


@pytest.fixture(scope="module")
def plain(make_smollm2):
    return make_smollm2(max_num_batched_tokens=64)


@pytest.fixture(scope="module")
def spec(make_smollm2):
    return make_smollm2(max_num_batched_tokens=64, speculative_config=NGRAM)


def _ids(outs):
    return [[c.token_ids for c in o.outputs] for o in outs]


def test_greedy_equal_with_chunked_prefill_and_prefix_hits(plain, spec):
    params = SamplingParams(temperature=0.0, max_tokens=32)
    want = plain.generate(PROMPTS, params, use_tqdm=False)
    stats = spec.llm_engine.speculator.stats
    before = stats.num_accepted_tokens
    # All four at once: 64-token steps mix prompt chunks with verifying decodes.
    got = spec.generate(PROMPTS, params, use_tqdm=False)
    assert _ids(got) == _ids(want)
    assert [o.outputs[0].text for o in got] == [o.outputs[0].text for o in want]
    assert [o.outputs[0].finish_reason for o in got] == [o.outputs[0].finish_reason for o in want]
    assert stats.num_accepted_tokens - before > 20, stats
    assert stats.num_accepted_tokens < stats.num_draft_tokens  # some were rejected too
    # Alone (batch 1), and again with the prompt's blocks in the prefix cache.
    for _ in range(2):
        again = spec.generate(PROMPTS[0], params, use_tqdm=False)[0]
        assert again.outputs[0].token_ids == want[0].outputs[0].token_ids
    assert again.num_cached_tokens > 0
    spec.llm_engine.check_no_leaks()


def test_seeded_sampling_n_logprobs_and_stop_strings_equal(plain, spec):
    # A stop string from the middle of the greedy answer, so that it is met mid-acceptance.
    greedy = plain.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=24))[0]
    stop = greedy.outputs[0].text[12:20]
    params = [
        SamplingParams(temperature=0.8, top_p=0.95, seed=7, n=2, max_tokens=24, logprobs=2),
        SamplingParams(temperature=0.0, max_tokens=24, stop=[stop]),
        SamplingParams(temperature=1.0, seed=3, max_tokens=24, frequency_penalty=0.5),
        SamplingParams(temperature=0.0, max_tokens=7),
    ]
    want = plain.generate(PROMPTS, params, use_tqdm=False)
    got = spec.generate(PROMPTS, params, use_tqdm=False)
    assert _ids(got) == _ids(want)
    for g, w in zip(got, want, strict=True):
        for gc, wc in zip(g.outputs, w.outputs, strict=True):
            assert gc.text == wc.text
            assert (gc.finish_reason, gc.stop_reason) == (wc.finish_reason, wc.stop_reason)
    assert got[1].outputs[0].finish_reason == "stop" and stop not in got[1].outputs[0].text
    assert len(got[3].outputs[0].token_ids) == 7
    for gc, wc in zip(got[0].outputs, want[0].outputs, strict=True):
        assert len(gc.logprobs) == len(wc.logprobs) == len(gc.token_ids)
        for a, b in zip(gc.logprobs, wc.logprobs, strict=True):
            assert a.keys() == b.keys()
            for t in a:
                assert a[t].logprob == pytest.approx(b[t].logprob, abs=1e-3)
    spec.llm_engine.check_no_leaks()


def test_preemption_and_streaming_deltas(make_smollm2, plain):
    # A pool of 12 blocks (192 tokens) for four sequences that grow past it: preemptions, and
    # recomputation of sequences that had accepted drafts.
    small = make_smollm2(
        num_kv_blocks=12, max_model_len=192, max_num_batched_tokens=64, speculative_config=NGRAM
    )
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    want = plain.generate(PROMPTS, params, use_tqdm=False)
    got = small.generate(PROMPTS, params, use_tqdm=False)
    assert small.llm_engine.scheduler.num_preemptions > 0
    assert _ids(got) == _ids(want)
    small.llm_engine.check_no_leaks()

    # Streaming: the deltas add up to the same text, several tokens arriving in one step.
    engine = small.llm_engine
    delta = SamplingParams(temperature=0.0, max_tokens=40, output_kind=RequestOutputKind.DELTA)
    engine.add_request("s", PROMPTS[1], delta)
    text, ids, steps = "", [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.outputs[0].text if out.outputs else ""
            ids += out.outputs[0].token_ids if out.outputs else []
        steps += 1
    ref = plain.generate(PROMPTS[1], delta, use_tqdm=False)[0]
    plain_ids = plain.generate(
        PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=40), use_tqdm=False
    )[0]
    assert ids == plain_ids.outputs[0].token_ids and ref is not None
    assert text == plain_ids.outputs[0].text
    assert steps < len(ids)  # drafts were accepted: fewer steps than tokens
    engine.check_no_leaks()


def test_abort_mid_speculation_frees_every_block(spec):
    engine = spec.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"abort-{i}", p, params)
    drafted = False
    for _ in range(12):
        engine.step()
        drafted |= any(s.spec_token_ids for s in engine.scheduler.running)
        drafted |= engine.speculator.stats.num_drafts > 0
    engine.abort_request([f"abort-{i}" for i in range(len(PROMPTS))])
    engine.step()
    assert drafted
    assert engine.block_manager.usage == 0.0
    engine.check_no_leaks()


def test_suffix_method_greedy_equal_and_drafts_from_earlier_requests(make_smollm2, plain):
    suffix = make_smollm2(
        max_num_batched_tokens=64,
        speculative_config={"method": "suffix", "num_speculative_tokens": 4, "adaptive": False},
    )
    params = SamplingParams(temperature=0.0, max_tokens=24)
    want = plain.generate(PROMPTS[2], params, use_tqdm=False)[0]
    first = suffix.generate(PROMPTS[2], params, use_tqdm=False)[0]
    stats = suffix.llm_engine.speculator.stats
    accepted = stats.num_accepted_tokens
    # The same question again: its answer is now in the shared index, drafted from the start.
    second = suffix.generate(PROMPTS[2], params, use_tqdm=False)[0]
    assert first.outputs[0].token_ids == second.outputs[0].token_ids == want.outputs[0].token_ids
    assert stats.num_accepted_tokens - accepted >= 15  # of at most 23
    suffix.llm_engine.check_no_leaks()


def test_verification_through_triton_kernels(make_smollm2, plain, monkeypatch):
    """The GPU path's wiring, in Triton's interpreter: a verify chunk (the last token and its
    drafts after the cached context) goes through the same paged-attention kernel as prefill
    chunks, mixed with another sequence's decode."""
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    prompts = [PROMPTS[1], PROMPTS[2]]
    want = plain.generate(prompts, params, use_tqdm=False)
    monkeypatch.setenv("KVPILOT_FORCE_TRITON", "1")
    llm = make_smollm2(max_model_len=256, num_kv_blocks=64, speculative_config=NGRAM)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert _ids(got) == _ids(want)
    assert llm.llm_engine.speculator.stats.num_accepted_tokens > 0
    llm.llm_engine.check_no_leaks()


def test_draft_model_smollm2_as_its_own_draft_accepts_everything(make_smollm2, plain):
    llm = make_smollm2(
        max_num_batched_tokens=64,
        speculative_config={
            "method": "draft_model",
            "model": "smollm2",
            "num_speculative_tokens": 3,
            "adaptive": False,
        },
    )
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    prompts = [PROMPTS[2], PROMPTS[1]]
    want = plain.generate(prompts, params, use_tqdm=False)
    got = llm.generate(prompts, params, use_tqdm=False)
    assert _ids(got) == _ids(want)
    stats = llm.llm_engine.speculator.stats
    assert stats.num_draft_tokens > 0
    # The same weights propose what they verify (float32 both ways; a near-tie could still
    # differ between the draft's decode and the target's verify kernels).
    assert stats.num_accepted_tokens >= 0.95 * stats.num_draft_tokens, stats
    llm.llm_engine.check_no_leaks()
    proposer = llm.llm_engine.speculator.proposer
    assert proposer.block_manager.num_free_blocks == proposer.block_manager.num_blocks
