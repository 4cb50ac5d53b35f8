"""LoRA's parts without a model: the adapter loader's checks, the slots' layout, the grouped
PyTorch path and the Triton kernels (in the interpreter on CPU) against a per-token reference,
and the scheduler's admission by adapter slots. Fast: tiny shapes, no SmolLM2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from kvpilot_engine.block_manager import BlockManager
from kvpilot_engine.config import ModelConfig
from kvpilot_engine.lora import LoRAError, LoRARequest
from kvpilot_engine.lora.adapter import TARGET_MODULES, load_adapter, module_shape
from kvpilot_engine.lora.layers import GROUPS, LoRABanks, LoRAStep, lora_delta_reference
from kvpilot_engine.sampling_params import SamplingParams
from kvpilot_engine.scheduler import Scheduler
from kvpilot_engine.sequence import Sequence

CFG = ModelConfig(
    architecture="llama",
    vocab_size=100,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=128,
)


def write_adapter(
    path: Path,
    r: int = 4,
    alpha: float = 8,
    targets=TARGET_MODULES,
    rslora: bool = False,
    config: ModelConfig = CFG,
    seed: int = 0,
) -> Path:
    """A PEFT-format adapter written by hand (peft's own files are in test_lora.py)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for m in targets:
            d_in, d_out = module_shape(config, m)
            sub = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{sub}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, d_in, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(d_out, r, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": rslora}
    cfg["target_modules"] = list(targets)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    return path


# ---- the loader ---------------------------------------------------------------------------------
def test_load_adapter_folds_the_scaling(tmp_path):
    from safetensors.torch import load_file

    path = write_adapter(tmp_path / "a", r=4, alpha=8, targets=["q_proj", "down_proj"])
    ad = load_adapter(LoRARequest("a", 1, str(path)), CFG, max_lora_rank=8)
    assert ad.rank == 4 and ad.scaling == 2.0
    assert ad.target_modules == {"q_proj", "down_proj"}
    raw = load_file(str(path / "adapter_model.safetensors"))
    a, b = ad.weights[(1, "down_proj")]
    key = "base_model.model.model.layers.1.mlp.down_proj"
    torch.testing.assert_close(a, raw[f"{key}.lora_A.weight"])
    torch.testing.assert_close(b, raw[f"{key}.lora_B.weight"] * 2.0)
    rs = load_adapter(
        LoRARequest("rs", 2, str(write_adapter(tmp_path / "rs", r=4, alpha=8, rslora=True))),
        CFG,
        8,
    )
    assert rs.scaling == pytest.approx(8 / math.sqrt(4))


def _reason(tmp_path: Path, path: Path, max_rank: int = 8, config: ModelConfig = CFG) -> str:
    with pytest.raises(LoRAError) as e:
        load_adapter(LoRARequest("x", 1, str(path)), config, max_rank)
    return e.value.reason


def test_load_adapter_reasons(tmp_path):
    assert _reason(tmp_path, tmp_path / "nothing") == "NotFound"
    assert _reason(tmp_path, write_adapter(tmp_path / "big", r=16)) == "RankTooLarge"
    # made for another model: a larger hidden size
    other = ModelConfig(**{**CFG.__dict__, "hidden_size": 64})
    assert _reason(tmp_path, write_adapter(tmp_path / "other", config=other)) == (
        "BaseModelMismatch"
    )
    deeper = ModelConfig(**{**CFG.__dict__, "num_hidden_layers": 3})
    assert _reason(tmp_path, write_adapter(tmp_path / "deep", config=deeper)) == (
        "BaseModelMismatch"
    )
    corrupt = write_adapter(tmp_path / "corrupt")
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    assert _reason(tmp_path, corrupt) == "Corrupt"
    (corrupt / "adapter_config.json").write_text("{not json")
    assert _reason(tmp_path, corrupt) == "Corrupt"
    (corrupt / "adapter_config.json").unlink()
    assert _reason(tmp_path, corrupt) == "MissingConfig"
    dora = write_adapter(tmp_path / "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    assert _reason(tmp_path, dora) == "UnsupportedModule"
    # an lm_head adapter
    from safetensors.torch import save_file

    head = write_adapter(tmp_path / "head")
    save_file(
        {
            "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 32),
            "base_model.model.lm_head.lora_B.weight": torch.zeros(100, 4),
        },
        str(head / "adapter_model.safetensors"),
    )
    assert _reason(tmp_path, head) == "UnsupportedModule"


# ---- the banks and the grouped path -----------------------------------------------------------
def _naive(adapters, token_slots, layer, group, x):
    """Per token, per projection: x @ A^T @ B^T into the projection's output columns."""
    outs = [module_shape(CFG, m)[1] for m in GROUPS[group]]
    delta = torch.zeros(x.shape[0], sum(outs), dtype=torch.float64)
    for t, s in enumerate(token_slots):
        if s < 0:
            continue
        off = 0
        for m, size in zip(GROUPS[group], outs, strict=True):
            w = adapters[s].weights.get((layer, m))
            if w is not None:
                a, b = w
                delta[t, off : off + size] = x[t].double() @ a.double().T @ b.double().T
            off += size
    return delta


@pytest.fixture(scope="module")
def banks_and_adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    specs = [(4, TARGET_MODULES), (2, ["q_proj", "v_proj"]), (3, ["gate_proj", "down_proj"])]
    adapters = [
        load_adapter(
            LoRARequest(f"a{i}", i + 1, str(write_adapter(root / f"a{i}", r, 8, t, seed=i))),
            CFG,
            4,
        )
        for i, (r, t) in enumerate(specs)
    ]
    banks = LoRABanks(CFG, max_loras=3, max_rank=4, device=torch.device("cpu"), dtype=torch.float32)
    for slot, ad in enumerate(adapters):
        banks.load(slot, ad)
    return banks, adapters


# One slot on every token; one slot among base tokens; several (packed into a bmm); several
# with one long run (a prefill next to decodes: one matmul pair per slot).
SLOT_CASES = {
    "one-slot-all": [0] * 5,
    "one-slot-some": [-1, 1, 1, -1, 1],
    "mixed-padded": [0, 1, 2, -1, 2, 1, 0, 2],
    "mixed-padded-subset": [2, 0, 2, -1, 0],  # slot 1 unused: the bmm gathers slots 0 and 2
    "mixed-segments": [2] * 12 + [0, 1, -1],
}


@pytest.mark.parametrize("case", list(SLOT_CASES))
@pytest.mark.parametrize("group", list(GROUPS))
def test_grouped_path_matches_per_token(banks_and_adapters, case, group):
    banks, adapters = banks_and_adapters
    token_slots = SLOT_CASES[case]
    step = LoRAStep.build(banks, token_slots)
    assert step is not None
    if case == "mixed-padded":
        assert step.padded
    if case == "mixed-padded-subset":
        assert step.padded and step.slot_idx is not None
    if case == "mixed-segments":
        assert not step.padded
    d_in = banks.a[group].shape[2]
    x = torch.randn(len(token_slots), d_in, generator=torch.Generator().manual_seed(1))
    base = torch.randn(len(token_slots), banks.b[group].shape[3])
    for layer in range(CFG.num_hidden_layers):
        out = base.clone()
        step.apply(layer, group, x, out)
        want = base.double() + _naive(adapters, token_slots, layer, group, x)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-4)


def test_slots_clear_and_skip(banks_and_adapters):
    banks, adapters = banks_and_adapters
    assert LoRAStep.build(banks, [-1, -1]) is None  # base only: nothing runs
    step = LoRAStep.build(banks, [1, -1])
    assert step is not None and step.groups == {"qkv"}  # the q/v adapter touches nothing else
    banks.clear(1)
    assert LoRAStep.build(banks, [1]) is None
    assert banks.a["qkv"][:, 1].abs().sum() == 0
    banks.load(1, adapters[1])


# ---- the Triton kernels (Triton's interpreter on CPU) -------------------------------------------
# Every slot pattern in float32, float16 on the mixed ones (the interpreter runs each program in
# Python: a few seconds a case).
TRITON_CASES = [(c, g, torch.float32) for c in SLOT_CASES for g in ("qkv", "down")] + [
    ("mixed-padded", "qkv", torch.float16),
    ("mixed-segments", "down", torch.float16),
]


@pytest.mark.parametrize(("case", "group", "dtype"), TRITON_CASES)
def test_triton_kernels_match_reference(banks_and_adapters, case, group, dtype):
    from kvpilot_engine.kernels import lora as kernels

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and type(kernels._sgmv_kernel).__name__ != "InterpretedFunction":
        pytest.skip("Triton was imported before TRITON_INTERPRET=1 (see tests/conftest.py)")
    banks, _ = banks_and_adapters
    token_slots = SLOT_CASES[case]
    ref_step = LoRAStep.build(banks, token_slots)
    assert ref_step is not None
    a = banks.a[group][1].to(device, dtype)
    b = banks.b[group][1].to(device, dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(len(token_slots), a.shape[1], generator=g).to(device, dtype)
    base = torch.randn(len(token_slots), b.shape[2], generator=g).to(device, dtype)
    want = base.float().clone()
    lora_delta_reference(ref_step, a.float().cpu(), b.float().cpu(), x.float().cpu(), want)
    tol = {torch.float32: 1e-4, torch.float16: 5e-3}[dtype]
    scale = want.abs().max().item()

    tri = LoRAStep.build(banks, token_slots, triton=True)
    assert tri is not None and tri.seg_starts is not None
    out = base.clone()
    kernels.sgmv(
        x, a, b, tri.rows.to(device), tri.seg_starts.to(device), tri.seg_lens.to(device),
        tri.seg_slots.to(device), max(tri.counts), out,
    )  # fmt: skip
    assert (out.float().cpu() - want).abs().max().item() <= tol * scale, "sgmv"
    out = base.clone()
    kernels.bgmv(x, a, b, tri.token_slots.to(device), out)
    assert (out.float().cpu() - want).abs().max().item() <= tol * scale, "bgmv"
    # base-model rows are untouched, bit for bit
    base_rows = [t for t, s in enumerate(token_slots) if s < 0]
    assert torch.equal(out[base_rows], base[base_rows])


# ---- admission by adapter slots ---------------------------------------------------------------
def _seq(i: int, key: int, n: int = 4) -> Sequence:
    return Sequence(
        seq_id=i,
        request_id=str(i),
        index=0,
        token_ids=list(range(1, n + 1)),
        num_prompt_tokens=n,
        sampling_params=SamplingParams(),
        arrival_time=float(i),
        lora_key=key,
    )


def _scheduler(max_loras: int, ready=lambda key: True, max_num_seqs: int = 8) -> Scheduler:
    return Scheduler(
        BlockManager(64, 4),
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=256,
        max_loras=max_loras,
        lora_ready=ready,
    )


def test_scheduler_runs_at_most_max_loras_adapters():
    s = _scheduler(max_loras=2)
    for i, key in enumerate([1, 2, 3, 0, 1, 3]):
        s.add(_seq(i, key))
    out = s.schedule()
    # adapters 1 and 2 take the slots; 3 waits (not failed); base and a second 1 go ahead
    assert [x.seq.seq_id for x in out.scheduled] == [0, 1, 3, 4]
    assert [q.seq_id for q in s.waiting] == [2, 5]
    s.update(out)
    for x in list(s.running):
        if x.lora_key == 2:
            s.finish(x, x.status.__class__.FINISHED_STOPPED)
    out = s.schedule()
    assert [x.seq.seq_id for x in out.scheduled if x.seq.lora_key == 3] == [2, 5]
    assert len({x.lora_key for x in s.running if x.lora_key}) == 2


def test_scheduler_waits_for_loading_and_bounds_overtaking():
    loaded = {1}
    s = _scheduler(max_loras=1, ready=lambda key: key in loaded, max_num_seqs=2)
    s.add(_seq(0, 2))  # still loading: waits, and does not block others
    s.add(_seq(1, 1))
    out = s.schedule()
    assert [x.seq.seq_id for x in out.scheduled] == [1]
    loaded.add(2)
    # Adapter 2 is loaded, but 1 holds the only slot: 2 is blocked. Later 1s may overtake it,
    # only max_num_seqs times.
    for i in range(2, 8):
        s.add(_seq(i, 1))
    admitted = []
    for _ in range(6):
        s.update(out)
        for x in list(s.running):
            s.finish(x, x.status.__class__.FINISHED_STOPPED)
        out = s.schedule()
        admitted.append([x.seq.seq_id for x in out.scheduled])
        if 0 in admitted[-1]:
            break
    assert s.waiting[0].seq_id != 0 or 0 in admitted[-1]
    assert 0 in admitted[-1]  # its turn came
    assert sum(len(a) for a in admitted[:-1]) <= 2  # after at most max_num_seqs overtakers


def test_scheduler_does_not_scan_the_queue_when_the_batch_is_full():
    asked = []
    s = _scheduler(max_loras=1, ready=lambda key: asked.append(key) or True, max_num_seqs=1)
    s.add(_seq(0, 1))
    s.schedule()
    for i in range(1, 5):
        s.add(_seq(i, 2))  # blocked: adapter 1 holds the only slot, and the batch is full
    asked.clear()
    out = s.schedule()
    assert all(x.seq.seq_id == 0 for x in out.scheduled)
    assert [q.seq_id for q in s.waiting] == [1, 2, 3, 4]
    assert asked == []  # under FCFS a full batch admits no one: the queue is not walked


def test_block_hashes_differ_per_adapter():
    bm = BlockManager(16, 4)
    a, b, base = _seq(0, 1, 9), _seq(1, 2, 9), _seq(2, 0, 9)
    for s in (a, b, base):
        bm.get_computed_blocks(s)
    assert len({s.block_hashes[0] for s in (a, b, base)}) == 3
    # and a computed block of adapter 1 is not found for adapter 2
    assert bm.allocate_slots(a, 9)
    a.num_computed_tokens = 9
    bm.cache_full_blocks(a)
    assert bm.get_computed_blocks(_seq(3, 1, 9)) == a.block_table[:2]
    assert bm.get_computed_blocks(b) == []
