"""CPU linear layers on oneDNN-prepacked weights (cpu_linear.py) against plain F.linear: the layer
on its own for many row counts, weights changed after packing, a tied head, and the engine's
logits and greedy tokens with packing on and off (KVPILOT_CPU_PREPACK=0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kvpilot_engine import LLM, SamplingParams
from kvpilot_engine.cpu_linear import PackedLinear, prepack_linears, repack_changed
from torch import nn

pytestmark = pytest.mark.skipif(
    not torch.backends.mkldnn.is_available(), reason="this torch build has no oneDNN"
)

CPU = torch.device("cpu")
PROMPT = [5, 6, 7, 8, 9, 10, 11, 12, 13]


def _packed(linear: nn.Linear) -> PackedLinear:
    holder = nn.Sequential(linear)
    prepack_linears(holder, CPU, linear.weight.dtype)
    assert isinstance(holder[0], PackedLinear)
    return holder[0]


# Decode and verify steps run 1..64 rows; odd counts and one past a power of two catch tails.
@pytest.mark.parametrize("rows", [1, 3, 7, 16, 33, 64, 65])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_matches_f_linear(rows: int, dtype: torch.dtype, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(576, 1536, bias=bias, dtype=dtype)
    x = torch.randn(rows, 576, dtype=dtype)
    want = F.linear(x, linear.weight, linear.bias).float()
    with torch.inference_mode():
        got = _packed(linear)(x)
    assert got.dtype == dtype and got.shape == (rows, 1536)
    # float32: only the order of the sums differs. bfloat16: both round the float32 sum.
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (got.float() - want).abs().max().item() <= tol * want.abs().max().item()


def test_leading_dims_and_a_strided_input() -> None:
    linear = nn.Linear(64, 32)
    layer = _packed(linear)  # the same parameters; `linear` itself still runs F.linear
    x = torch.randn(64, 6).t()  # not contiguous
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 3, 64)
    torch.testing.assert_close(layer(x3), linear(x3), rtol=1e-5, atol=1e-5)


def test_an_in_place_change_of_the_weight_is_packed_again() -> None:
    """What bench throughput --lora's merge does: add to a slice of a fused weight."""
    torch.manual_seed(0)
    layer = _packed(nn.Linear(64, 96, bias=False))
    x = torch.randn(4, 64)
    before = layer(x)
    with torch.no_grad():
        layer.weight[32:64].add_(torch.randn(32, 64))
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))
    assert not torch.allclose(layer(x), before)
    with torch.no_grad():
        layer.weight.mul_(2.0)
    repack_changed(layer)  # packed now, not in the next call
    assert layer._packed_version == layer.weight._version
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight))


def test_a_tied_head_stays_tied_to_the_embedding() -> None:
    torch.manual_seed(0)
    model = nn.Module()
    model.embed = nn.Embedding(1000, 64)
    model.head = nn.Linear(64, 1000, bias=False)
    model.head.weight = model.embed.weight
    prepack_linears(model, CPU, torch.float32)
    assert isinstance(model.head, PackedLinear)
    assert model.head.weight is model.embed.weight
    with torch.no_grad():
        model.embed.weight[7].fill_(0.5)
    hidden = model.embed(torch.tensor([7, 3]))
    assert torch.equal(hidden[0], torch.full((64,), 0.5))  # the lookup reads the parameter
    torch.testing.assert_close(model.head(hidden), hidden @ model.embed.weight.t())


def test_what_is_left_on_f_linear() -> None:
    layer = nn.Linear(16, 8)
    for device, dtype in [(CPU, torch.float16), (torch.device("cuda"), torch.float32)]:
        holder = nn.Sequential(layer.to(dtype))
        assert prepack_linears(holder, device, dtype) == 0
        assert type(holder[0]) is nn.Linear
    with torch.inference_mode():  # inference tensors have no version to follow: left plain
        holder = nn.Sequential(nn.Linear(16, 8))
    assert prepack_linears(holder, CPU, torch.float32) == 0
    assert type(holder[0]) is nn.Linear


def _tiny(dtype: str) -> LLM:
    return LLM(model="random:tiny", dtype=dtype, max_model_len=128, num_kv_blocks=32)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_logits_and_greedy_tokens_with_packing_on_and_off(
    dtype: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    runs = {}
    for setting in ("1", "0"):
        monkeypatch.setenv("KVPILOT_CPU_PREPACK", setting)
        llm = _tiny(dtype)
        engine = llm.llm_engine
        packed = [m for m in engine.model.modules() if isinstance(m, PackedLinear)]
        plain = [m for m in engine.model.modules() if type(m) is nn.Linear]
        # Two decoder layers of four linear layers each, and lm_head.
        assert (len(packed), len(plain)) == ((9, 0) if setting == "1" else (0, 9))
        out = llm.generate({"prompt_token_ids": PROMPT}, params, use_tqdm=False)[0]
        runs[setting] = (engine.score(PROMPT), out.outputs[0].token_ids)
    (on, greedy_on), (off, greedy_off) = runs["1"], runs["0"]
    scale = off.abs().max().item()
    tol = 1e-5 if dtype == "float32" else 2e-2
    assert (on - off).abs().max().item() <= tol * scale
    assert greedy_on == greedy_off


def test_quantized_layers_are_not_packed() -> None:
    llm = LLM(model="random:tiny", quantization="int8", max_model_len=128, num_kv_blocks=32)
    assert not any(isinstance(m, PackedLinear) for m in llm.llm_engine.model.modules())
