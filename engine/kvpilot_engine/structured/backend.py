"""The grammar backend: xgrammar compiles a request's StructuredOutputsParams against the model's
vocabulary once, and each sequence walks its own matcher (Grammar) over the compiled grammar.

xgrammar was picked by measurement (docs/benchmarks.md, `python -m kvpilot_engine.bench.grammar`):
on SmolLM2's 49k vocabulary its per-token mask is the cheapest of xgrammar, llguidance and
outlines-core (~1 us median against ~10 us and a 14 ms-per-schema compile for outlines-core),
it passed every schema test (outlines-core let number bounds through), and its matchers roll back
any number of tokens, which speculative decoding needs to check draft tokens.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch

from kvpilot_engine.structured.params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar

    from kvpilot_engine.tokenizer import Tokenizer

# Keywords xgrammar's JSON Schema converter ignores without a word: a grammar built without them
# would let through output the schema forbids, so requests that use them are refused instead.
UNSUPPORTED_KEYWORDS = frozenset(
    {
        "not",
        "if",
        "then",
        "else",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "unevaluatedItems",
    }
)
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_ONE = ("items", "additionalProperties", "propertyNames", "unevaluatedProperties")
_SCHEMA_LISTS = ("prefixItems", "anyOf", "oneOf", "allOf")
# xgrammar's C++ errors start with "[hh:mm:ss] /path/file.cc:123: "; users need only the rest.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class GrammarError(ValueError):
    """A structured-output spec that cannot be compiled; `field` is the StructuredOutputsParams
    field at fault (json, regex, choice, grammar)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


def _unsupported_keywords(schema: Any, path: str = "") -> list[str]:
    """Paths of the UNSUPPORTED_KEYWORDS used anywhere a subschema can be."""
    if not isinstance(schema, dict):
        return []
    found = [f"{path}/{k}" for k in schema if k in UNSUPPORTED_KEYWORDS]
    for key in _SCHEMA_MAPS:
        for name, sub in (
            (schema.get(key) or {}).items() if isinstance(schema.get(key), dict) else ()
        ):
            found += _unsupported_keywords(sub, f"{path}/{key}/{name}")
    for key in _SCHEMA_ONE:
        found += _unsupported_keywords(schema.get(key), f"{path}/{key}")
    for key in _SCHEMA_LISTS:
        subs = schema.get(key)
        for i, sub in enumerate(subs if isinstance(subs, list) else ()):
            found += _unsupported_keywords(sub, f"{path}/{key}/{i}")
    return found


def check_json_schema(schema: dict[str, Any]) -> None:
    """Refuse a schema that is not a valid JSON Schema, or uses keywords we cannot enforce."""
    import jsonschema

    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        raise GrammarError(
            f"invalid JSON schema{f' at /{where}' if where else ''}: {e.message}", "json"
        ) from None
    bad = _unsupported_keywords(schema)
    if bad:
        raise GrammarError(
            f"unsupported JSON schema keyword {bad[0].rsplit('/', 1)[-1]!r} at {bad[0]}; "
            f"structured outputs cannot enforce {', '.join(sorted(UNSUPPORTED_KEYWORDS))}",
            "json",
        )


def _choice_grammar(choices: list[str]) -> str:
    import json

    return "root ::= " + " | ".join(json.dumps(c) for c in choices)


class GrammarBackend:
    """Compiles specs for one tokenizer (thread-safe, with an LRU of compiled grammars: agents
    send the same schema and tool list again and again) and hands out per-sequence matchers."""

    def __init__(
        self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int], cache_size: int = 256
    ):
        import xgrammar as xgr

        self._xgr = xgr
        table = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
        vocab = [""] * vocab_size
        for token, tid in table.items():
            if tid < vocab_size:
                vocab[tid] = token
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo(
            vocab,
            vocab_type=xgr.VocabType.BYTE_LEVEL,
            vocab_size=vocab_size,
            stop_token_ids=list(eos_token_ids),
        )
        # One compile thread: the engine shares the machine's cores with the forward pass.
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str, bool], xgrammar.CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, params: StructuredOutputsParams) -> xgrammar.CompiledGrammar:
        key = params.cache_key()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        kind = params.kind
        if kind == "json":
            assert isinstance(params.json, dict)
            check_json_schema(params.json)
        try:
            compiled = self._compile(params, kind)
        except RuntimeError as e:
            msg = _CPP_PREFIX.sub("", str(e).strip().splitlines()[0])
            what = {"json": "JSON schema", "regex": "regex", "grammar": "grammar"}.get(kind, kind)
            raise GrammarError(f"the {what} cannot be compiled: {msg}", kind) from None
        with self._lock:
            self._cache[key] = compiled
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, params: StructuredOutputsParams, kind: str) -> xgrammar.CompiledGrammar:
        c = self.compiler
        ws: dict[str, Any] = (
            {"any_whitespace": False, "separators": (",", ":")}
            if params.disable_any_whitespace
            else {"any_whitespace": True}
        )
        if kind == "json":
            import json

            return c.compile_json_schema(json.dumps(params.json), **ws)
        if kind == "json_object":
            return c.compile_json_schema('{"type": "object"}', **ws)
        if kind == "regex":
            assert params.regex is not None
            return c.compile_regex(params.regex)
        if kind == "choice":
            assert params.choice is not None
            return c.compile_grammar(_choice_grammar(params.choice))
        assert params.grammar is not None
        return c.compile_grammar(params.grammar)

    def grammar(self, params: StructuredOutputsParams) -> Grammar:
        return Grammar(self._xgr.GrammarMatcher(self.compile(params)), self.vocab_size)


class Grammar:
    """One sequence's place in its grammar. Tokens are accepted as they are sampled, and can be
    rolled back (draft tokens from speculative decoding are checked with `validate_tokens`)."""

    def __init__(self, matcher: xgrammar.GrammarMatcher, vocab_size: int):
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.num_accepted = 0

    def accept_token(self, token: int) -> bool:
        """Advance by one token; False (and no change) when the grammar does not allow it."""
        ok = bool(self.matcher.accept_token(token))
        self.num_accepted += ok
        return ok

    def accept_tokens(self, tokens: list[int]) -> int:
        """Advance by as many of `tokens` as the grammar allows, in order; how many that was."""
        for i, t in enumerate(tokens):
            if not self.accept_token(t):
                return i
        return len(tokens)

    def validate_tokens(self, tokens: list[int]) -> int:
        """How long a prefix of `tokens` the grammar would accept, leaving the state unchanged."""
        n = self.accept_tokens(tokens)
        self.rollback(n)
        return n

    def rollback(self, num_tokens: int) -> None:
        if num_tokens:
            self.matcher.rollback(num_tokens)
            self.num_accepted -= num_tokens

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Write the allowed next tokens into row `row` of a packed int32 bitmask
        ([rows, ceil(vocab / 32)], bit t of the row: token t is allowed)."""
        self.matcher.fill_next_token_bitmask(bitmask, row)

    @property
    def is_terminated(self) -> bool:
        """A stop token was accepted: nothing more may follow."""
        return bool(self.matcher.is_terminated())


def allocate_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    """A packed bitmask with every token allowed (rows without a grammar stay like this)."""
    return torch.full((rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set the logits of disallowed tokens to -inf, in place, on `rows` only (unconstrained rows of
    the batch are not touched). xgrammar's kernel: C++ on CPU (4x faster than unpacking the bits
    with torch ops at batch 16), CUDA/Triton on a GPU."""
    import xgrammar as xgr

    xgr.apply_token_bitmask_inplace(
        logits, bitmask.to(logits.device, non_blocking=True), indices=rows
    )


def fill_structured_bitmask(
    entries: list[tuple[Any, list[int]]], vocab_size: int
) -> tuple[torch.Tensor | None, list[int]]:
    """The bitmask of one sampling step and the rows it constrains, or (None, []) when no
    sequence has a grammar (the common case costs one pass over the batch).

    `entries` are the sampled sequences in row order with their drafts: a sequence takes
    len(drafts) + 1 rows, row j masked by the grammar after its first j drafts (accepted here and
    rolled back, so the sampled token can be checked against every draft position). Rows after a
    draft the grammar refuses stay open: the token sampled at the refused position differs from
    the draft, so verification stops there and never reads them.

    Called after the forward pass is launched and before the sampler reads the logits: on a GPU
    the host fills masks while the device computes."""
    if not any(seq.grammar is not None for seq, _ in entries):
        return None, []
    bitmask = allocate_bitmask(sum(len(d) + 1 for _, d in entries), vocab_size)
    rows: list[int] = []
    row = 0
    for seq, drafts in entries:
        grammar: Grammar | None = seq.grammar
        if grammar is not None:
            accepted = 0
            for j in range(len(drafts) + 1):
                grammar.fill_bitmask(bitmask, row + j)
                rows.append(row + j)
                if j == len(drafts) or not grammar.accept_token(drafts[j]):
                    break
                accepted += 1
            grammar.rollback(accepted)
        row += len(drafts) + 1
    return bitmask, rows
