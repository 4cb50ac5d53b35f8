"""Scheduler: decides which tokens of which sequences go into the next forward pass.

One token budget per step is shared by everything: running sequences are served first (a decode
costs one token, an unfinished prefill continues with its next chunk), then waiting sequences are
admitted with as much of their prompt as the budget leaves. Prefill chunks and decodes therefore
share one forward pass. When the KV pool runs dry a running sequence is preempted: its blocks are
freed and it is recomputed later (its full blocks usually come back from the prefix cache).
Under the priority policy a waiting sequence that finds no sequence slot or no KV blocks also
preempts running sequences of a lower priority (a larger `priority` value), so an interactive
request does not wait behind batch work that is already running.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from kvpilot_engine.block_manager import BlockManager
from kvpilot_engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens of this sequence computed in this step
    # Drafts scored after them (a decode with speculation); their slots are allocated too.
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so its last logits are sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == len(self.seq)


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_tokens + len(s.spec_token_ids) for s in self.scheduled)

    @property
    def num_spec_tokens(self) -> int:
        return sum(len(s.spec_token_ids) for s in self.scheduled)

    @property
    def num_decode_tokens(self) -> int:
        # A decode computes the one token sampled last step; anything else (prompt chunks and
        # the recompute after a preemption) is prefill work.
        return sum(
            1
            for s in self.scheduled
            if s.num_tokens == 1
            and s.seq.num_output_tokens > 0
            and s.seq.num_computed_tokens == len(s.seq) - 1
        )

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_batched_tokens - self.num_decode_tokens - self.num_spec_tokens

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        policy: str = "fcfs",
        enable_chunked_prefill: bool = True,
        max_loras: int = 0,
        lora_ready: Callable[[int], bool] | None = None,
    ):
        """`max_loras`: how many distinct LoRA adapters may run at once (the device slots);
        `lora_ready(lora_key)`: whether an adapter's weights are loaded, so that a sequence on
        it can be admitted (one whose adapter is still loading waits, and is not failed)."""
        self.block_manager = block_manager
        self.max_loras = max_loras
        self.lora_ready = lora_ready
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []  # kept sorted by _waiting_key
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    # ---- queues ------------------------------------------------------------------------------
    def _waiting_key(self, seq: Sequence) -> tuple[int, float, int]:
        prio, arrival, seq_id = seq.sort_key()
        return (prio if self.policy == "priority" else 0, arrival, seq_id)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        # A preempted sequence keeps its arrival time, so it goes back ahead of later arrivals.
        bisect.insort(self.waiting, seq, key=self._waiting_key)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        bm = self.block_manager

        # 1. Running sequences, oldest (or most important) first. Under the priority policy the
        # list is kept in priority order, so the victims taken from its tail are the least
        # important and a low-priority sequence is never served ahead of a higher one.
        if self.policy == "priority":
            self.running.sort(key=lambda s: s.sort_key())
        idx = 0
        while idx < len(self.running) and budget > 0:
            seq = self.running[idx]
            num_new = min(seq.num_uncomputed_tokens, budget)
            # Drafts only follow a decode, and take what budget is left after it.
            spec = seq.spec_token_ids[: budget - 1] if seq.num_uncomputed_tokens == 1 else []
            scheduled = True
            while not bm.allocate_slots(seq, num_new + len(spec)):
                if spec:  # drafts are optional: drop them before preempting anyone
                    spec = []
                    continue
                victim = self._pick_victim()
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    scheduled = False
                    break
            if not scheduled:
                break
            out.scheduled.append(ScheduledSeq(seq, num_new, spec))
            budget -= num_new + len(spec)
            idx += 1

        # 2. Waiting sequences, unless this step already had to preempt: the pool is full.
        # A sequence whose LoRA adapter is not loaded, or would need an adapter slot when all
        # are taken by running sequences, is passed over (it keeps its place) for later ones.
        # Under the priority policy a sequence that finds no sequence slot or no KV blocks
        # preempts the running ones less important than itself (`_preempt_for`).
        active = {s.lora_key for s in self.running if s.lora_key}
        blocked: Sequence | None = None  # the first passed over for want of a slot
        full = bool(out.preempted)  # the running sequences alone outgrew the pool
        i = 0
        while (
            not full
            and i < len(self.waiting)
            and budget > 0
            # Under FCFS a full batch admits no one: do not scan the queue for LoRA sequences.
            and (len(self.running) < self.max_num_seqs or self.policy == "priority")
        ):
            seq = self.waiting[i]
            if seq in out.preempted:  # back in the queue this step: nothing after it outranks
                break
            if seq.lora_key:
                fits = self._lora_fits(seq, active, blocked)
                if fits is None:
                    blocked = blocked or seq
                if not fits:
                    i += 1
                    continue
            if len(self.running) >= self.max_num_seqs:
                freed = self._preempt_for(seq, out)
                if freed is None:
                    break
                budget += freed
            computed = bm.get_computed_blocks(seq)
            num_cached = len(computed) * bm.block_size
            num_new = len(seq) - num_cached
            # Without chunked prefill a prompt waits for a step with room for all of it; only a
            # preempted sequence longer than the whole budget is let in chunk by chunk (alone
            # at the head of a step), or it could never be recomputed.
            if not self.enable_chunked_prefill and num_new > budget and out.scheduled:
                break
            num_new = min(num_new, budget)
            if not bm.allocate_slots(seq, num_new, computed):
                freed = self._preempt_for(seq, out)
                if freed is None:
                    break
                budget += freed
                continue  # its cached prefix is looked up again: the victim's blocks are free
            bm.record_prefix_lookup(len(seq), num_cached)
            self.waiting.pop(i)
            if seq.lora_key:
                active.add(seq.lora_key)
                if blocked is not None:
                    blocked.lora_overtaken += 1
            seq.num_computed_tokens = num_cached
            seq.num_cached_tokens = num_cached
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return out

    def _lora_fits(self, seq: Sequence, active: set[int], blocked: Sequence | None) -> bool | None:
        """Whether a waiting sequence's adapter lets it in now: True; False (still loading, or
        must wait its turn); None (no slot free: it is blocked, and bounds who overtakes it).

        Sequences on adapters already running may go ahead of a blocked one, but only up to
        max_num_seqs times: then its adapter's turn comes, as the running ones drain."""
        if self.lora_ready is not None and not self.lora_ready(seq.lora_key):
            return False
        if seq.lora_key in active or len(active) < self.max_loras:
            return blocked is None or blocked.lora_overtaken < self.max_num_seqs
        return None

    def _pick_victim(self) -> Sequence:
        """The least important running sequence not yet scheduled in this step (maybe the one
        being scheduled): the tail, since `running` is in admission or priority order."""
        return self.running[-1]

    def _preempt_for(self, seq: Sequence, out: SchedulerOutput) -> int | None:
        """Under the priority policy, preempt the least important running sequence (the lowest
        priority, then the latest arrival, as vLLM's priority scheduling picks it) if `seq`
        outranks it, taking it out of this step if it was scheduled; the tokens of the budget
        that gives back, or None when nothing running is less important than `seq`. Equal
        priorities never preempt each other, so a preempted sequence resumes as soon as nothing
        more important waits; its output tokens are recomputed, not lost."""
        if self.policy != "priority" or not self.running:
            return None
        victim = max(self.running, key=lambda s: s.sort_key())
        if victim.priority <= seq.priority:
            return None
        freed = 0
        for k, scheduled in enumerate(out.scheduled):
            if scheduled.seq is victim:
                freed = scheduled.num_tokens + len(scheduled.spec_token_ids)
                del out.scheduled[k]
                break
        self._preempt(victim)  # back into the queue, behind `seq`
        out.preempted.append(victim)
        return freed

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.spec_token_ids = []
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.add(seq)

    # ---- after the forward pass --------------------------------------------------------------
    def update(self, out: SchedulerOutput) -> None:
        """Mark the scheduled tokens computed and offer newly full blocks to the prefix cache.

        The engine appends sampled tokens afterwards; their K/V are computed next step."""
        for s in out.scheduled:
            s.seq.num_computed_tokens += s.num_tokens
            self.block_manager.cache_full_blocks(s.seq)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        assert status.finished
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = status
        self.block_manager.free(seq)

    def abort(self, request_ids: set[str]) -> list[Sequence]:
        aborted = [s for s in self.running + self.waiting if s.request_id in request_ids]
        for seq in aborted:
            self.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return aborted
