"""Structured outputs: grammar-constrained decoding (JSON Schema, regex, choice, EBNF grammars).

`StructuredOutputsParams` on a request's SamplingParams says what its output must match; the
engine compiles it once (`GrammarBackend`), gives each sequence a `Grammar` (its matcher state),
and before every sampling step fills a packed token bitmask for the constrained rows only; the
sampler sets the disallowed tokens' logits to -inf (`apply_token_bitmask`). A sequence finishes
when its grammar accepts a stop token.
"""

from kvpilot_engine.structured.backend import (
    Grammar,
    GrammarBackend,
    GrammarError,
    allocate_bitmask,
    apply_token_bitmask,
    fill_structured_bitmask,
)
from kvpilot_engine.structured.params import GuidedDecodingParams, StructuredOutputsParams

__all__ = [
    "Grammar",
    "GrammarBackend",
    "GrammarError",
    "GuidedDecodingParams",
    "StructuredOutputsParams",
    "allocate_bitmask",
    "apply_token_bitmask",
    "fill_structured_bitmask",
]
