"""Scheduler: token budget, chunked prefill mixed with decodes, admission order, preemption by
recompute (FCFS and priority, including waiting requests that preempt less important running
ones), aborts, and a simulated engine loop over random workloads.

Pure Python: no model and no torch. `engine_step` plays the engine: schedule, mark the scheduled
tokens computed, sample one token for every sequence whose chunk reached its end, and finish a
sequence after its N-th output token.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from kvpilot_engine.block_manager import BlockManager
from kvpilot_engine.sampling_params import SamplingParams
from kvpilot_engine.scheduler import Scheduler, SchedulerOutput
from kvpilot_engine.sequence import Sequence, SequenceStatus

_ids = itertools.count()


def make_seq(tokens, *, priority: int = 0, max_tokens: int = 4, request_id: str | None = None):
    sid = next(_ids)
    ids = list(range(1000 * sid, 1000 * sid + tokens)) if isinstance(tokens, int) else list(tokens)
    return Sequence(
        seq_id=sid,
        request_id=request_id or f"req-{sid}",
        index=0,
        token_ids=ids,
        num_prompt_tokens=len(ids),
        sampling_params=SamplingParams(max_tokens=max_tokens),
        priority=priority,
        arrival_time=float(sid),  # strictly increasing: arrival order is creation order
    )


def make_scheduler(
    num_blocks: int,
    block_size: int,
    *,
    max_num_seqs: int = 8,
    max_num_batched_tokens: int = 64,
    policy: str = "fcfs",
    chunked: bool = True,
    prefix_caching: bool = True,
) -> Scheduler:
    bm = BlockManager(num_blocks, block_size, prefix_caching)
    return Scheduler(bm, max_num_seqs, max_num_batched_tokens, policy, chunked)


def finish_step(
    sched: Scheduler, out: SchedulerOutput, next_token: Callable[[Sequence], int]
) -> None:
    """The model's half of an iteration: sample for sequences whose prompt is all computed;
    each one finishes after sampling_params.max_tokens tokens."""
    samples = [s.samples for s in out.scheduled]
    sched.update(out)
    for s, sampled in zip(out.scheduled, samples, strict=True):
        seq = s.seq
        assert sampled == (seq.num_computed_tokens == len(seq))
        if seq.num_computed_tokens == len(seq):
            seq.token_ids.append(next_token(seq))
            if seq.num_output_tokens >= seq.sampling_params.max_tokens:
                sched.finish(seq, SequenceStatus.FINISHED_LENGTH)


def engine_step(sched: Scheduler, token: int | None = None) -> SchedulerOutput:
    """One engine iteration."""
    out = sched.schedule()
    finish_step(sched, out, lambda seq: token if token is not None else seq.seq_id % 3)
    return out


def live(sched: Scheduler) -> list[Sequence]:
    return sched.running + sched.waiting


def chunks(out: SchedulerOutput) -> list[tuple[Sequence, int]]:
    return [(s.seq, s.num_tokens) for s in out.scheduled]


# ---- budget, chunking, mixing ----------------------------------------------------------------
def test_long_prompt_is_chunked_across_steps():
    sched = make_scheduler(16, 4, max_num_batched_tokens=4)
    seq = make_seq(10, max_tokens=2)
    sched.add(seq)
    seen = []
    for _ in range(4):
        out = sched.schedule()
        seen.append([(s.num_tokens, s.samples) for s in out.scheduled])
        sched.update(out)
        if seq.num_computed_tokens == len(seq):
            seq.token_ids.append(7)
    assert seen == [[(4, False)], [(4, False)], [(2, True)], [(1, True)]]
    assert seq.num_computed_tokens == 11
    assert len(seq.block_table) == 3


def test_decodes_and_a_prefill_chunk_share_one_step():
    sched = make_scheduler(32, 4, max_num_batched_tokens=8)
    a = make_seq(3, max_tokens=10)
    sched.add(a)
    assert chunks(engine_step(sched)) == [(a, 3)]
    b = make_seq(20, max_tokens=10)
    sched.add(b)
    out = engine_step(sched)
    # The running decode first, then as much of the new prompt as the budget leaves.
    assert chunks(out) == [(a, 1), (b, 7)]
    assert (out.num_decode_tokens, out.num_prefill_tokens) == (1, 7)
    assert chunks(engine_step(sched)) == [(a, 1), (b, 7)]
    out = engine_step(sched)
    assert chunks(out) == [(a, 1), (b, 6)]
    assert out.scheduled[1].seq.num_output_tokens == 1  # b sampled at the end of its prompt
    assert chunks(engine_step(sched)) == [(a, 1), (b, 1)]


def test_running_sequences_are_served_before_waiting_ones():
    sched = make_scheduler(32, 4, max_num_batched_tokens=2)
    a, b = make_seq(1, max_tokens=5), make_seq(1, max_tokens=5)
    sched.add(a)
    sched.add(b)
    assert chunks(engine_step(sched)) == [(a, 1), (b, 1)]
    c = make_seq(1, max_tokens=5)
    sched.add(c)
    # The two decodes take the whole budget: the earlier-arrived-but-waiting c gets nothing.
    for _ in range(3):
        out = engine_step(sched)
        assert chunks(out) == [(a, 1), (b, 1)]
        assert c in sched.waiting
    assert sched.running == [a, b]


def test_max_num_seqs_caps_running():
    sched = make_scheduler(32, 4, max_num_seqs=2)
    seqs = [make_seq(3, max_tokens=2) for _ in range(3)]
    for s in seqs:
        sched.add(s)
    out = engine_step(sched)
    assert [s for s, _ in chunks(out)] == seqs[:2]
    assert sched.waiting == [seqs[2]]
    out = engine_step(sched)  # both finish after their second token
    assert [s for s, _ in chunks(out)] == seqs[:2]
    assert sched.running == []
    out = engine_step(sched)
    assert chunks(out) == [(seqs[2], 3)]


def test_without_chunked_prefill_a_prompt_waits_for_a_whole_budget():
    sched = make_scheduler(32, 4, max_num_batched_tokens=8, chunked=False)
    a, b, c = make_seq(3, max_tokens=2), make_seq(8, max_tokens=2), make_seq(1, max_tokens=2)
    for s in (a, b, c):
        sched.add(s)
    # b does not fit beside a: it is not chunked, and c behind it waits too.
    assert chunks(engine_step(sched)) == [(a, 3)]
    assert chunks(engine_step(sched)) == [(a, 1)]  # a finishes here
    assert chunks(engine_step(sched)) == [(b, 8)]
    assert chunks(engine_step(sched)) == [(b, 1), (c, 1)]


def test_empty_scheduler():
    sched = make_scheduler(4, 4)
    out = sched.schedule()
    assert out.is_empty and out.preempted == [] and out.num_batched_tokens == 0
    assert not sched.has_unfinished()


# ---- prefix caching through the scheduler --------------------------------------------------------
def test_admission_with_prefix_hits_covers_every_scheduled_token():
    # A hit is passed with num_computed_tokens still 0: the block table must nonetheless cover
    # the hits plus the scheduled chunk, or the model runner has no slot for those tokens.
    sched = make_scheduler(16, 4)
    a = make_seq(list(range(8)), max_tokens=3)
    sched.add(a)
    engine_step(sched)
    b = make_seq([*range(8), *range(50, 58)], max_tokens=3)
    sched.add(b)
    out = engine_step(sched)
    assert b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    for s in out.scheduled:
        assert len(s.seq.block_table) * 4 >= s.seq.num_computed_tokens
    assert len(b.block_table) == 4
    sched.block_manager.check_invariants(live(sched))


def test_prefix_lookup_is_recorded_once_per_admission():
    sched = make_scheduler(4, 4)
    bm = sched.block_manager
    a = make_seq(list(range(12)), max_tokens=2)
    sched.add(a)
    engine_step(sched)
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (12, 0)
    b = make_seq([*range(8), 90, 91, 92, 93, 94], max_tokens=2)  # 2 hits + 2 new blocks
    sched.add(b)
    out = engine_step(sched)  # a takes the last block for its decode and finishes
    assert chunks(out) == [(a, 1)]
    assert b in sched.waiting
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (12, 0)  # the failed try: none
    out = engine_step(sched)
    assert chunks(out) == [(b, 5)]
    assert b.num_cached_tokens == 8
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (12 + 13, 8)


# ---- preemption --------------------------------------------------------------------------------
def test_fcfs_preempts_the_latest_arrival_by_recompute():
    # bs 2, 7 blocks: a (2 blocks) + b (2) + c (3) fill the pool exactly.
    sched = make_scheduler(7, 2, prefix_caching=False)
    a, b, c = make_seq(4, max_tokens=9), make_seq(4, max_tokens=9), make_seq(6, max_tokens=9)
    for s in (a, b, c):
        sched.add(s)
    engine_step(sched)
    assert sched.block_manager.num_free_blocks == 0
    d = make_seq(2, max_tokens=9)
    sched.add(d)
    c_tokens = list(c.token_ids)
    out = engine_step(sched)
    # a needs a 3rd block: c, the latest running arrival, is preempted; b still fits.
    assert out.preempted == [c]
    assert chunks(out) == [(a, 1), (b, 1)]
    assert c.status is SequenceStatus.WAITING
    assert c.num_computed_tokens == 0
    assert c.block_table == []
    assert c.token_ids == c_tokens  # its sampled token is kept and recomputed
    assert c.num_preemptions == 1 and sched.num_preemptions == 1
    # No admission in a step that preempted, though a block is free; the preempted c keeps
    # its arrival time and queues ahead of the later d.
    assert sched.block_manager.num_free_blocks == 1
    assert sched.waiting == [c, d]
    sched.block_manager.check_invariants(live(sched))
    # Everything still finishes, and nothing leaks.
    for _ in range(200):
        if not sched.has_unfinished():
            break
        engine_step(sched)
    assert not sched.has_unfinished()
    assert all(s.num_output_tokens == 9 for s in (a, b, c, d))
    assert sched.block_manager.num_free_blocks == 7


def test_running_sequence_preempts_itself_when_it_is_the_latest():
    sched = make_scheduler(3, 2, prefix_caching=False)
    a, b = make_seq(3, max_tokens=9), make_seq(2, max_tokens=9)
    sched.add(a)
    sched.add(b)
    engine_step(sched)  # a: 2 blocks, b: 1 block; a len 4, b len 3
    assert sched.block_manager.num_free_blocks == 0
    out = engine_step(sched)  # a fits; b needs a 2nd block and is the latest: itself
    assert chunks(out) == [(a, 1)]
    assert out.preempted == [b]
    assert sched.running == [a]
    assert b.num_computed_tokens == 0 and b.block_table == []


def test_preempted_sequence_recomputes_from_its_cached_blocks():
    sched = make_scheduler(5, 2)
    bm = sched.block_manager
    a, b = make_seq(4, max_tokens=2), make_seq(4, max_tokens=9)
    sched.add(a)
    sched.add(b)
    engine_step(sched)  # 4 of 5 blocks; both now 5 tokens long
    b_blocks = list(b.block_table)
    out = engine_step(sched)  # a takes the last block (and finishes); b preempts itself
    assert out.preempted == [b]
    assert chunks(out) == [(a, 1)]
    assert b.num_computed_tokens == 0 and b.block_table == []
    queries, hits = bm.prefix_cache_queries, bm.prefix_cache_hits
    out = engine_step(sched)
    # b's two computed prompt blocks were cached when freed: only its last token is recomputed.
    assert chunks(out) == [(b, 1)]
    assert b.num_cached_tokens == 4
    assert b.block_table[:2] == b_blocks
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (queries + 5, hits + 4)
    assert b.num_output_tokens == 2
    bm.check_invariants(live(sched))


def _three_staggered(policy: str):
    """Running [a (priority 1), b (9), c (5)] in admission order, one block each, pool full."""
    sched = make_scheduler(3, 4, policy=policy, prefix_caching=False)
    a = make_seq(2, priority=1, max_tokens=20)
    sched.add(a)
    engine_step(sched)
    b = make_seq(2, priority=9, max_tokens=20)
    sched.add(b)
    engine_step(sched)
    c = make_seq(2, priority=5, max_tokens=20)
    sched.add(c)
    engine_step(sched)
    assert sched.running == [a, b, c]
    assert sched.block_manager.num_free_blocks == 0
    assert (len(a), len(b), len(c)) == (5, 4, 3)  # a needs its 2nd block next step
    return sched, a, b, c


def test_fcfs_victim_is_the_latest_admitted():
    sched, a, b, c = _three_staggered("fcfs")
    out = engine_step(sched)
    assert out.preempted == [c]
    assert chunks(out) == [(a, 1), (b, 1)]


def test_priority_victim_is_the_lowest_priority():
    sched, a, b, c = _three_staggered("priority")
    out = engine_step(sched)
    assert out.preempted == [b]  # priority 9: the largest value, not the latest arrival
    assert chunks(out) == [(a, 1), (c, 1)]
    assert b.num_computed_tokens == 0 and b.block_table == []
    assert sched.waiting == [b]


def test_priority_never_preempts_a_higher_priority_sequence_for_a_lower_one():
    sched = make_scheduler(5, 2, policy="priority", prefix_caching=False)
    low = make_seq(2, priority=5, max_tokens=20)
    sched.add(low)
    engine_step(sched)  # low: 1 block, len 3
    high = make_seq(3, priority=0, max_tokens=20)
    sched.add(high)
    engine_step(sched)  # low: 2 blocks, len 4; high: 2 blocks, len 4
    engine_step(sched)  # both len 5, each needs a 3rd block; one block is free
    assert set(sched.running) == {low, high}
    assert sched.block_manager.num_free_blocks == 1
    out = engine_step(sched)
    # low (priority 5) is preempted and high (priority 0) runs.
    assert high not in out.preempted
    assert high in [s.seq for s in out.scheduled]


def _batch_running(policy: str, *, num_blocks: int = 32, max_num_seqs: int = 2):
    """Two low-priority (batch, 1000) sequences running: an early one and a later one."""
    sched = make_scheduler(
        num_blocks, 2, max_num_seqs=max_num_seqs, policy=policy, prefix_caching=False
    )
    early, late = make_seq(2, priority=1000, max_tokens=6), make_seq(2, priority=1000, max_tokens=6)
    sched.add(early)
    sched.add(late)
    engine_step(sched)
    engine_step(sched)
    assert sched.running == [early, late]
    return sched, early, late


def test_priority_waiting_request_preempts_running_batch_work_for_a_sequence_slot():
    sched, early, late = _batch_running("priority")
    urgent = make_seq(2, priority=0, max_tokens=2)
    sched.add(urgent)
    out = engine_step(sched)
    # The latest-arrived of the least important goes, by recompute; the urgent one runs now.
    assert out.preempted == [late] and late.num_computed_tokens == 0 and late.block_table == []
    assert chunks(out) == [(early, 1), (urgent, 2)]
    assert sched.running == [early, urgent] and sched.waiting == [late]
    assert late.num_output_tokens == 2 and late.num_preemptions == 1  # kept, to recompute
    # It resumes once nothing more important waits, and finishes all its tokens.
    for _ in range(20):
        if not sched.has_unfinished():
            break
        engine_step(sched)
    assert urgent.status is late.status is early.status is SequenceStatus.FINISHED_LENGTH
    assert late.num_output_tokens == 6 and sched.num_preemptions == 1
    sched.block_manager.check_invariants([])


def test_priority_waiting_request_preempts_batch_work_for_kv_blocks():
    # 5 blocks of 2: the two batch sequences hold 2 each after two steps, 1 is free; the urgent
    # prompt of 7 tokens needs 4, so both go (the later first), and nothing preempted is
    # readmitted in the same step.
    sched, early, late = _batch_running("priority", num_blocks=5, max_num_seqs=4)
    urgent = make_seq(7, priority=0, max_tokens=2)
    sched.add(urgent)
    out = engine_step(sched)
    assert out.preempted == [late, early]
    assert chunks(out) == [(urgent, 7)]
    assert sched.waiting == [early, late]  # back in arrival order
    while sched.has_unfinished():
        engine_step(sched)
    assert early.num_output_tokens == late.num_output_tokens == 6
    sched.block_manager.check_invariants([])


def test_equal_priorities_and_fcfs_never_preempt_for_a_waiting_request():
    for policy, priority in (("priority", 1000), ("fcfs", 0)):
        sched, early, late = _batch_running(policy)
        waiting = make_seq(2, priority=priority, max_tokens=2)
        sched.add(waiting)
        out = engine_step(sched)
        assert out.preempted == [] and chunks(out) == [(early, 1), (late, 1)], policy
        assert sched.waiting == [waiting]


def test_the_victim_is_the_least_important_then_the_latest():
    sched = make_scheduler(32, 2, max_num_seqs=3, policy="priority", prefix_caching=False)
    low_early, mid, low_late = (make_seq(2, priority=p, max_tokens=9) for p in (5, 3, 5))
    for seq in (low_early, mid, low_late):
        sched.add(seq)
    engine_step(sched)
    urgent = make_seq(2, priority=4, max_tokens=5)  # outranks the 5s, not the 3
    sched.add(urgent)
    assert engine_step(sched).preempted == [low_late]
    again = make_seq(2, priority=4, max_tokens=1)
    sched.add(again)
    assert engine_step(sched).preempted == [low_early]  # a 4 never preempts the 4 or the 3


def test_without_chunked_prefill_a_preempted_sequence_is_still_recomputed():
    # Every prompt fits the 4-token budget; the pool (8 blocks of 1) holds one whole sequence.
    sched = make_scheduler(8, 1, max_num_batched_tokens=4, chunked=False, prefix_caching=False)
    a, b = make_seq(2, max_tokens=6), make_seq(2, max_tokens=6)
    sched.add(a)
    sched.add(b)
    for _ in range(3):
        engine_step(sched)
    out = engine_step(sched)
    assert out.preempted == [b]
    assert len(b) == 5  # 2 prompt + 3 generated tokens: more than the budget in one step
    for _ in range(50):
        if not sched.has_unfinished():
            break
        out = engine_step(sched)
        # Expected: b is readmitted once a finishes. Actual: from the step after a finishes,
        # every step is empty with b waiting and nothing running (the engine's RuntimeError).
        assert not (out.is_empty and sched.waiting and not sched.running), "stalled"
    assert b.status is SequenceStatus.FINISHED_LENGTH


def test_priority_admits_waiting_in_priority_order():
    sched = make_scheduler(32, 4, max_num_seqs=1, policy="priority")
    seqs = [make_seq(2, priority=p, max_tokens=1) for p in (3, 1, 2, 1)]
    for s in seqs:
        sched.add(s)
    assert sched.waiting == [seqs[1], seqs[3], seqs[2], seqs[0]]
    order = []
    for _ in range(4):
        out = engine_step(sched)
        order += [s.seq for s in out.scheduled]
    assert order == [seqs[1], seqs[3], seqs[2], seqs[0]]


def test_fcfs_ignores_priority():
    sched = make_scheduler(32, 4, max_num_seqs=1, policy="fcfs")
    seqs = [make_seq(2, priority=p, max_tokens=1) for p in (3, 1, 2)]
    for s in seqs:
        sched.add(s)
    order = []
    for _ in range(3):
        order += [s.seq for s in engine_step(sched).scheduled]
    assert order == seqs


# ---- finish and abort --------------------------------------------------------------------------
def test_abort_waiting_and_running_frees_blocks():
    sched = make_scheduler(8, 4, max_num_seqs=1)
    bm = sched.block_manager
    run = make_seq(9, max_tokens=5)
    wait = make_seq(5, max_tokens=5)
    sched.add(run)
    sched.add(wait)
    engine_step(sched)
    assert sched.running == [run] and sched.waiting == [wait]
    assert bm.num_free_blocks == 8 - 3
    assert sched.abort({wait.request_id}) == [wait]
    assert wait.status is SequenceStatus.FINISHED_ABORTED
    assert sched.waiting == [] and wait.block_table == []
    assert bm.num_free_blocks == 8 - 3
    assert sched.abort({"no-such-request"}) == []
    assert sched.abort({run.request_id}) == [run]
    assert run.status is SequenceStatus.FINISHED_ABORTED
    assert sched.running == [] and run.block_table == []
    assert bm.num_free_blocks == 8
    bm.check_invariants([])
    assert not sched.has_unfinished()
    assert sched.schedule().is_empty


def test_abort_takes_every_sequence_of_a_request():
    sched = make_scheduler(8, 4, max_num_seqs=2)
    s0, s1 = make_seq(3, request_id="r"), make_seq(3, request_id="r")
    s2 = make_seq(3, request_id="r")  # waits: max_num_seqs is 2
    other = make_seq(3)
    for s in (s0, s1, s2, other):
        sched.add(s)
    engine_step(sched)
    assert set(sched.abort({"r"})) == {s0, s1, s2}
    assert sched.waiting == [other] and sched.running == []
    assert sched.block_manager.num_free_blocks == 8


def test_abort_of_a_preempted_sequence():
    sched, _, _, c = _three_staggered("fcfs")
    engine_step(sched)
    assert c in sched.waiting
    assert sched.abort({c.request_id}) == [c]
    assert c not in sched.waiting
    sched.block_manager.check_invariants(live(sched))


def test_finish_frees_blocks_and_leaves_the_queues():
    sched = make_scheduler(8, 4)
    seq = make_seq(6, max_tokens=1)
    sched.add(seq)
    engine_step(sched)
    assert seq.status is SequenceStatus.FINISHED_LENGTH
    assert seq.output_token_ids == [seq.seq_id % 3]
    assert sched.running == [] and seq.block_table == []
    assert sched.block_manager.num_free_blocks == 8


# ---- a simulated engine loop over random workloads -----------------------------------------------
def run_workload(sched: Scheduler, arrivals: dict[int, list[Sequence]], max_steps: int) -> int:
    """Drive the engine loop, checking every step; return the number of steps taken."""
    bm = sched.block_manager
    bs = bm.block_size
    pending = dict(arrivals)
    steps = 0
    while pending or sched.has_unfinished():
        assert steps < max_steps, "no progress: a sequence never finishes"
        for s in pending.pop(steps, []):
            sched.add(s)
        running_before = list(sched.running)
        waiting_before = list(sched.waiting)
        out = sched.schedule()
        scheduled = [s.seq for s in out.scheduled]

        assert out.num_batched_tokens <= sched.max_num_batched_tokens
        assert len(sched.running) <= sched.max_num_seqs
        assert len(set(map(id, scheduled))) == len(scheduled)
        assert all(s.num_tokens >= 1 for s in out.scheduled)
        # Running sequences first, in order (priority order under the priority policy); then a
        # prefix of the waiting queue, in order.
        if sched.policy == "priority":
            running_before.sort(key=lambda s: s.sort_key())
        kept = [s for s in running_before if s not in out.preempted]
        old = [s for s in scheduled if s in running_before]
        new = [s for s in scheduled if s not in running_before]
        assert scheduled == old + new
        assert old == kept[: len(old)]
        assert new == waiting_before[: len(new)]
        if out.preempted and sched.policy == "fcfs":
            assert new == []
        # Under the priority policy a sequence is admitted in a step that preempts only when it
        # outranks every sequence preempted.
        assert all(s.priority < v.priority for v in out.preempted for s in new)
        for v in out.preempted:
            assert v in running_before and v not in scheduled
            assert v.num_computed_tokens == 0 and v.block_table == []
            assert v.status is SequenceStatus.WAITING and v in sched.waiting
        if sched.policy == "fcfs":
            # FCFS keeps running in arrival order and only ever preempts from its tail.
            arrival = [s.arrival_time for s in running_before]
            assert arrival == sorted(arrival)
            assert out.preempted == running_before[len(running_before) - len(out.preempted) :][::-1]
        # The engine gives up on an empty step with nothing running.
        assert not (out.is_empty and sched.waiting and not sched.running)
        for s in out.scheduled:
            seq = s.seq
            start, end = seq.num_computed_tokens, seq.num_computed_tokens + s.num_tokens
            assert end <= len(seq)
            assert len(seq.block_table) * bs >= end, "scheduled tokens without KV slots"
            for p in range(start, end):
                # New K/V never goes into a block another sequence shares.
                assert bm.blocks[seq.block_table[p // bs]].ref_count == 1

        finish_step(sched, out, lambda seq: (seq.seq_id + len(seq)) % 2)

        bm.check_invariants(live(sched))
        assert all(s.block_table == [] for s in sched.waiting)
        assert all(s.status is SequenceStatus.RUNNING for s in sched.running)
        keys = [sched._waiting_key(s) for s in sched.waiting]
        assert keys == sorted(keys)
        steps += 1
    return steps


def finish_check(sched: Scheduler, seqs: list[Sequence]) -> None:
    bm = sched.block_manager
    for s in seqs:
        assert s.status is SequenceStatus.FINISHED_LENGTH
        assert s.num_output_tokens == s.sampling_params.max_tokens
        assert s.block_table == []
    assert sched.running == [] and sched.waiting == []
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants([])


@st.composite
def workloads(draw):
    block_size = draw(st.sampled_from([1, 2, 4]))
    n = draw(st.integers(1, 8))
    prompts = [draw(st.lists(st.integers(0, 1), min_size=1, max_size=12)) for _ in range(n)]
    outputs = [draw(st.integers(1, 8)) for _ in range(n)]
    longest = max(len(p) + o for p, o in zip(prompts, outputs, strict=True))
    chunked = draw(st.booleans())
    # Without chunking a recomputed sequence needs its whole length in one step.
    min_budget = 1 if chunked else longest
    return dict(
        block_size=block_size,
        prompts=prompts,
        outputs=outputs,
        priorities=[draw(st.integers(0, 3)) for _ in range(n)],
        arrival_steps=[draw(st.integers(0, 6)) for _ in range(n)],
        # The pool holds the longest sequence, and at most a few blocks more.
        num_blocks=-(-longest // block_size) + draw(st.integers(0, 2)),
        max_num_seqs=draw(st.integers(1, 4)),
        max_num_batched_tokens=draw(st.integers(min_budget, max(min_budget, 16))),
        policy=draw(st.sampled_from(["fcfs", "priority"])),
        chunked=chunked,
        prefix_caching=draw(st.booleans()),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_finish_without_leaks(w):
    sched = make_scheduler(
        w["num_blocks"],
        w["block_size"],
        max_num_seqs=w["max_num_seqs"],
        max_num_batched_tokens=w["max_num_batched_tokens"],
        policy=w["policy"],
        chunked=w["chunked"],
        prefix_caching=w["prefix_caching"],
    )
    seqs = [
        make_seq(p, priority=prio, max_tokens=o)
        for p, o, prio in zip(w["prompts"], w["outputs"], w["priorities"], strict=True)
    ]
    arrivals: dict[int, list[Sequence]] = {}
    for i, (s, t) in enumerate(zip(seqs, w["arrival_steps"], strict=True)):
        s.arrival_time = t + i / 100  # arrival time follows the step it is added in
        arrivals.setdefault(t, []).append(s)
    total = sum(len(p) + o for p, o in zip(w["prompts"], w["outputs"], strict=True))
    run_workload(sched, arrivals, max_steps=20 * total + 50)
    finish_check(sched, seqs)
    event(f"preempted: {sched.num_preemptions > 0}")
    event(f"prefix hits: {sched.block_manager.prefix_cache_hits > 0}")


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("chunked", [True, False])
def test_tight_pool_preempts_and_still_finishes(policy, prefix_caching, chunked):
    # Four sequences of 6 + 6 tokens over a pool that holds exactly one of them.
    sched = make_scheduler(
        6,
        2,
        max_num_seqs=4,
        max_num_batched_tokens=32,
        policy=policy,
        chunked=chunked,
        prefix_caching=prefix_caching,
    )
    seqs = [make_seq([i % 2] * 6, priority=3 - i, max_tokens=6) for i in range(4)]
    steps = run_workload(sched, {0: seqs}, max_steps=500)
    assert sched.num_preemptions > 0
    assert sum(s.num_preemptions for s in seqs) == sched.num_preemptions
    assert steps < 500
    finish_check(sched, seqs)
