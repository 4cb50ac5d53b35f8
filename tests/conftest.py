"""Shared fixtures (the real SmolLM2 weights, loaded once per session) and the fast tier's guard.

The fast tier is `pytest -m "not slow"`: every test that starts a process (a server, a cluster,
Prometheus, a tensor-parallel worker, a `kvpilot` command) is marked `slow`, and a test that is
not marked but starts one fails, saying so, so that the tier stays fast.
"""

from __future__ import annotations

import multiprocessing.process
import os
import subprocess
from collections.abc import Iterator
from typing import Any

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


# Fixtures that start processes (a cluster, Prometheus, helm, `kvpilot serve`), or that run
# SmolLM2 end to end (seconds a test on 2 cores): a test that uses one, directly or through
# another fixture, is slow without saying so itself.
SLOW_FIXTURES = {
    "cluster", "prometheus", "helm", "server", "engine_a", "engine_b", "slow_engine",
    "make_smollm2", "hf_smollm2",
}  # fmt: skip


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        # A gpu test compiles Triton kernels, which runs ptxas: a process, so the slow tier.
        if "gpu" in item.keywords or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# The unmarked test now in setup or call, if any: the process-starting calls below refuse to run
# for it. Teardown is left alone (stopping what a slow test started may run a command).
_fast_test: str | None = None
_execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]
_process_start = multiprocessing.process.BaseProcess.start


def _refuse(what: str) -> None:
    if _fast_test is not None:
        raise RuntimeError(
            f"{_fast_test} starts {what} but is not marked slow: mark it "
            "(@pytest.mark.slow or the module's pytestmark) so the fast tier stays fast"
        )


# Libraries probe the system this way (ctypes.util.find_library runs ldconfig): not a test's doing.
_PROBES = {"ldconfig"}


def _guarded_execute_child(self: subprocess.Popen[Any], args: Any, *rest: Any, **kw: Any) -> Any:
    argv = [args] if isinstance(args, (str, bytes, os.PathLike)) else list(args)
    if os.path.basename(os.fsdecode(argv[0]).split()[0]) not in _PROBES:
        _refuse(f"a process ({' '.join(map(os.fsdecode, argv))[:80]})")
    return _execute_child(self, args, *rest, **kw)


def _guarded_start(self: multiprocessing.process.BaseProcess) -> None:
    _refuse("a worker process")
    _process_start(self)


subprocess.Popen._execute_child = _guarded_execute_child  # type: ignore[attr-defined]
multiprocessing.process.BaseProcess.start = _guarded_start  # type: ignore[method-assign]


def _watch(item: pytest.Item) -> Iterator[None]:
    global _fast_test
    _fast_test = None if "slow" in item.keywords else item.nodeid
    try:
        yield
    finally:
        _fast_test = None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    yield from _watch(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    yield from _watch(item)
