"""Batch admission's meter: the batch limit halves when interactive latency nears the SLO,
grows back one request a second when far under it, and never drops below one."""

from __future__ import annotations

from kvpilot_operator.router.batch.meter import BatchMeter, SLOTargets, percentile


def _run(meter: BatchMeter, start: float, seconds: int, ttft: float | None) -> list[int]:
    """One interactive request a second (none when ttft is None); the limit after each."""
    limits = []
    for t in range(seconds):
        now = start + t
        if ttft is not None:
            meter.observe(now, ttft_s=ttft)
        limits.append(meter.current(now))
    return limits


def test_percentile_is_nearest_rank() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile(list(map(float, range(1, 101))), 95) == 95.0
    assert percentile([7.0], 99) == 7.0


def test_without_an_slo_the_limit_is_the_maximum() -> None:
    meter = BatchMeter(16)
    assert _run(meter, 0.0, 5, ttft=9.0) == [16] * 5


def test_grows_while_far_under_the_slo_and_halves_near_it() -> None:
    meter = BatchMeter(8, SLOTargets(ttft_s=0.5))
    # Starts at one and adds one a second while TTFT is a fifth of the target, up to 8.
    grown = _run(meter, 0.0, 12, ttft=0.1)
    assert grown[:4] == [1, 2, 3, 4] and grown[-1] == 8
    # TTFT past 80% of the target: halved, then judged only by requests after the halving.
    backed = _run(meter, 12.0, 4, ttft=0.45)
    assert backed == [4, 2, 1, 1]  # each newer slow request halves it again
    assert _run(meter, 16.0, 3, ttft=0.9) == [1, 1, 1]  # never below one
    # Between half and 80% of the target it holds; far under it, it grows again.
    meter.limit = 3.0
    assert _run(meter, 19.0, 3, ttft=0.3) == [3, 3, 3]
    assert _run(meter, 40.0, 3, ttft=0.1)[-1] > 3


def test_old_latencies_do_not_halve_twice_and_quiet_grows() -> None:
    meter = BatchMeter(8, SLOTargets(ttft_s=0.5), limit=8.0)
    meter.observe(0.0, ttft_s=2.0)
    meter.current(0.0)
    assert meter.current(1.0) == 4  # the slow request halves the limit once
    assert meter.current(2.0) == 4  # no newer request: it waits rather than halve again
    assert meter.current(12.0) == 5  # the window emptied: no interactive traffic, grow


def test_tpot_counts_too() -> None:
    meter = BatchMeter(8, SLOTargets(ttft_s=0.5, tpot_s=0.05), limit=8.0)
    meter.current(0.0)
    meter.observe(0.5, ttft_s=0.05, tpot_s=0.2)
    assert meter.current(1.0) == 4
