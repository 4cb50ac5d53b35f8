"""Configuration: the model's shape (ModelConfig) and the engine's knobs (EngineArgs)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvpilot_engine.contracts import QUANTIZATIONS

if TYPE_CHECKING:  # torch is imported where used: the CLI's parsers (and the operator) need
    import torch  # these dataclasses without it


# Hugging Face `architectures` names -> the one model class that implements them all.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


class UnsupportedModelError(ValueError):
    """The checkpoint is readable but describes a model kvpilot cannot run."""


@dataclass
class RopeScaling:
    """Only the `llama3` scheme changes the frequencies; `default` leaves them alone."""

    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelConfig:
    """The shape of a Llama-family decoder. One class covers Llama, Mistral, Qwen2 and Qwen3:
    they differ only in qkv bias (Qwen2), per-head q/k RMSNorm (Qwen3) and head_dim."""

    architecture: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling = field(default_factory=RopeScaling)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = next(
            (SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None
        )
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or cfg.get('model_type')!r}; kvpilot runs "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        # transformers >= 5 folds rope_theta and rope_scaling into `rope_parameters`.
        rope_params = cfg.get("rope_parameters") or {}
        rope_scaling = cfg.get("rope_scaling") or rope_params or {}
        rope_theta = cfg.get("rope_theta", rope_params.get("rope_theta", 10000.0))
        rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise UnsupportedModelError(f"unsupported rope scaling type {rope_type!r}")
        scaling = RopeScaling(rope_type=rope_type)
        if rope_type == "llama3":
            scaling = RopeScaling(
                rope_type="llama3",
                factor=float(rope_scaling["factor"]),
                low_freq_factor=float(rope_scaling.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope_scaling.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    rope_scaling.get("original_max_position_embeddings", 8192)
                ),
            )
        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        sliding = cfg.get("sliding_window")
        if arch in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
            sliding = None
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=hidden,
            intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=arch == "qwen2" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch == "qwen3",
            sliding_window=sliding,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
        )


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
}


def parse_size(value: int | float | str) -> int:
    """Bytes from `4GiB`, `512MiB`, `2G` or a plain number."""
    if isinstance(value, (int, float)):
        return int(value)
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"cannot parse memory size {value!r} (examples: 2GiB, 512MiB, 1e9)")
    unit = (m.group(2) or "").lower().rstrip("b")
    return int(float(m.group(1)) * _UNITS[unit])


def resolve_dtype(
    dtype: str | torch.dtype, model_dtype: str | None, device: torch.device
) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "float": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "half": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype == "auto":
        # CPU matmuls are fastest and exact in float32; GPUs want the checkpoint's 16-bit type.
        if device.type == "cpu":
            return torch.float32
        return (
            names.get(str(model_dtype), torch.bfloat16)
            if model_dtype != "float32"
            else torch.bfloat16
        )
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32, float16 or bfloat16")
    return names[dtype]


@dataclass
class EngineArgs:
    """Everything `LLM(...)` and `kvpilot serve` accept besides the model. vLLM's names."""

    model: str = "smollm2"
    tokenizer: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    kv_cache_memory: int | str | None = None  # bytes for the KV pool; default by device
    # GPU: the share of the whole GPU this engine may use (weights, activations, KV pool).
    gpu_memory_utilization: float = 0.9
    # GPU: run decode steps eagerly instead of replaying CUDA graphs.
    enforce_eager: bool = False
    num_kv_blocks: int | None = None  # overrides kv_cache_memory (tests force tiny pools)
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    scheduling_policy: str = "fcfs"  # fcfs | priority
    seed: int = 0
    # Weight storage: none | int8 | int4 | fp8 | gguf (keep a GGUF file's Q8_0/Q4_0/Q4_1 grids).
    quantization: str = "none"
    # int4 groups (shrunk to divide a row if needed); None: the source's grid for an already
    # quantized checkpoint, else 128 (quantization.default_int4_group).
    quantization_group_size: int | None = None
    # Ranks (processes; one GPU each on CUDA) the model is sharded over.
    tensor_parallel_size: int = 1
    # Speculative decoding: {"method": "ngram" | "suffix" | "draft_model", ...} (a dict, a JSON
    # string or a SpeculativeConfig; parsed into the last), None for off.
    speculative_config: Any = None
    # LoRA adapters (PEFT), vLLM's names: max_loras adapters run in one step (device slots),
    # max_cpu_loras stay loaded on the host (LRU; None: max_loras), ranks up to max_lora_rank.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        from kvpilot_engine.spec_decode.config import SpeculativeConfig

        self.speculative_config = SpeculativeConfig.parse(self.speculative_config)
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be at least 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be at least 1")
        if self.scheduling_policy not in ("fcfs", "priority"):
            raise ValueError(
                f"scheduling_policy must be 'fcfs' or 'priority', got {self.scheduling_policy!r}"
            )
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}"
            )
        g = self.quantization_group_size
        if g is not None and (g < 2 or g & (g - 1)):
            raise ValueError(f"quantization_group_size must be a power of two >= 2, got {g}")
        if self.tensor_parallel_size < 1:
            raise ValueError(
                f"tensor_parallel_size must be at least 1, got {self.tensor_parallel_size}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError("num_kv_blocks must be at least 1")
        if self.max_loras < 1:
            raise ValueError(f"max_loras must be at least 1, got {self.max_loras}")
        if self.max_lora_rank < 1:
            raise ValueError(f"max_lora_rank must be at least 1, got {self.max_lora_rank}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be at least max_loras "
                f"({self.max_loras})"
            )
        if self.enable_lora and self.tensor_parallel_size > 1:
            raise ValueError(
                "LoRA adapters are not supported with tensor_parallel_size > 1 yet: serve "
                "adapters on single-rank engines (tensor_parallel_size=1)"
            )

    def resolve_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)
