"""StepInput: one step's inputs as plain lists, the form in which a step crosses every boundary.

Its own module because three parties read it and none should import the others for it: the
ModelRunner builds it on rank 0 from the SchedulerOutput and runs it, the other tensor-parallel
ranks receive it over a pipe (plain lists pickle cheaply) and build their own tensors from it, and
the decode CUDA graphs copy it into their static buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepInput:
    input_ids: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_start_loc: list[int] = field(default_factory=lambda: [0])
    context_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    decode_seqs: list[int] = field(default_factory=list)
    prefill_seqs: list[int] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # last token of each finished chunk
    all_rows: bool = False
    # Each scheduled sequence's LoRA slot (-1: the base model); empty when no adapter runs.
    lora_slots: list[int] = field(default_factory=list)
