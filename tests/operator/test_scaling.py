"""The autoscaler's decision function on synthetic series: the queueing model of
`kvpilot_operator.autoscaler.simulate` generates what Prometheus would show, `decide` acts on it."""

from __future__ import annotations

import dataclasses
import itertools
import math
import subprocess
import sys
from pathlib import Path

import pytest
from kvpilot_operator.api.policies import load_presets, parse, resolve_spec
from kvpilot_operator.autoscaler.decision import (
    Observation,
    ScalerState,
    ScalingParams,
    StepModel,
    Window,
    decide,
    fit_step_model,
)
from kvpilot_operator.autoscaler.simulate import EngineModel, LoadPoint, simulate

ROOT = Path(__file__).resolve().parents[2]
ENGINE = EngineModel(overhead=0.010, per_token=0.0001, max_tokens_per_step=2048, cold_start=60)
PARAMS = ScalingParams(
    min_replicas=1,
    max_replicas=20,
    ttft_target=0.5,
    tpot_target=0.05,
    stable_window=120,
    panic_window=15,
    up_cooldown=30,
    down_cooldown=60,
)
INTERVAL = 15.0
IN, OUT = 500, 200


def expected_replicas(rate: float, params: ScalingParams = PARAMS) -> int:
    """What the capacity model predicts for a steady `rate` on ENGINE (exact step law)."""
    capacity = StepModel(ENGINE.overhead, ENGINE.per_token).capacity(params.tpot_target, None)
    return math.ceil(rate * (IN + OUT) / (capacity * params.target_utilization))


def trace(*steps: tuple[float, float]) -> list[LoadPoint]:
    return [LoadPoint(t, rate, IN, OUT) for t, rate in steps]


def replicas_at(result, t: float) -> int:  # type: ignore[no-untyped-def]
    return next(tick.desired for tick in result.ticks if tick.time >= t)


def test_step_model_fit_recovers_the_law() -> None:
    pts = tuple((n, 0.012 + 0.00007 * n) for n in (20, 60, 150, 400, 900))
    model = fit_step_model(pts)
    assert model is not None and model.confident
    assert model.overhead == pytest.approx(0.012) and model.per_token == pytest.approx(0.00007)
    # One load level only: the line through the origin, which never overestimates capacity.
    lone = fit_step_model(((100.0, 0.02), (101.0, 0.0201)))
    assert lone is not None and not lone.confident and lone.overhead == 0
    true = StepModel(0.012, 0.00007)
    assert lone.capacity(0.05, None) <= StepModel(0.01, 0.0001).capacity(0.05, None)
    assert true.capacity(0.05, None) == pytest.approx((0.05 - 0.012) / 0.00007 / 0.05)
    assert true.capacity(0.05, 256) == pytest.approx(256 / (0.012 + 0.00007 * 256))
    assert fit_step_model(()) is None


def test_load_step_reaches_the_model_count_within_two_intervals() -> None:
    step_at = 600.0
    want = expected_replicas(30)
    assert 2 < want <= 4  # one move from 1 (maxScaleUpRate 4)
    result = simulate(trace((0, 5), (step_at, 30)), PARAMS, ENGINE, duration=1200, seed=1)
    assert replicas_at(result, step_at - 1) == expected_replicas(5) == 1
    ups = [e for e in result.events if e.time > step_at]
    assert ups, "no scale-up after the load step"
    first = ups[0]
    assert first.time <= step_at + 2 * INTERVAL
    assert first.decision.desired == want, first.decision.reason
    assert "load needs" in first.decision.reason
    # ... and it stays there: no second move stacked on the cold start, no overshoot.
    assert [e.decision.desired for e in ups] == [want]
    assert replicas_at(result, 1199) == want


def test_steady_load_does_not_oscillate_for_30_minutes() -> None:
    for rate in (3, 12, 27, 55):
        want = expected_replicas(rate)
        result = simulate(
            trace((0, rate)), PARAMS, ENGINE, initial_replicas=want, duration=1800, seed=7
        )
        assert result.events == [], [(e.time, e.decision.reason) for e in result.events]
        assert result.attainment() > 0.99


def test_load_drop_scales_down_only_after_the_stable_window() -> None:
    drop_at = 900.0
    result = simulate(trace((0, 40), (drop_at, 4)), PARAMS, ENGINE, duration=2400, seed=3)
    high = expected_replicas(40)
    assert replicas_at(result, drop_at - 1) == high
    downs = [e for e in result.events if e.decision.desired < e.decision.current]
    assert downs and all(e.time >= drop_at + PARAMS.stable_window for e in downs)
    # Rate-limited (at most halving per move), cooldown between moves, and it ends at the model's
    # count for the low load.
    for e in downs:
        assert e.decision.desired >= math.ceil(e.decision.current / PARAMS.max_down_rate)
    for a, b in itertools.pairwise(downs):
        assert b.time - a.time >= PARAMS.down_cooldown
    assert replicas_at(result, 2399) == expected_replicas(4)


def test_bounds_and_rates_are_respected() -> None:
    params = dataclasses.replace(PARAMS, max_replicas=6, max_up_rate=2.0)
    result = simulate(trace((0, 2), (300, 200)), params, ENGINE, duration=900, seed=5)
    assert max(t.desired for t in result.ticks) == 6
    for e in result.events:
        d = e.decision
        if d.desired > d.current:
            assert d.desired <= max(d.current + 1, math.floor(d.current * 2.0))
    ups = [e.time for e in result.events if e.decision.desired > e.decision.current]
    for a, b in itertools.pairwise(ups):
        assert b - a >= params.up_cooldown or any(
            e.decision.panic for e in result.events if e.time == b
        )
    low = simulate(trace((0, 0.0)), dataclasses.replace(PARAMS, min_replicas=2), ENGINE,
                   initial_replicas=3, duration=900)  # fmt: skip
    assert min(t.desired for t in low.ticks) == 2


def window(**kw: float) -> Window:
    base = dict(
        request_rate=5.0,
        tokens_per_request=700.0,
        ttft=0.1,
        tpot=0.02,
        step_time=0.015,
        step_tokens=50.0,
    )
    return Window(**{**base, **kw})  # type: ignore[arg-type]


def test_missing_data_holds_and_says_why() -> None:
    state = ScalerState()
    for missing in (("PrometheusUnreachable", "connection refused"), None):
        obs = Observation(time=100, replicas=5, ready=5, missing=missing)
        d, new = decide(PARAMS, state, obs)
        assert d.desired == 5 and not d.changed and new == state
        assert d.scaling_active[0] == "False"
        assert d.scaling_active[1] == (missing[0] if missing else "NoMetrics")
        assert d.slo_met[0] == "Unknown"
    # Long after a quiet spell, losing metrics still never scales down.
    quiet = Observation(time=0, replicas=5, ready=5, short=window(request_rate=0),
                        long=window(request_rate=0))  # fmt: skip
    _, state = decide(PARAMS, state, quiet)
    d, _ = decide(PARAMS, state, Observation(time=10_000, replicas=5, ready=5))
    assert d.desired == 5


def test_traffic_without_latency_samples_never_scales_down() -> None:
    params = dataclasses.replace(PARAMS, stable_window=30, down_cooldown=0)
    stuck = window(request_rate=5.0, ttft=None, tpot=None)
    state, d = ScalerState(), None
    for t in range(0, 300, 15):
        d, state = decide(params, state, Observation(t, 3, 3, stuck, stuck))
        assert d.desired >= 3, d.reason
    assert d is not None and d.slo_met[0] == "Unknown"


def test_feedback_does_not_stack_on_a_scale_up_in_flight() -> None:
    params = dataclasses.replace(PARAMS, up_cooldown=0)
    slow = window(ttft=2.0, tpot=0.2)  # far past the SLO, the model has nothing to go on
    d, state = decide(params, ScalerState(settled_since=-100), Observation(0, 2, 2, slow, slow))
    assert d.desired == 4 and "TTFT" in d.reason
    # The two new replicas are starting: latency is still bad, but nothing more is added.
    for t in (15, 30, 45):
        d, state = decide(params, state, Observation(t, 4, 2, slow, slow))
        assert d.desired == 4 and d.able_to_scale[1] == "ScaleInProgress"
    # Ready, and a short window later still breached: now feedback acts again.
    d, state = decide(params, state, Observation(60, 4, 4, slow, slow))
    assert d.desired == 4
    d, state = decide(params, state, Observation(75, 4, 4, slow, slow))
    assert d.desired == 8


def test_scale_to_zero_after_idle_and_wake_on_queue() -> None:
    params = dataclasses.replace(PARAMS, scale_to_zero=True, idle_seconds=300, min_replicas=1)
    idle = window(request_rate=0, ttft=None, tpot=None, step_time=None, step_tokens=None)
    state = ScalerState()
    d, state = decide(params, state, Observation(0, 1, 1, window(), window()))
    t = 0.0
    while d.desired == 1:
        t += 15
        d, state = decide(params, state, Observation(t, 1, 1, idle, idle))
        assert t < 1000
    assert d.desired == 0 and t >= 300 and "idle" in d.reason
    d, state = decide(params, state, Observation(t + 15, 0, 0, idle, idle))
    assert d.desired == 0 and d.scaling_active[1] == "ScaledToZero"
    queued = Window(request_rate=0, waiting=3)
    d, state = decide(params, state, Observation(t + 30, 0, 0, queued, None))
    assert d.desired == 1 and "waking" in d.reason


def test_advisory_mode_decides_but_the_simulated_pool_does_not_move() -> None:
    params = dataclasses.replace(PARAMS, advisory=True)
    result = simulate(trace((0, 5), (300, 40)), params, ENGINE, duration=600, seed=2)
    assert result.events and all(t.desired == 1 for t in result.ticks)


def test_params_from_a_resolved_spec() -> None:
    doc = {
        "apiVersion": "kvpilot.io/v1alpha1",
        "kind": "LLMService",
        "metadata": {"name": "chat", "namespace": "default"},
        "spec": {"model": {"source": {"path": "smollm2"}}, "policy": "interactive-chat",
                 "scaling": {"maxReplicas": 7}},
    }  # fmt: skip
    svc = parse(doc)
    spec = resolve_spec(svc.spec, load_presets()["interactive-chat"].spec)
    p = ScalingParams.from_spec(spec)
    assert (p.max_replicas, p.ttft_target, p.tpot_target) == (7, 0.5, 0.05)
    assert p.target_utilization == 0.7 and p.max_tokens_per_step == 2048 and not p.advisory


@pytest.mark.slow
def test_simulate_cli_on_the_bundled_trace(tmp_path: Path) -> None:
    out = tmp_path / "plot.png"
    proc = subprocess.run(
        [sys.executable, "-m", "kvpilot_engine.cli", "autoscale", "simulate",
         str(ROOT / "docs/examples/load-trace.csv"), "--out", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for key in ("SLO attainment", "replica-minutes", "decisions"):
        assert key in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = tmp_path / "bad.csv"
    bad.write_text("time,request_rate,input_len,output_len\n0,5,100,100\n0,6,100,100\n")
    proc = subprocess.run(
        [sys.executable, "-m", "kvpilot_engine.cli", "autoscale", "simulate", str(bad)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2 and "time must increase" in proc.stderr
