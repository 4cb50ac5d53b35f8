"""Deadline-aware scaling for batches, as a pure function: replicas added when the rate batches
finish at would miss the nearest completion window, within maxReplicas, and nothing asked for
without a backlog, a deadline or a measured rate; status.batches from the same figures; and a
batch backlog through `kvpilot autoscale simulate`."""

from __future__ import annotations

from dataclasses import replace

from kvpilot_operator.autoscaler.backlog import BatchJob
from kvpilot_operator.autoscaler.deadline import (
    BatchBacklog,
    BatchFigures,
    batches_status,
    deadline_replicas,
    with_deadline,
)
from kvpilot_operator.autoscaler.decision import Decision, ScalingParams
from kvpilot_operator.autoscaler.loop import _merge_patch
from kvpilot_operator.autoscaler.simulate import EngineModel, LoadPoint, simulate, summary

OK = ("True", "x", "")


def _decision(desired: int, current: int = 1) -> Decision:
    return Decision(desired, current, "slo", OK, OK, OK)


def test_enough_capacity_asks_for_nothing_more() -> None:
    # 1000 requests at 2/s: 500 s of work, an hour left.
    advice = deadline_replicas(BatchBacklog(1000, 3600, 2.0), ready=1, max_replicas=8)
    assert advice.replicas == 1 and "finishes in ~500s" in advice.reason
    assert with_deadline(_decision(1), BatchBacklog(1000, 3600, 2.0), 1, 8).desired == 1


def test_a_deadline_that_would_be_missed_adds_replicas() -> None:
    # 3600 requests at 1/s on 2 replicas (0.5/s each); 1200 s left, with the 1.25 margin:
    # 3600 * 1.25 / 1200 = 3.75/s needed -> 8 replicas.
    backlog = BatchBacklog(3600, 1200, 1.0)
    advice = deadline_replicas(backlog, ready=2, max_replicas=10)
    assert advice.replicas == 8, advice
    d = with_deadline(_decision(2, current=2), backlog, 2, 10)
    assert d.desired == 8 and d.changed and "3600" in d.reason
    # The SLO decision's answer wins when it is larger.
    assert with_deadline(_decision(9, current=2), backlog, 2, 10).desired == 9


def test_capped_at_max_replicas_and_says_so() -> None:
    advice = deadline_replicas(BatchBacklog(3600, 1200, 1.0), ready=2, max_replicas=4)
    assert advice.replicas == 4 and "capped at maxReplicas 4" in advice.reason


def test_no_backlog_no_deadline_no_rate() -> None:
    assert deadline_replicas(BatchBacklog(0, 100, 1.0), 2, 8).replicas == 0
    assert deadline_replicas(BatchBacklog(50, None, 1.0), 2, 8).replicas == 0
    # No rate measured yet: hold rather than guess.
    assert deadline_replicas(BatchBacklog(50, 100, None), 2, 8).replicas == 0
    assert with_deadline(_decision(2, current=2), None, 2, 8).desired == 2
    # Scaled to zero with a backlog: one replica to start on it.
    assert deadline_replicas(BatchBacklog(50, 100, None), 0, 8).replicas == 1
    # A window about to close counts as a minute, not as a division by almost nothing.
    assert deadline_replicas(BatchBacklog(60, 1, 1.0), 1, 100).replicas == 2


def test_batches_status_summarises_progress_and_the_deadline_risk() -> None:
    figures = BatchFigures(
        by_status={"in_progress": 2, "completed": 3, "failed": 0},
        total=500,
        completed=120,
        failed=5,
        backlog=375,
        deadline_at=1_800_000_000,
        finish_rate=1.234,
    )
    # 375 left at 1.234/s: ~304 s of work, 600 s left.
    st = batches_status(figures, now=1_800_000_000 - 600)
    assert st == {
        "active": 2,
        "byStatus": {"completed": 3, "in_progress": 2},
        "requestsTotal": 500,
        "requestsCompleted": 120,
        "requestsFailed": 5,
        "finishRate": 1.23,
        "nearestDeadline": "2027-01-15T08:00:00Z",
        "deadlineAtRisk": False,
    }
    # The same figures 200 s before the window closes: the rate will not make it.
    assert batches_status(figures, now=1_800_000_000 - 200)["deadlineAtRisk"] is True
    # No rate measured: the risk is unknown rather than guessed.
    assert batches_status(replace(figures, finish_rate=None), 0)["deadlineAtRisk"] is None
    # Nothing active: no deadline, whatever an old gauge says.
    idle = BatchFigures(by_status={"completed": 5}, deadline_at=1_800_000_000)
    assert batches_status(idle, 0)["nearestDeadline"] is None
    assert figures.backlog_at(1_800_000_000 - 600) == BatchBacklog(375, 600, 1.234)
    assert idle.backlog_at(0) is None


def test_status_batches_is_patched_only_where_it_changed() -> None:
    old = {"active": 1, "byStatus": {"in_progress": 1}, "requestsTotal": 10, "finishRate": 0.5}
    same = {**old, "nearestDeadline": None}
    assert _merge_patch(old, same) is None
    # A status that drops to zero and a figure that goes away are deleted (null), not left stale.
    new = {"active": 0, "byStatus": {"in_progress": 0, "completed": 1}, "requestsTotal": 10}
    assert _merge_patch(old, {**new, "byStatus": {"completed": 1}}) == {
        "active": 0,
        "byStatus": {"completed": 1, "in_progress": None},
        "requestsTotal": 10,
        "finishRate": None,
    }


def test_fewer_replicas_only_with_twice_the_margin_and_rates_per_measured_replica() -> None:
    # 5 serving at 20/s (4/s each); 2000 left, 300 s left: 8.3/s needed with the 1.25 margin
    # (3 replicas), 16.7/s with twice it (5): hold 5 rather than drop to 3 and come back.
    backlog = BatchBacklog(2000, 300, 20.0)
    assert deadline_replicas(backlog, ready=5, max_replicas=10).replicas == 3
    assert with_deadline(_decision(1, current=5), backlog, 5, 10).desired == 5
    # Comfortably ahead even with twice the margin: down to what that margin needs.
    ahead = BatchBacklog(600, 300, 20.0)  # 5/s needed with twice the margin: 2 replicas
    assert with_deadline(_decision(1, current=5), ahead, 5, 10).desired == 2
    # A rate measured while 2 replicas served is 10/s each, whatever serves now.
    measured = BatchBacklog(6000, 300, 20.0, replicas=2)
    assert deadline_replicas(measured, ready=4, max_replicas=10).replicas == 3  # 25/s at 10/s


def test_a_replica_more_adds_a_whole_replicas_batch_throughput() -> None:
    # 2 replicas answer 1/s between them: most of their capacity is the interactive load's. A
    # third takes 2/s of batch work (its capacity at the SLO, 8000 tok/s at 0.8, over 3200
    # tokens a request), so 3.75/s needs 2 more, not the 8 that 0.5/s per replica would say.
    backlog = BatchBacklog(3600, 1200, 1.0, tokens_per_request=3200)
    assert deadline_replicas(backlog, 2, 10, replica_rate=2.0).replicas == 4
    assert deadline_replicas(backlog, 2, 10).replicas == 8
    fitted = replace(_decision(2, current=2), capacity=8000.0)
    assert with_deadline(fitted, backlog, 2, 10, utilization=0.8).desired == 4
    assert with_deadline(_decision(2, current=2), backlog, 2, 10).desired == 8  # no capacity
    # Measured while 1 replica served, 2 serve now: the rate now is one replica's more.
    then = BatchBacklog(3600, 1200, 1.0, replicas=1)
    assert deadline_replicas(then, 2, 10, replica_rate=2.0).replicas == 3  # 3.0/s + 0.75


def _steady(rate: float) -> list[LoadPoint]:
    return [LoadPoint(0, rate, 500, 200)]


def test_simulated_batch_backlog_gets_replicas_in_time_and_gives_them_back() -> None:
    """`kvpilot autoscale simulate` with a batch: 60,000 requests due in an hour, on a service
    whose interactive load needs 3 replicas. Those 3 alone would miss the window; the deadline
    adds replicas, the batch finishes in time, the replicas go back to 3, and the interactive
    requests keep their SLO as without the batch."""
    engine = EngineModel(overhead=0.010, per_token=0.0001, max_tokens_per_step=2048)
    params = ScalingParams(
        min_replicas=1, max_replicas=12, ttft_target=0.5, tpot_target=0.05,
        up_cooldown=30, down_cooldown=60,
    )  # fmt: skip
    job = BatchJob(60_000, window=3600, start=600, input_len=500, output_len=200)
    run = simulate(_steady(20), params, engine, duration=6000, seed=1, batch=job)
    alone = simulate(_steady(20), params, engine, duration=6000, seed=1)
    fixed = simulate(
        _steady(20), params, engine, duration=6000, seed=1, batch=job,
        initial_replicas=3, observe=False,
    )  # fmt: skip
    assert fixed.batch is not None and fixed.batch.finished_at is None  # 3 replicas miss it
    assert run.batch is not None and run.batch.finished_at is not None
    assert run.batch.finished_at <= job.start + job.window
    during = [t.desired for t in run.ticks if job.start <= t.time < run.batch.finished_at]
    assert max(during) > 3 and max(t.desired for t in alone.ticks) == 3
    assert any("batch backlog" in e.decision.reason for e in run.events)
    assert run.ticks[-1].desired == 3  # given back
    after = [e for e in run.events if e.time > run.batch.finished_at]
    assert all(e.decision.desired <= 3 for e in after)
    assert run.attainment() >= alone.attainment() - 0.01
    assert "finished at" in summary(run) and "to spare" in summary(run)
