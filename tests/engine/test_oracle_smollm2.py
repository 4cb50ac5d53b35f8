"""The engine against transformers on the same SmolLM2 GGUF, in float32: same greedy tokens,
logits within 1e-3."""

from __future__ import annotations

import pytest
from kvpilot_engine import SamplingParams

from .hf_oracle import hf_greedy, hf_logits

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
