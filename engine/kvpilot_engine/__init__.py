"""kvpilot's inference engine: paged KV cache, continuous batching, Llama-family models.

`from kvpilot_engine import LLM, SamplingParams`. Names load lazily so that `kvpilot` commands
which do not run a model (the operator's) never import torch.

Modules, from the API down:
- requests: `llm` (LLM, offline generation), `llm_engine` (LLMEngine: add requests, step, return
  outputs), `sampling_params`, `outputs`, `tokenizer` (with incremental detokenizing), `lora`
  (LoRA adapters: LoRARequest, loading them, their device slots).
- scheduling: `scheduler` (which tokens run next), `block_manager` (the KV pool's blocks and the
  prefix cache), `sequence`.
- the device: `worker` (putting the model on its devices: each rank's shard, the KV pool's size,
  CUDA graphs, the tensor-parallel processes), `model_runner` (one rank's step: inputs, forward,
  sampling), `step_input` (a step as plain lists), `cuda_graph` (decode graphs), `sampler`.
- the model: `models` (the Llama family), `attention` (paged attention's PyTorch reference: the
  seam to the KV layout), `kernels` (Triton), `parallel` (tensor-parallel shards and
  collectives), `quantization`, `device`.
- checkpoints and settings: `loader`, `gguf_reader`, `config` (ModelConfig, EngineArgs),
  `contracts` (torch-free: what the control plane may rely on).
- commands: `cli` (`kvpilot`), `server` (`kvpilot serve`), `batch` (`kvpilot run-batch`), `bench`,
  `eval`, `export`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "LLMEngine",
    "LoRARequest",
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
    "LoRARequest": "kvpilot_engine.lora.request",
}

if TYPE_CHECKING:
    from kvpilot_engine.config import EngineArgs
    from kvpilot_engine.llm import LLM
    from kvpilot_engine.llm_engine import LLMEngine
    from kvpilot_engine.lora.request import LoRARequest
    from kvpilot_engine.outputs import CompletionOutput, RequestOutput
    from kvpilot_engine.sampling_params import RequestOutputKind, SamplingParams


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'kvpilot_engine' has no attribute {name!r}")
