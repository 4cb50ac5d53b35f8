"""Grammar libraries for structured outputs, compared on SmolLM2's vocabulary.

`python -m kvpilot_engine.bench.grammar` runs each installed library (xgrammar, llguidance,
outlines-core) over the same JSON schemas and reports, per library:

- compile time per schema (first compile; a server caches compiled grammars);
- mask time per token: the time to compute the allowed-token mask for the next token while the
  matcher walks a valid document token by token (the per-token cost a constrained sequence adds);
- correctness: every valid instance is accepted token by token and then allows EOS; every invalid
  instance is rejected somewhere (a token outside the mask, or no EOS at the end).

The documents are tokenised the way the model would write them (SmolLM2's own BPE), so the walk
follows the paths the sampler takes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# (name, schema, valid instances, invalid instances): the JSON Schema features users use.
CASES: list[tuple[str, dict[str, Any], list[Any], list[Any]]] = [
    (
        "flat object, required",
        {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        [{"name": "Ada", "age": 36}],
        [{"name": "Ada"}, {"name": "Ada", "age": "x"}],
    ),
    (
        "enum",
        {
            "type": "object",
            "properties": {"color": {"enum": ["red", "green", "blue"]}},
            "required": ["color"],
            "additionalProperties": False,
        },
        [{"color": "green"}],
        [{"color": "purple"}],
    ),
    (
        "array of numbers, bounds",
        {
            "type": "object",
            "properties": {
                "scores": {
                    "type": "array",
                    "items": {"type": "integer", "minimum": 0, "maximum": 100},
                    "minItems": 1,
                    "maxItems": 4,
                }
            },
            "required": ["scores"],
            "additionalProperties": False,
        },
        [{"scores": [1, 50, 100]}],
        [{"scores": []}, {"scores": [101]}, {"scores": [-1]}, {"scores": [1, 2, 3, 4, 5]}],
    ),
    (
        "string pattern and length",
        {
            "type": "object",
            "properties": {
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                "code": {"type": "string", "minLength": 2, "maxLength": 3},
            },
            "required": ["zip", "code"],
            "additionalProperties": False,
        },
        [{"zip": "94110", "code": "ab"}],
        [{"zip": "9411", "code": "ab"}, {"zip": "94110", "code": "abcd"}],
    ),
    (
        "nested objects and arrays",
        {
            "type": "object",
            "properties": {
                "user": {
                    "type": "object",
                    "properties": {
                        "id": {"type": "integer"},
                        "tags": {"type": "array", "items": {"type": "string"}},
                        "address": {
                            "type": "object",
                            "properties": {
                                "city": {"type": "string"},
                                "geo": {
                                    "type": "array",
                                    "items": {"type": "number"},
                                    "minItems": 2,
                                    "maxItems": 2,
                                },
                            },
                            "required": ["city", "geo"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["id", "tags", "address"],
                    "additionalProperties": False,
                },
                "active": {"type": "boolean"},
            },
            "required": ["user", "active"],
            "additionalProperties": False,
        },
        [
            {
                "user": {
                    "id": 7,
                    "tags": ["a", "b"],
                    "address": {"city": "Paris", "geo": [48.85, 2.35]},
                },
                "active": True,
            }
        ],
        [
            {"user": {"id": 7, "tags": ["a"], "address": {"city": "Paris"}}, "active": True},
            {"user": {"id": 7, "tags": [1], "address": {"city": "P", "geo": [1, 2]}}, "active": 1},
        ],
    ),
    (
        "anyOf, $ref, number bounds",
        {
            "$defs": {
                "item": {
                    "type": "object",
                    "properties": {
                        "sku": {"type": "string"},
                        "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 1000},
                    },
                    "required": ["sku", "price"],
                    "additionalProperties": False,
                }
            },
            "type": "object",
            "properties": {
                "items": {"type": "array", "items": {"$ref": "#/$defs/item"}},
                "note": {"anyOf": [{"type": "string"}, {"type": "null"}]},
            },
            "required": ["items", "note"],
            "additionalProperties": False,
        },
        [{"items": [{"sku": "x1", "price": 9.5}], "note": None}],
        [{"items": [{"sku": "x1", "price": 0}], "note": None}, {"items": [], "note": 3}],
    ),
]


@dataclass
class Result:
    library: str
    compile_ms: list[float] = field(default_factory=list)
    mask_us: list[float] = field(default_factory=list)
    valid_ok: int = 0
    valid_total: int = 0
    invalid_ok: int = 0
    invalid_total: int = 0
    errors: list[str] = field(default_factory=list)


class Walker:
    """One library's matcher behind three calls: allowed(mask) -> bool tensor, accept, can_end."""

    def start(self, schema: dict[str, Any]) -> None: ...
    def mask(self) -> torch.Tensor: ...
    def accept(self, token: int) -> bool: ...
    def can_end(self) -> bool: ...


def _bits_to_bool(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    bits = (bitmask.view(-1)[:, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.view(-1)[:vocab].bool()


class XGrammarWalker(Walker):
    def __init__(self, vocab: list[str], vocab_size: int, eos: list[int]):
        import xgrammar as xgr

        self.xgr = xgr
        info = xgr.TokenizerInfo(
            vocab, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=vocab_size, stop_token_ids=eos
        )
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)
        self.vocab_size = vocab_size
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.eos = eos

    def start(self, schema: dict[str, Any]) -> None:
        compiled = self.compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":")
        )
        self.matcher = self.xgr.GrammarMatcher(compiled)

    def mask(self) -> torch.Tensor:
        self.matcher.fill_next_token_bitmask(self.bitmask)
        return self.bitmask

    def accept(self, token: int) -> bool:
        return bool(self.matcher.accept_token(token))

    def can_end(self) -> bool:
        return bool(_bits_to_bool(self.mask(), self.vocab_size)[self.eos[0]])


class LLGuidanceWalker(Walker):
    def __init__(self, tokenizer_json: str, vocab_size: int, eos: list[int]):
        import llguidance
        import llguidance.torch

        self.ll = llguidance
        self.fill = llguidance.torch.fill_next_token_bitmask
        self.tok = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size = vocab_size
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
        self.eos = eos

    def start(self, schema: dict[str, Any]) -> None:
        grammar = self.ll.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
        self.matcher = self.ll.LLMatcher(self.tok, grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(self.matcher.get_error())

    def mask(self) -> torch.Tensor:
        self.fill(self.matcher, self.bitmask, 0)
        return self.bitmask

    def accept(self, token: int) -> bool:
        return bool(self.matcher.consume_token(token)) and not self.matcher.is_error()

    def can_end(self) -> bool:
        return bool(_bits_to_bool(self.mask(), self.vocab_size)[self.eos[0]])


class OutlinesWalker(Walker):
    def __init__(self, vocab: dict[str, int], vocab_size: int, eos: list[int]):
        import outlines_core

        self.oc = outlines_core
        byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
        tokens: dict[bytes, list[int]] = {}
        for token, tid in vocab.items():
            if tid in eos:
                continue
            try:
                raw = bytes(byte_decoder[c] for c in token)
            except KeyError:  # special tokens outside the byte alphabet
                continue
            tokens.setdefault(raw, []).append(tid)
        self.vocabulary = outlines_core.Vocabulary(eos[0], tokens)
        self.vocab_size = vocab_size
        self.eos = eos
        self.bitmask = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)

    def start(self, schema: dict[str, Any]) -> None:
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        self.guide = self.oc.Guide(self.oc.Index(regex, self.vocabulary))

    def mask(self) -> torch.Tensor:
        self.guide.write_mask_into(self.bitmask.data_ptr(), self.bitmask.numel(), 4)
        return self.bitmask

    def accept(self, token: int) -> bool:
        if token not in self.guide.get_tokens():
            return False
        self.guide.advance(token)
        return True

    def can_end(self) -> bool:
        return self.eos[0] in self.guide.get_tokens()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are written in."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def walk(w: Walker, tokens: list[int], vocab: int, timings: list[float] | None) -> bool:
    """Feed `tokens`; False as soon as one is outside the mask or refused, else whether EOS is
    allowed at the end."""
    for t in tokens:
        t0 = time.perf_counter()
        m = w.mask()
        if timings is not None:
            timings.append((time.perf_counter() - t0) * 1e6)
        if not _bits_to_bool(m, vocab)[t]:
            return False
        if not w.accept(t):
            return False
    return w.can_end()


def run(library: str, make: Callable[[], Walker], encode: Callable[[str], list[int]], vocab: int):
    res = Result(library)
    try:
        w = make()
    except Exception as e:
        res.errors.append(f"load: {e}")
        return res
    for name, schema, valid, invalid in CASES:
        for i, doc in enumerate(valid + invalid):
            is_valid = i < len(valid)
            t0 = time.perf_counter()
            try:
                w.start(schema)
            except Exception as e:
                res.errors.append(f"{name}: compile: {str(e)[:120]}")
                break
            if i == 0:
                res.compile_ms.append((time.perf_counter() - t0) * 1e3)
            ok = walk(w, encode(json.dumps(doc, separators=(",", ":"))), vocab, res.mask_us)
            if is_valid:
                res.valid_total += 1
                res.valid_ok += ok
                if not ok:
                    res.errors.append(f"{name}: valid instance refused: {doc}")
            else:
                res.invalid_total += 1
                res.invalid_ok += not ok
                if ok:
                    res.errors.append(f"{name}: invalid instance accepted: {doc}")
    return res


# Long enough that no sequence ends before max_tokens: constrained and unconstrained batches keep
# the same shape every step, so the difference is the grammar's cost alone.
LONG_SCHEMA = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 8},
    "minItems": 64,
}


def engine_overhead(model: str, batch_sizes: list[int], max_tokens: int, repeat: int) -> None:
    """Seconds per generated token of the same requests with and without a JSON schema."""
    import kvpilot_engine.model_runner as mr
    import kvpilot_engine.sampler as sm
    from kvpilot_engine import LLM, SamplingParams
    from kvpilot_engine.structured import Grammar

    # The grammar's own time inside the engine: mask filling, mask applying, token accepting.
    # The step times above move with the machine's load; this share does not.
    spent = [0.0]

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0

        return wrapper

    mr.fill_structured_bitmask = timed(mr.fill_structured_bitmask)
    sm.apply_token_bitmask = timed(sm.apply_token_bitmask)
    Grammar.accept_token = timed(Grammar.accept_token)  # type: ignore[method-assign]

    llm = LLM(model, max_num_seqs=max(batch_sizes))
    prompt = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "List some fruits as a JSON array."}]
    )
    print(
        f"{'batch':>5} {'unconstrained ms/step':>22} {'json_schema ms/step':>20} "
        f"{'difference':>10} {'grammar ms/step':>16} {'grammar share':>14}"
    )
    for b in batch_sizes:
        times: dict[bool, float] = {}
        grammar: list[float] = []
        for constrained in (False, True, False, True)[: 2 * repeat]:
            params = SamplingParams(
                temperature=0.8, seed=0, max_tokens=max_tokens, ignore_eos=not constrained,
                structured_outputs={"json": LONG_SCHEMA} if constrained else None,
            )  # fmt: skip
            llm.generate([prompt] * b, params, use_tqdm=False)  # warm (and compile the grammar)
            spent[0] = 0.0
            t0 = time.perf_counter()
            outs = llm.generate([prompt] * b, params, use_tqdm=False)
            dt = time.perf_counter() - t0
            if constrained:
                grammar.append(spent[0] / max_tokens * 1e3)
            assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
            times[constrained] = min(times.get(constrained, dt), dt)
        plain, con = (times[False] / max_tokens * 1e3, times[True] / max_tokens * 1e3)
        g = min(grammar)
        print(
            f"{b:>5} {plain:>22.1f} {con:>20.1f} {(con / plain - 1) * 100:>9.1f}% "
            f"{g:>16.2f} {g / con * 100:>13.1f}%"
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--repeat", type=int, default=3, help="walks per document for timing")
    parser.add_argument(
        "--engine",
        action="store_true",
        help="instead: the whole engine's time per step with and without a JSON schema",
    )
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    if args.engine:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        engine_overhead(args.model, sizes, args.max_tokens, min(args.repeat, 2))
        return
    torch.set_num_threads(1)

    from kvpilot_engine.loader import load_checkpoint

    ckpt = load_checkpoint(args.model)
    hf = ckpt.tokenizer.tokenizer
    vocab_size = ckpt.config.vocab_size
    eos = list(ckpt.config.eos_token_ids)
    table = hf.get_vocab(with_added_tokens=True)
    ordered = [""] * vocab_size
    for tok, tid in table.items():
        if tid < vocab_size:
            ordered[tid] = tok

    def encode(text: str) -> list[int]:
        return hf.encode(text, add_special_tokens=False).ids

    makers: dict[str, Callable[[], Walker]] = {
        "xgrammar": lambda: XGrammarWalker(ordered, vocab_size, eos),
        "llguidance": lambda: LLGuidanceWalker(hf.to_str(), vocab_size, eos),
        "outlines-core": lambda: OutlinesWalker(table, vocab_size, eos),
    }
    print(f"model {ckpt.name}: vocabulary {vocab_size}, eos {eos}, one thread")
    print(
        f"{'library':<14} {'version':<10} {'compile ms (median/max)':>24} "
        f"{'mask us/token (median/p99)':>28} {'valid':>7} {'invalid':>8}"
    )
    from importlib.metadata import version

    for lib, make in makers.items():
        res = run(lib, make, encode, vocab_size)
        for _ in range(args.repeat - 1):
            res.mask_us.extend(run(lib, make, encode, vocab_size).mask_us)
        ver = version(lib.replace("-", "_")) if not res.errors[:1] or res.compile_ms else "-"
        comp = (
            f"{statistics.median(res.compile_ms):.1f}/{max(res.compile_ms):.1f}"
            if res.compile_ms
            else "-"
        )
        mask = (
            f"{statistics.median(res.mask_us):.0f}/"
            f"{statistics.quantiles(res.mask_us, n=100)[98]:.0f}"
            if len(res.mask_us) > 2
            else "-"
        )
        print(
            f"{lib:<14} {ver:<10} {comp:>24} {mask:>28} "
            f"{res.valid_ok}/{res.valid_total:<5} {res.invalid_ok}/{res.invalid_total:<5}"
        )
        for e in res.errors:
            print(f"    {lib}: {e}")


if __name__ == "__main__":
    main()
