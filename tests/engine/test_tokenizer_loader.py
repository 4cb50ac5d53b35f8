"""The GGUF tokenizer against transformers', incremental detokenization, and loader errors."""

from __future__ import annotations

import json
import os

import pytest
from kvpilot_engine.config import EngineArgs, UnsupportedModelError
from kvpilot_engine.llm_engine import InvalidRequestError
from kvpilot_engine.loader import load_checkpoint, resolve_model_path
from kvpilot_engine.tokenizer import IncrementalDetokenizer

TEXTS = [
    "Hello, world!",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "<|im_start|>user\nHi there<|im_end|>\n",
    "Unicode: café, naïve, 東京, Привет, emoji 🎉🚀 and ümlauts.",
    "def f(x):\n    return x ** two  # comment",
]


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        os.path.dirname(smollm2_path), gguf_file=os.path.basename(smollm2_path)
    )


@pytest.mark.slow
def test_gguf_tokenizer_matches_transformers(smollm2_checkpoint, hf_tokenizer):
    tok = smollm2_checkpoint.tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == hf_tokenizer(text)["input_ids"], text
        assert tok.decode(ids, skip_special_tokens=False) == text


def test_digits_split_individually_like_llama_cpp(smollm2_checkpoint):
    # llama.cpp's "smollm" pre-tokenizer (and SmolLM2's own tokenizer.json) splits digits.
    tok = smollm2_checkpoint.tokenizer
    ids = tok.encode("2024")
    assert [tok.decode([i]) for i in ids] == ["2", "0", "2", "4"]


def test_chat_template_from_gguf(smollm2_checkpoint):
    tok = smollm2_checkpoint.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_incremental_detokenizer_never_splits_characters(smollm2_checkpoint):
    tok = smollm2_checkpoint.tokenizer
    text = "東京 🎉🚀 naïve — ok"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # multi-byte characters span several tokens
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text
    assert "" in deltas  # some token completed no character on its own


def test_bundled_model_resolves():
    path = resolve_model_path("smollm2")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == path


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither a local path nor a bundled model"):
        load_checkpoint("no-such-model")
    with pytest.raises(FileNotFoundError, match="no config\\.json"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModelError, match="unsupported architecture"):
        load_checkpoint(str(tmp_path))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "vocab_size": 10,
                "hidden_size": 8,
                "intermediate_size": 16,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            }
        )
    )
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_checkpoint(str(tmp_path))
    bogus = tmp_path / "weights.bin"
    bogus.write_bytes(b"not a model")
    with pytest.raises(UnsupportedModelError, match=r"not a \.gguf"):
        load_checkpoint(str(bogus))
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"GGUF garbage")
    with pytest.raises(UnsupportedModelError, match="not a readable GGUF"):
        load_checkpoint(str(bad_gguf))


def test_engine_args_validation():
    with pytest.raises(ValueError, match="block_size"):
        EngineArgs(block_size=12)
    with pytest.raises(ValueError, match="scheduling_policy"):
        EngineArgs(scheduling_policy="lifo")


@pytest.mark.slow
def test_request_validation(make_smollm2):
    llm = make_smollm2(max_model_len=64)
    engine = llm.llm_engine
    with pytest.raises(InvalidRequestError, match="maximum context length") as e:
        engine.add_request("long", list(range(100, 200)), None)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidRequestError, match="max_tokens") as e:
        from kvpilot_engine import SamplingParams

        engine.add_request("mt", [100, 101], SamplingParams(max_tokens=63))
    assert e.value.param == "max_tokens"
    with pytest.raises(InvalidRequestError, match="out of range"):
        engine.add_request("oov", [10**9], None)
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request("empty", [], None)
    with pytest.raises(ValueError, match="fewer than max_model_len"):
        make_smollm2(num_kv_blocks=2, block_size=16, max_model_len=64)
    engine.check_no_leaks()


@pytest.mark.slow
def test_export_gguf_as_hf_folder(tmp_path, smollm2_checkpoint, hf_tokenizer, hf_smollm2):
    """The exported folder loads in transformers (no GGUF involved) and in kvpilot, and both
    compute the logits of the GGUF model."""
    import torch
    from kvpilot_engine.export import export_hf
    from kvpilot_engine.loader import load_checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_hf("smollm2", tmp_path / "smollm2-hf")
    ids = smollm2_checkpoint.tokenizer.encode("The exported model says")
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.inference_mode():
        exported_logits = ref(torch.tensor([ids])).logits[0]
    gguf_weights = dict(smollm2_checkpoint.weights())
    hf_weights = dict(load_checkpoint(str(out)).weights())
    assert set(hf_weights) == set(gguf_weights) - {"lm_head.weight"}
    for name, w in hf_weights.items():
        assert torch.equal(w, gguf_weights[name]), name
    with torch.inference_mode():
        gguf_logits = hf_smollm2(torch.tensor([ids])).logits[0]
    assert torch.allclose(exported_logits, gguf_logits, atol=1e-4)
    assert (
        AutoTokenizer.from_pretrained(out)("Hi there")["input_ids"]
        == hf_tokenizer("Hi there")["input_ids"]
    )
    assert (
        load_checkpoint(str(out)).tokenizer.chat_template
        == smollm2_checkpoint.tokenizer.chat_template
    )
