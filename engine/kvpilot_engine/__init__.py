"""kvpilot's inference engine: paged KV cache, continuous batching, Llama-family models.

`from kvpilot_engine import LLM, SamplingParams`. Names load lazily so that `kvpilot` commands
which do not run a model (the operator's) never import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "LLMEngine",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
]

_WHERE = {
    "LLM": "kvpilot_engine.llm",
    "LLMEngine": "kvpilot_engine.llm_engine",
    "EngineArgs": "kvpilot_engine.config",
    "SamplingParams": "kvpilot_engine.sampling_params",
    "RequestOutputKind": "kvpilot_engine.sampling_params",
    "RequestOutput": "kvpilot_engine.outputs",
    "CompletionOutput": "kvpilot_engine.outputs",
}

if TYPE_CHECKING:
    from kvpilot_engine.config import EngineArgs
    from kvpilot_engine.llm import LLM
    from kvpilot_engine.llm_engine import LLMEngine
    from kvpilot_engine.outputs import CompletionOutput, RequestOutput
    from kvpilot_engine.sampling_params import RequestOutputKind, SamplingParams


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'kvpilot_engine' has no attribute {name!r}")
