"""`kvpilot eval perplexity`: a model's perplexity on a fixed English text, through the engine's
own paged forward (`LLMEngine.score`), so quantized and float storage are compared as served.

The default text is CPython's documentation as the standard library ships it
(`pydoc_data.topics`): English prose with code, present wherever Python is, the same bytes for a
given Python version.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch


def reference_text() -> str:
    from pydoc_data.topics import topics  # type: ignore[import-not-found]

    return "\n\n".join(topics[key] for key in sorted(topics))


@dataclass(frozen=True)
class Perplexity:
    perplexity: float
    tokens: int  # tokens predicted
    windows: int


def perplexity(engine, token_ids: list[int], context: int) -> Perplexity:  # type: ignore[no-untyped-def]
    """Non-overlapping windows of `context` tokens, each scored from an empty cache; the first
    token of a window is context only. Windows are capped below the engine's max_model_len."""
    context = min(context, engine.max_model_len - 1)
    nll, count, windows = 0.0, 0, 0
    for start in range(0, len(token_ids) - 1, context):
        window = token_ids[start : start + context]
        if len(window) < 2:
            break
        logits = engine.score(window)
        logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)
        targets = torch.tensor(window[1:], dtype=torch.long)
        nll -= logprobs.gather(1, targets[:, None]).sum().item()
        count += len(window) - 1
        windows += 1
    return Perplexity(math.exp(nll / count), count, windows)


def load_text(path: str | None) -> str:
    return reference_text() if path is None else Path(path).read_text(encoding="utf-8")
