"""The engine against transformers on the same SmolLM2 GGUF, in float32: same greedy tokens,
logits within 1e-3; and the same greedy tokens with a repetition penalty."""

from __future__ import annotations

import pytest
import torch
from kvpilot_engine import SamplingParams

from tests.support.oracle import hf_greedy, hf_logits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "<|im_start|>user\nWhat is the boiling point of water?<|im_end|>\n<|im_start|>assistant\n",
    "List three colours:",
    "The quick brown fox",
    "In 1969, the first humans landed on",
    "Photosynthesis is the process by which plants",
]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def llm(make_smollm2):
    return make_smollm2()


@pytest.mark.slow
def test_greedy_matches_transformers(llm, hf_smollm2):
    tok = llm.get_tokenizer()
    prompt_ids = [tok.encode(p) for p in PROMPTS]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)

    max_diff = 0.0
    for ids, out in zip(prompt_ids, outs, strict=True):
        ours = out.outputs[0].token_ids
        assert len(ours) == NEW_TOKENS
        ref = hf_greedy(hf_smollm2, ids, NEW_TOKENS)
        assert ours == ref, f"prompt {PROMPTS[prompt_ids.index(ids)]!r} diverged"
        # Logits over the whole generated sequence: ours through the paged cache, theirs dense.
        full = ids + ours
        our_logits = llm.llm_engine.score(full)
        ref_logits = hf_logits(hf_smollm2, full)
        max_diff = max(max_diff, float((our_logits - ref_logits).abs().max()))
    print(f"\nlargest logit difference vs transformers (float32): {max_diff:.2e}")
    assert max_diff <= 1e-3
    llm.llm_engine.check_no_leaks()


@pytest.mark.slow
@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_greedy_repetition_penalty_matches_transformers(llm, hf_smollm2, penalty):
    """transformers' generate(repetition_penalty=...) penalises the prompt and the generated
    tokens alike, as vLLM does; both stop at the same EOS (token 2)."""
    tok = llm.get_tokenizer()
    prompt_ids = [tok.encode(p) for p in PROMPTS[:4]]
    params = SamplingParams(temperature=0.0, max_tokens=32, repetition_penalty=penalty)
    prompts = [{"prompt_token_ids": ids} for ids in prompt_ids]
    outs = llm.generate(prompts, params, use_tqdm=False)
    plain = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)
    changed = [
        o.outputs[0].token_ids != p.outputs[0].token_ids for o, p in zip(outs, plain, strict=True)
    ]
    assert any(changed)  # the penalty is not vacuous on these prompts
    for ids, out in zip(prompt_ids, outs, strict=True):
        with torch.inference_mode():
            ref = hf_smollm2.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, repetition_penalty=penalty
            )[0, len(ids) :].tolist()
        assert out.outputs[0].token_ids == ref, f"prompt {tok.decode(ids)!r} diverged"
    llm.llm_engine.check_no_leaks()
