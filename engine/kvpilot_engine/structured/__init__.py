"""Structured outputs: grammar-constrained decoding (JSON Schema, regex, choice, EBNF grammars).

`StructuredOutputsParams` on a request's SamplingParams says what its output must match; the
engine compiles it once (`GrammarBackend`), gives each sequence a `Grammar` (its matcher state),
and before every sampling step fills a packed token bitmask for the constrained rows only; the
sampler sets the disallowed tokens' logits to -inf (`apply_token_bitmask`). A sequence finishes
when its grammar accepts a stop token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kvpilot_engine.structured.params import GuidedDecodingParams, StructuredOutputsParams

if TYPE_CHECKING:
    from kvpilot_engine.structured.backend import (
        Grammar,
        GrammarBackend,
        GrammarError,
        allocate_bitmask,
        apply_token_bitmask,
        fill_structured_bitmask,
    )

# The backend (torch, xgrammar) loads on first use: SamplingParams imports the params, and the
# `kvpilot` command's parser (in the operator image, which has no torch) imports SamplingParams.
_BACKEND = {
    "Grammar",
    "GrammarBackend",
    "GrammarError",
    "allocate_bitmask",
    "apply_token_bitmask",
    "fill_structured_bitmask",
}


def __getattr__(name: str) -> Any:
    if name in _BACKEND:
        from kvpilot_engine.structured import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'kvpilot_engine.structured' has no attribute {name!r}")


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
