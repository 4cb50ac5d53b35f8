"""Structured outputs in the engine: StructuredOutputsParams, the xgrammar backend (compile errors,
accept/rollback for drafts, bitmasks), and offline generation with SmolLM2 whose outputs are
checked by an independent oracle (jsonschema, re.fullmatch, the choice list)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from kvpilot_engine import SamplingParams
from kvpilot_engine.structured import (
    GrammarBackend,
    GrammarError,
    StructuredOutputsParams,
    allocate_bitmask,
    apply_token_bitmask,
    fill_structured_bitmask,
)
from kvpilot_engine.structured.backend import check_json_schema

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def backend(smollm2_checkpoint) -> GrammarBackend:
    c = smollm2_checkpoint.config
    return GrammarBackend(smollm2_checkpoint.tokenizer, c.vocab_size, c.eos_token_ids)


# ---- params and schema checks (no model) ---------------------------------------------------
def test_params_take_exactly_one_kind():
    assert StructuredOutputsParams(regex="a+").kind == "regex"
    assert StructuredOutputsParams(json='{"type": "object"}').json == {"type": "object"}
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match=r"exactly one.*json, regex"):
        StructuredOutputsParams(json={}, regex="a")
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{nope")
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])
    # A dict on SamplingParams is the params' fields (vLLM accepts both).
    sp = SamplingParams(structured_outputs={"choice": ["x", "y"]})
    assert isinstance(sp.structured_outputs, StructuredOutputsParams)


def test_invalid_and_unsupported_schemas_are_refused():
    with pytest.raises(GrammarError, match="invalid JSON schema at /properties/a/type"):
        check_json_schema({"type": "object", "properties": {"a": {"type": "strin"}}})
    with pytest.raises(GrammarError, match="'uniqueItems' at /properties/xs/uniqueItems"):
        check_json_schema({"properties": {"xs": {"type": "array", "uniqueItems": True}}})
    with pytest.raises(GrammarError, match="'not' at /anyOf/1/not"):
        check_json_schema({"anyOf": [{"type": "string"}, {"not": {"type": "null"}}]})
    # A property that happens to be called "not" is a name, not the keyword.
    check_json_schema({"type": "object", "properties": {"not": {"type": "string"}}})


def test_compile_errors_name_the_field(backend):
    cases = {
        "regex": StructuredOutputsParams(regex="[0-9]+("),
        "grammar": StructuredOutputsParams(grammar='root ::= "a" | b'),
        "json": StructuredOutputsParams(json={"type": "object", "minProperties": 2,
                                              "additionalProperties": False}),
    }  # fmt: skip
    for field, params in cases.items():
        with pytest.raises(GrammarError) as err:
            backend.compile(params)
        assert err.value.field == field
        assert "cannot be compiled" in str(err.value) and ".cc:" not in str(err.value)


def test_grammar_accepts_rolls_back_and_checks_drafts(backend, smollm2_checkpoint):
    tok = smollm2_checkpoint.tokenizer
    eos = smollm2_checkpoint.config.eos_token_ids[0]
    g = backend.grammar(StructuredOutputsParams(json=PERSON))
    good = tok.encode('{"name":"Al","age":3,"tags":["a"]}', add_special_tokens=False)
    bad = tok.encode('{"name":"Al","age":300', add_special_tokens=False)
    # Drafts: the grammar's verdict on a prefix, without moving.
    assert g.validate_tokens(good) == len(good)
    assert g.num_accepted == 0
    n = g.validate_tokens(bad)
    assert 0 < n < len(bad)
    assert g.accept_tokens(good) == len(good) and not g.is_terminated
    g.rollback(3)
    assert g.accept_tokens(good[-3:]) == 3
    assert g.accept_token(eos) and g.is_terminated

    # The bitmask for a drafted sequence: row j is the state after j drafts; a row with no
    # grammar is absent from the constrained rows; drafts leave the grammar where it was.
    class Seq:
        def __init__(self, grammar):
            self.grammar = grammar

    g2 = backend.grammar(StructuredOutputsParams(json=PERSON))
    mask, rows = fill_structured_bitmask([(Seq(None), []), (Seq(g2), good[:2])], 49152)
    assert mask is not None and rows == [1, 2, 3] and g2.num_accepted == 0
    allowed = ((mask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1).view(4, -1).bool()
    assert allowed[0].all()  # unconstrained
    for j in range(3):
        assert not allowed[1 + j].all()
        if j < 2:
            assert allowed[1 + j, good[j]]
    assert fill_structured_bitmask([(Seq(None), [])], 49152) == (None, [])


def test_bitmask_touches_only_constrained_rows():
    logits = torch.randn(3, 100)
    before = logits.clone()
    mask = allocate_bitmask(3, 100)
    mask[1] = 0
    mask[1, 0] = 1 << 5  # only token 5
    apply_token_bitmask(logits, mask, [1])
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[2], before[2])
    assert logits[1].argmax() == 5 and torch.isinf(logits[1]).sum() == 99


# ---- offline generation with SmolLM2 ---------------------------------------------------------
@pytest.fixture(scope="module")
def llm(make_smollm2):
    return make_smollm2()


def chat_prompt(llm, text: str) -> str:
    return llm.get_tokenizer().apply_chat_template([{"role": "user", "content": text}])


def generate(llm, prompt, temperature=0.0, max_tokens=64, n=1, **so):
    params = SamplingParams(
        temperature=temperature, max_tokens=max_tokens, n=n, seed=1,
        structured_outputs=StructuredOutputsParams(**so),
    )  # fmt: skip
    return llm.generate(prompt, params, use_tqdm=False)[0].outputs


def test_generate_each_kind_matches(llm):
    prompt = chat_prompt(llm, "Give me a person as JSON.")
    for temperature in (0.0, 0.8):
        outs = generate(llm, prompt, temperature, n=2 if temperature else 1, json=PERSON)
        for out in outs:
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), PERSON)
    out = generate(llm, prompt, json_object=True)[0]
    assert out.finish_reason == "stop" and isinstance(json.loads(out.text), dict)
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    out = generate(llm, chat_prompt(llm, "Your phone number?"), 0.8, regex=phone)[0]
    assert re.fullmatch(phone, out.text) and out.finish_reason == "stop"
    choices = ["positive", "negative", "neutral"]
    out = generate(llm, chat_prompt(llm, "Sentiment of 'I love it'?"), choice=choices)[0]
    assert out.text in choices
    out = generate(llm, prompt, 0.8, grammar='root ::= "x" ("-" [0-9]){1,3} "."')[0]
    assert re.fullmatch(r"x(-[0-9]){1,3}\.", out.text)
    llm.llm_engine.check_no_leaks()


def test_constrained_rows_leave_the_rest_of_the_batch_alone(llm):
    """An unconstrained greedy request gives the same tokens alone and batched with a JSON one."""
    plain = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate("The capital of France is", plain, use_tqdm=False)[0]
    constrained = SamplingParams(
        temperature=0.0, max_tokens=40, structured_outputs={"json": PERSON}
    )
    both = llm.generate(
        ["The capital of France is", chat_prompt(llm, "A person as JSON")],
        [plain, constrained],
        use_tqdm=False,
    )
    assert both[0].outputs[0].token_ids == alone.outputs[0].token_ids
    jsonschema.validate(json.loads(both[1].outputs[0].text), PERSON)


def test_engine_refuses_a_bad_spec(llm):
    from kvpilot_engine.llm_engine import InvalidRequestError

    params = SamplingParams(structured_outputs=StructuredOutputsParams(regex="(", source_param="x"))
    with pytest.raises(InvalidRequestError) as err:
        llm.llm_engine.add_request("bad", "hi", params)
    assert err.value.param == "x" and "regex" in str(err.value)
    assert "bad" not in llm.llm_engine.requests


def test_speculative_drafts_are_checked_against_the_grammar(llm, make_smollm2):
    """With n-gram drafts (adaptive planning off, so every step drafts), greedy constrained
    output is the same as without speculation, and valid: drafts the grammar refuses are never
    accepted."""
    spec = make_smollm2(
        speculative_config={"method": "ngram", "num_speculative_tokens": 4, "adaptive": False}
    )
    # A prompt that repeats the JSON it asks for gives the n-gram proposer drafts to offer.
    example = '{"name":"Bob","age":41,"tags":["a","b"]}'
    prompt = chat_prompt(llm, f"Example: {example} {example}. Now another person as JSON.")
    params = SamplingParams(temperature=0.0, max_tokens=48, structured_outputs={"json": PERSON})
    plain = llm.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    drafted = spec.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert drafted.token_ids == plain.token_ids
    jsonschema.validate(json.loads(drafted.text), PERSON)
    assert spec.llm_engine.stats.spec_num_draft_tokens > 0
    spec.llm_engine.check_no_leaks()


def test_run_batch_takes_response_format_and_tool_choice(llm, tmp_path):
    from kvpilot_engine.batch.run_batch import run_batch

    tool = {"type": "function", "function": {"name": "add_person", "parameters": PERSON}}
    ask = [{"role": "user", "content": "Add a person."}]
    bodies = {
        "schema": {"response_format": {"type": "json_schema",
                                       "json_schema": {"name": "p", "schema": PERSON}}},
        "tool": {"tools": [tool], "tool_choice": {"type": "function",
                                                  "function": {"name": "add_person"}}},
    }  # fmt: skip
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [
        {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": "smollm2", "messages": ask, "max_tokens": 60, **b}}
        for cid, b in bodies.items()
    ]  # fmt: skip
    src.write_text("".join(json.dumps(line) + "\n" for line in lines))
    summary = run_batch(llm, str(src), str(dst), "smollm2", use_tqdm=False)
    assert summary.succeeded == 2, dst.read_text()
    out = {ln["custom_id"]: ln["response"]["body"] for ln in map(json.loads, dst.open())}
    jsonschema.validate(json.loads(out["schema"]["choices"][0]["message"]["content"]), PERSON)
    call = out["tool"]["choices"][0]["message"]["tool_calls"][0]["function"]
    assert call["name"] == "add_person"
    jsonschema.validate(json.loads(call["arguments"]), PERSON)
