"""Shared fixtures: the real SmolLM2 weights, loaded once per session."""

from __future__ import annotations

import os

import pytest

# Tests run on 2 cores; more threads than cores only adds contention.
os.environ.setdefault("OMP_NUM_THREADS", "2")

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors. triton.jit reads
# this when a kernel module is imported, so it is set before any test module imports one.
if not __import__("torch").cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from kvpilot_engine.loader import resolve_model_path

    return str(resolve_model_path("smollm2"))


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    from kvpilot_engine.loader import load_checkpoint

    return load_checkpoint("smollm2")


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_path):
    """transformers' own model from the same GGUF, in float32: the oracle."""
    import torch
    from transformers import AutoModelForCausalLM

    path = os.path.dirname(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(
        path, gguf_file=os.path.basename(smollm2_path), dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="session")
def make_smollm2(smollm2_checkpoint):
    """Build an LLM on the (already parsed) SmolLM2 checkpoint with the given engine args."""
    from kvpilot_engine import LLM
    from kvpilot_engine.config import EngineArgs
    from kvpilot_engine.llm_engine import LLMEngine

    def make(**engine_args):
        args = EngineArgs(model="smollm2", dtype="float32", **engine_args)
        return LLM.from_engine(LLMEngine(args, checkpoint=smollm2_checkpoint))

    return make


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
