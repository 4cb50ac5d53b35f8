"""Speculative decoding: propose tokens cheaply, verify them in the engine's normal step.

    config.py       SpeculativeConfig, `speculative_config=` / `--speculative-config`
    ngram.py        prompt lookup over the sequence's own tokens
    suffix.py       an n-gram index over the prompt, this output and recent requests' outputs
    draft_model.py  a smaller model of the same tokenizer, greedy, with its own paged KV pool
    adaptive.py     how many drafts a step verifies: a cost model and acceptance (pure)
    verify.py       which drafts the target's samples accept (exact rejection sampling)
    speculator.py   the engine's hooks between steps, and the spec_decode counters

The scheduler budgets a sequence's drafts (`Sequence.spec_token_ids`) with its decode token, the
model runner scores both in one forward pass among the other sequences' decodes and prefill
chunks, and the engine counts the accepted drafts' K/V as computed and frees the slots of the
rejected ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kvpilot_engine.spec_decode.config import SpeculativeConfig
from kvpilot_engine.spec_decode.speculator import Proposer, SpecDecodeStats, Speculator

if TYPE_CHECKING:
    from kvpilot_engine.config import EngineArgs
    from kvpilot_engine.llm_engine import LLMEngine

__all__ = ["SpecDecodeStats", "SpeculativeConfig", "Speculator", "make_speculator"]


def make_speculator(args: EngineArgs, engine: LLMEngine) -> Speculator | None:
    config: SpeculativeConfig | None = args.speculative_config
    if config is None:
        return None
    if config.method == "ngram":
        from kvpilot_engine.spec_decode.speculator import NgramSpeculation

        proposer: Proposer = NgramSpeculation(config)
    elif config.method == "suffix":
        from kvpilot_engine.spec_decode.suffix import SuffixSpeculation

        proposer = SuffixSpeculation(config)
    else:
        from kvpilot_engine.spec_decode.draft_model import DraftModelSpeculation

        proposer = DraftModelSpeculation(config, args, engine)
    return Speculator(config, proposer, engine.max_model_len)
