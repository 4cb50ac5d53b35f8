"""Sequence: the scheduler's view of one generation stream (one of a request's `n`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING

from kvpilot_engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from kvpilot_engine.structured import Grammar


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = "length"  # max_tokens or the context length
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    index: int  # which of the request's n completions
    token_ids: list[int]  # prompt followed by the generated tokens
    num_prompt_tokens: int
    sampling_params: SamplingParams
    priority: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    status: SequenceStatus = SequenceStatus.WAITING
    # Tokens whose K/V are in the cache. Everything past it is computed in later steps; a
    # prefill can take several steps (chunked), a decode takes one.
    num_computed_tokens: int = 0
    # Prefix-cache hits at the last admission, part of num_computed_tokens.
    num_cached_tokens: int = 0
    block_table: list[int] = field(default_factory=list)
    # Hash of each full block of token_ids, chained: block i's hash covers tokens [0, (i+1)*bs).
    block_hashes: list[int] = field(default_factory=list)
    # Leading blocks of block_table already offered to the prefix cache.
    num_registered_blocks: int = 0
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    # Where the sequence is in its structured-output grammar (None: unconstrained).
    grammar: Grammar | None = None
    # Drafts to verify in the coming step (speculative decoding): not in token_ids, which holds
    # only accepted tokens, so the block hashes and the detokenizer never see a rejected one.
    spec_token_ids: list[int] = field(default_factory=list)
    # The engine's key for its LoRA adapter (lora/manager.py; 0: the base model). The key
    # starts every block hash, so sequences on different adapters (or one on an adapter and one
    # on the base) never share K/V.
    lora_key: int = 0
    # Admissions that went ahead of it while it waited for a LoRA slot (the scheduler bounds it).
    lora_overtaken: int = 0

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    def sort_key(self) -> tuple[int, float, int]:
        """Lower is served first; the priority policy compares it, FCFS ignores `priority`."""
        return (self.priority, self.arrival_time, self.seq_id)
