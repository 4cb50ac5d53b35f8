"""Continuous batching on the real SmolLM2: batched equals alone under chunked prefill and
preemption, prefix-cache hits, aborts, and no leaked KV blocks."""

from __future__ import annotations

import random

import pytest
from kvpilot_engine import SamplingParams
from kvpilot_engine.sampling_params import RequestOutputKind

NUM_REQUESTS = 32
MAX_TOKENS = 20


def make_prompts(tokenizer) -> list[list[int]]:
    rng = random.Random(1234)
    words = [
        "the",
        "river",
        "model",
        "cache",
        "token",
        "light",
        "garden",
        "engine",
        "ocean",
        "number",
        "paper",
        "forest",
        "music",
        "window",
        "stone",
        "silver",
        "machine",
    ]
    prompts = []
    for i in range(NUM_REQUESTS):
        n_words = rng.choice([2, 5, 9, 15, 30, 60, 90])  # 3 to ~100 tokens, crossing blocks
        text = f"Story {i}: " + " ".join(rng.choice(words) for _ in range(n_words))
        prompts.append(tokenizer.encode(text))
    return prompts


def params_for(i: int) -> SamplingParams:
    # Mostly greedy; every fourth request samples with a seed, which must also be batch-invariant.
    if i % 4 == 3:
        return SamplingParams(
            temperature=0.8, top_p=0.9, seed=i, max_tokens=MAX_TOKENS, ignore_eos=True
        )
    return SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.mark.slow
def test_batched_equals_alone_with_chunking_and_preemption(make_smollm2):
    # A pool of 20 blocks x 16 = 320 tokens holds about three of these requests at once, and a
    # 48-token budget splits every longer prompt into chunks.
    small = make_smollm2(
        num_kv_blocks=20,
        block_size=16,
        max_num_batched_tokens=48,
        max_model_len=320,
        max_num_seqs=32,
    )
    prompts = make_prompts(small.get_tokenizer())
    assert max(len(p) for p in prompts) > 48
    batched = small.generate(
        [{"prompt_token_ids": p} for p in prompts],
        [params_for(i) for i in range(NUM_REQUESTS)],
        use_tqdm=False,
    )
    engine = small.llm_engine
    assert engine.scheduler.num_preemptions > 0, "the tiny pool should have forced preemption"
    engine.check_no_leaks()

    alone = make_smollm2(enable_prefix_caching=False)
    for i, (p, out) in enumerate(zip(prompts, batched, strict=True)):
        ref = alone.generate({"prompt_token_ids": p}, params_for(i), use_tqdm=False)[0]
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids, f"request {i} differs"
        assert out.outputs[0].text == ref.outputs[0].text
    alone.llm_engine.check_no_leaks()


@pytest.fixture(scope="module")
def llm(make_smollm2):
    return make_smollm2(block_size=16)


def test_repeated_prompt_hits_prefix_cache(llm):
    engine = llm.llm_engine
    prompt = "The history of the printing press begins in the fifteenth century, when " * 3
    params = SamplingParams(temperature=0.0, max_tokens=12)
    first = llm.generate(prompt, params, use_tqdm=False)[0]
    hits_before = engine.block_manager.prefix_cache_hits
    second = llm.generate(prompt, params, use_tqdm=False)[0]
    n_prompt = len(second.prompt_token_ids)
    hit_tokens = engine.block_manager.prefix_cache_hits - hits_before
    assert hit_tokens == (n_prompt - 1) // 16 * 16 > 0
    assert second.num_cached_tokens == hit_tokens
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    engine.check_no_leaks()


def test_abort_mid_generation_frees_blocks(llm):
    engine = llm.llm_engine
    params = SamplingParams(
        temperature=0.0, max_tokens=50, ignore_eos=True, output_kind=RequestOutputKind.DELTA
    )
    for i in range(6):
        engine.add_request(f"abort-{i}", f"Request number {i} says hello and", params)
    for _ in range(5):
        engine.step()
    assert engine.block_manager.num_free_blocks < engine.num_blocks
    engine.abort_request(["abort-0", "abort-3"])
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].finish_reason
    assert finished["abort-0"] == finished["abort-3"] == "abort"
    assert all(finished[f"abort-{i}"] == "length" for i in (1, 2, 4, 5))
    engine.check_no_leaks()


def test_abort_waiting_request(llm):
    engine = llm.llm_engine
    engine.add_request("w", "never scheduled", SamplingParams(max_tokens=5))
    engine.abort_request("w")
    outs = engine.step()
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"]
    engine.check_no_leaks()


def test_streaming_deltas_add_up(llm):
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=30, output_kind=RequestOutputKind.DELTA)
    engine.add_request("s", "Write a short poem about the sea:", params)
    text, ids, steps = "", [], 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.outputs[0].text
            ids += out.outputs[0].token_ids
            steps += 1
    full = llm.generate(
        "Write a short poem about the sea:",
        SamplingParams(temperature=0.0, max_tokens=30),
        use_tqdm=False,
    )[0]
    assert steps > 1
    assert ids == full.outputs[0].token_ids
    assert text == full.outputs[0].text


def test_priority_policy_serves_important_first(make_smollm2):
    llm = make_smollm2(scheduling_policy="priority", max_num_seqs=1)
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    engine.add_request("low", "low priority", params, priority=10)
    engine.add_request("high", "high priority", params, priority=-5)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["high", "low"]
    engine.check_no_leaks()


@pytest.mark.slow
def test_priority_preemption_serves_interactive_at_once_and_keeps_greedy_outputs(make_smollm2):
    """Batch requests (priority 1000) fill every sequence slot; an interactive one (priority 0)
    arriving meanwhile preempts the latest of them and gets its first token in the next step;
    the preempted request resumes afterwards, and every greedy output equals the same request
    run alone."""
    llm = make_smollm2(
        scheduling_policy="priority", max_num_seqs=2, block_size=16, num_kv_blocks=32,
        max_model_len=128,
    )  # fmt: skip
    engine, tok = llm.llm_engine, llm.get_tokenizer()
    batch = [tok.encode(f"Batch item {i}: the river, the stone and the silver") for i in range(2)]
    urgent = tok.encode("Hello, how are you today? I am")
    long = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    short = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i, p in enumerate(batch):
        engine.add_request(f"batch-{i}", p, long, priority=1000)
    for _ in range(3):
        engine.step()
    engine.add_request("urgent", urgent, short, priority=0)
    done: dict[str, list[int]] = {}
    order, first_token_step, step = [], None, 0
    while engine.has_unfinished_requests():
        step += 1
        for out in engine.step():
            if out.request_id == "urgent" and out.outputs[0].token_ids and not first_token_step:
                first_token_step = step
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
                order.append(out.request_id)
    assert first_token_step == 1, "the interactive request waited behind batch work"
    assert engine.scheduler.num_preemptions == 1
    assert order[0] == "urgent" and order[-1] == "batch-1"  # the latest batch one was preempted
    engine.check_no_leaks()
    for rid, prompt, params in (
        ("batch-0", batch[0], long), ("batch-1", batch[1], long), ("urgent", urgent, short),
    ):  # fmt: skip
        alone = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
        assert done[rid] == list(alone.outputs[0].token_ids), rid
