"""The whole engine through the Triton kernels: the GPU path's wiring, checked without a GPU.

`KVPILOT_FORCE_TRITON=1` sends CPU tensors to the kernels (run by Triton's interpreter, see
tests/conftest.py): the KV write, paged attention over mixed batches, fused RMSNorm + residual,
rotary. Greedy tokens and logits must match the PyTorch reference path on
the real SmolLM2 weights. On a GPU the `gpu` tests run the same comparison with CUDA tensors,
CUDA graphs included, against the CPU engine.
"""

from __future__ import annotations

import functools

import pytest
import torch
from kvpilot_engine import LLM, SamplingParams
from kvpilot_engine.cuda_graph import DecodeGraphs

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "List three colours:"]
NEW_TOKENS = 6


def _greedy(llm, prompts: list[list[int]], n: int = NEW_TOKENS) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def reference(make_smollm2):
    llm = make_smollm2(max_model_len=256, num_kv_blocks=64)
    tok = llm.get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    return prompts, _greedy(llm, prompts), llm


@pytest.mark.slow
def test_greedy_through_kernels_matches_reference(make_smollm2, reference, monkeypatch):
    prompts, expected, _ = reference
    monkeypatch.setenv("KVPILOT_FORCE_TRITON", "1")
    # A 4-token chunk budget: the first steps are prefill chunks after cached tokens, later
    # ones mix decodes with another prompt's chunks, all through the one attention kernel.
    llm = make_smollm2(max_model_len=256, num_kv_blocks=64, max_num_batched_tokens=8)
    assert _greedy(llm, prompts) == expected
    llm.llm_engine.check_no_leaks()


@pytest.mark.slow
def test_logits_through_kernels_match_reference(make_smollm2, reference, monkeypatch):
    prompts, _, ref_llm = reference
    ids = prompts[0]
    want = ref_llm.llm_engine.score(ids)
    monkeypatch.setenv("KVPILOT_FORCE_TRITON", "1")
    llm = make_smollm2(max_model_len=256, num_kv_blocks=64)
    got = llm.llm_engine.score(ids)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=2e-3, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_linear_dispatches_to_kernel(method, monkeypatch):
    """The quantized layers take the Triton matmul when asked (the whole model would be minutes
    in the interpreter; tests/engine/test_triton_kernels.py covers the kernels themselves)."""
    from kvpilot_engine.kernels import quant_matmul
    from kvpilot_engine.quantization import Int4Linear, Int8Linear

    monkeypatch.setenv("KVPILOT_FORCE_TRITON", "1")
    torch.manual_seed(0)
    w, bias, x = torch.randn(96, 128), torch.randn(96), torch.randn(3, 128)
    layer = Int8Linear(w, bias) if method == "int8" else Int4Linear(w, bias, 64)
    assert layer.kernel in ("triton", "int8pack")
    calls = []
    real = getattr(quant_matmul, f"{method}_matmul")
    monkeypatch.setattr(quant_matmul, f"{method}_matmul", lambda *a: calls.append(1) or real(*a))
    want = torch.nn.functional.linear(x, layer.dequantize(), bias)
    assert torch.allclose(layer(x), want, atol=1e-4, rtol=1e-4)
    assert calls == [1]


@pytest.mark.gpu
@pytest.mark.parametrize("enforce_eager", [False, True])
def test_gpu_greedy_matches_cpu(make_smollm2, reference, enforce_eager):
    """SmolLM2 in float32 on the GPU (Triton kernels, CUDA graphs unless eager) gives the CPU
    path's greedy tokens, over more steps than the interpreter tests can afford."""
    prompts, _, cpu = reference
    want = _greedy(cpu, prompts, 32)
    gpu = make_smollm2(
        device="cuda", max_model_len=256, num_kv_blocks=64, enforce_eager=enforce_eager
    )
    assert (gpu.llm_engine.graph_capture_time is None) == enforce_eager
    assert _greedy(gpu, prompts, 32) == want
    gpu.llm_engine.check_no_leaks()


@pytest.mark.gpu
def test_gpu_bfloat16_greedy_mostly_matches_cpu(smollm2_checkpoint, reference):
    """bf16 rounds differently from the float32 oracle, so tokens may part after a while; the
    first ones must agree."""
    from kvpilot_engine import LLM
    from kvpilot_engine.config import EngineArgs
    from kvpilot_engine.llm_engine import LLMEngine

    prompts, expected, _ = reference
    args = EngineArgs(model="smollm2", dtype="bfloat16", device="cuda", max_model_len=256)
    llm = LLM.from_engine(LLMEngine(args, checkpoint=smollm2_checkpoint))
    got = _greedy(llm, prompts)
    assert all(g[:2] == e[:2] for g, e in zip(got, expected, strict=True)), (got, expected)


class EagerReplays(DecodeGraphs):
    """A stand-in for CUDA graph capture, which needs a GPU: each "replay" runs the same forward
    eagerly over the static buffers. Everything else is the real DecodeGraphs: padded batch
    sizes, buffer filling, padding rows (slot -1, length 0), the max_model_len-wide tables."""

    def capture(self) -> None:
        self.replays = {bs: functools.partial(self._counted, bs) for bs in self.sizes}
        self.calls: list[int] = []

    def _counted(self, bs: int) -> None:
        self.calls.append(bs)
        self._forward(bs)


@pytest.mark.slow
def test_decode_graph_buffers_match_eager_steps(monkeypatch):
    """Decode steps through DecodeGraphs' static buffers (5 sequences in the size-8 buffers,
    then fewer as they finish) give the eager path's tokens, on a random tiny Llama."""
    monkeypatch.setenv("KVPILOT_FORCE_TRITON", "1")
    prompts = [[7 + i] * n for i, n in enumerate((3, 17, 16, 33, 9))]
    lens = [6, 9, 4, 8, 7]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lens]

    def run(graphs: bool) -> tuple[list[list[int]], list[int]]:
        llm = LLM(model="random:tiny", max_model_len=64, num_kv_blocks=40, block_size=16)
        runner = llm.llm_engine.model_runner
        calls: list[int] = []
        if graphs:
            runner.graphs = EagerReplays(
                runner.model, runner.kv_caches, 8, 64, 16, runner.device, runner.dtype
            )
            runner.graphs.capture()
            calls = runner.graphs.calls
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        llm.llm_engine.check_no_leaks()
        return [o.outputs[0].token_ids for o in outs], calls

    eager, _ = run(graphs=False)
    replayed, calls = run(graphs=True)
    assert replayed == eager
    assert [len(t) for t in replayed] == lens
    # 5 running sequences used the size-8 buffers; the last one alone, size 1
    assert 8 in calls and calls[-1] == 1 and 4 in calls
