"""`kvpilot autoscale simulate`: replay a load trace through a scaling policy against a queueing
model of engine replicas, so a policy can be tuned before it meets real traffic.

The replica model is a fluid approximation of a continuous-batching engine, one tick per second:
a step of n tokens takes `overhead + per_token * n` seconds (the same law the autoscaler fits from
`kvpilot_engine_step_*`), so a replica that must process x tokens/s runs steps of
n = overhead * x / (1 - per_token * x) tokens. TPOT is that step time; TTFT is the time to drain
the backlog, plus an M/M/1 wait for a step slot that grows as utilisation nears 1, plus the steps
the prompt needs. Replicas become capacity `cold_start` seconds after they are asked for. It is a
model, not a measurement: its value is comparing policies on the same trace.

With a batch (`backlog.BatchJob`), the replicas' idle capacity drains it, its tokens make the
steps longer (TPOT), and the deadline decision raises the SLO decision's replicas when the
batch would miss its window, as the operator does for a service with spec.batch.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvpilot_operator.autoscaler.backlog import BatchJob, BatchQueue
from kvpilot_operator.autoscaler.deadline import with_deadline
from kvpilot_operator.autoscaler.decision import (
    Decision,
    Observation,
    ScalerState,
    ScalingParams,
    StepModel,
    Window,
    decide,
)


@dataclass(frozen=True)
class EngineModel:
    """One replica. The defaults are an 8B model on one H100-class GPU, roughly."""

    overhead: float = 0.010  # seconds per step, whatever its size
    per_token: float = 0.0001  # seconds per token in a step
    max_tokens_per_step: int = 2048
    cold_start: float = 60.0  # seconds from "asked for" to "serving"

    @property
    def max_throughput(self) -> float:
        n = self.max_tokens_per_step
        return n / (self.overhead + self.per_token * n)


@dataclass(frozen=True)
class LoadPoint:
    time: float  # seconds from the start of the trace
    request_rate: float
    input_len: float
    output_len: float


def read_trace(path: Path) -> list[LoadPoint]:
    """CSV with a header: time (seconds), request_rate (per second), input_len, output_len."""
    points = []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        need = {"time", "request_rate", "input_len", "output_len"}
        if reader.fieldnames is None or not need <= set(reader.fieldnames):
            raise ValueError(f"{path}: the header must name the columns {sorted(need)}")
        for line, row in enumerate(reader, start=2):
            try:
                p = LoadPoint(*(float(row[k]) for k in ("time", "request_rate", "input_len",
                                                          "output_len")))  # fmt: skip
            except ValueError as err:
                raise ValueError(f"{path}:{line}: {err}") from None
            if p.request_rate < 0 or p.input_len < 0 or p.output_len < 1:
                raise ValueError(f"{path}:{line}: negative rate/length or output_len < 1")
            if points and p.time <= points[-1].time:
                raise ValueError(f"{path}:{line}: time must increase")
            points.append(p)
    if not points:
        raise ValueError(f"{path}: no rows")
    return points


def load_at(trace: Sequence[LoadPoint], t: float) -> LoadPoint:
    """Piecewise constant: the last point at or before t."""
    lo, hi = 0, len(trace) - 1
    if t < trace[0].time:
        return trace[0]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if trace[mid].time <= t:
            lo = mid
        else:
            hi = mid - 1
    return trace[lo]


@dataclass(frozen=True)
class Tick:
    """One second of the model."""

    time: float
    load: LoadPoint
    arrivals: float  # requests this second
    desired: int
    ready: int
    served_tokens: float
    backlog_requests: float
    step_time: float | None
    step_tokens: float | None
    ttft: float | None  # predicted, seconds (None with no replica and nothing to predict)
    tpot: float | None
    batch_left: float = 0.0  # batch requests not yet answered


@dataclass
class ReplicaPool:
    engine: EngineModel
    desired: int
    # Times at which the replicas asked for become ready (ready ones: -inf).
    ready_at: list[float] = field(default_factory=list)
    backlog: float = 0.0  # tokens of requests not yet started
    # Tokens/s in progress: a request's work spreads over its lifetime (output_len steps), so a
    # second with many arrivals raises the load for that long, not in one tick.
    work_rate: float = 0.0
    last_step: float = 0.0

    def __post_init__(self) -> None:
        self.ready_at = [-math.inf] * self.desired

    def scale(self, desired: int, now: float) -> None:
        if desired > len(self.ready_at):
            self.ready_at += [now + self.engine.cold_start] * (desired - len(self.ready_at))
        else:
            # Starting replicas go first, then ready ones (a Deployment's scale-down order).
            self.ready_at = sorted(self.ready_at)[:desired]
        self.desired = desired

    def ready(self, now: float) -> int:
        return sum(1 for t in self.ready_at if t <= now)

    def tick(
        self, now: float, load: LoadPoint, arrivals: float, batch: BatchQueue | None = None
    ) -> Tick:
        e, ready = self.engine, self.ready(now)
        per_request = load.input_len + load.output_len
        lifetime = max(1.0, load.output_len * (self.last_step or e.overhead))
        self.work_rate += (arrivals * per_request - self.work_rate) * (1 - math.exp(-1 / lifetime))
        offered = self.work_rate + self.backlog
        capacity = ready * e.max_throughput
        served = min(offered, capacity)
        self.backlog = offered - served
        backlog_requests = self.backlog / per_request if per_request else 0.0
        batch_tokens = batch.tick(now, ready, served) if batch else 0.0
        batch_left = batch.left if batch else 0.0
        if ready == 0:
            ttft = None if arrivals == 0 and self.backlog == 0 else math.inf
            return Tick(now, load, arrivals, self.desired, 0, 0.0, backlog_requests, None, None,
                        ttft, None, batch_left)  # fmt: skip
        x = (served + batch_tokens) / ready  # tokens/s per replica
        bx = min(e.per_token * x, 0.999)
        n = min(e.overhead * x / (1 - bx), e.max_tokens_per_step)
        step = e.overhead + e.per_token * n
        rho = min(x / e.max_throughput, 0.95)
        # Running decodes take their share of the budget, but never all of it: the scheduler
        # admits prefill chunks each step (saturation shows up as backlog instead).
        room = max(e.max_tokens_per_step - n, 0.1 * e.max_tokens_per_step)
        prefill_steps = math.ceil(load.input_len / room)
        ttft = self.backlog / capacity + step * rho / (1 - rho) + step * max(prefill_steps, 1)
        self.last_step = step
        return Tick(now, load, arrivals, self.desired, ready, served, backlog_requests, step, n,
                    ttft, step, batch_left)  # fmt: skip


def window_of(ticks: Sequence[Tick], params: ScalingParams) -> Window | None:
    """What Prometheus would report over these ticks (ticks without a ready replica have no
    engine metrics; with none at all there is no window)."""
    served = [t for t in ticks if t.ready > 0]
    if not ticks:
        return None
    span = float(len(ticks))
    arrivals = sum(t.arrivals for t in ticks)
    tokens = sum(t.arrivals * (t.load.input_len + t.load.output_len) for t in ticks)

    def pct(values: list[tuple[float, float]], q: float) -> float | None:
        # Weighted percentile of (value, weight): the share of requests under each value.
        values = sorted((v, w) for v, w in values if w > 0)
        total = sum(w for _, w in values)
        if total == 0:
            return None
        acc = 0.0
        for v, w in values:
            acc += w
            if acc >= q * total:
                return v
        return values[-1][0]

    ttft = [(t.ttft, t.arrivals) for t in served if t.ttft is not None]
    tpot = [(t.tpot, t.arrivals) for t in served if t.tpot is not None]
    step_times = [t.step_time for t in served if t.step_time is not None]
    step_tokens = [t.step_tokens for t in served if t.step_tokens is not None]
    return Window(
        request_rate=arrivals / span,
        token_rate=sum(t.served_tokens for t in served) / span,
        tokens_per_request=tokens / arrivals if arrivals else None,
        waiting=ticks[-1].backlog_requests,
        ttft=pct(ttft, params.ttft_percentile / 100),
        tpot=pct(tpot, params.tpot_percentile / 100),
        step_time=sum(step_times) / len(step_times) if step_times else None,
        step_tokens=sum(step_tokens) / len(step_tokens) if step_tokens else None,
    )


@dataclass(frozen=True)
class Event:
    time: float
    decision: Decision


@dataclass
class Result:
    ticks: list[Tick]
    events: list[Event]  # every evaluation whose decision changed the replicas
    params: ScalingParams
    batch: BatchQueue | None = None

    @property
    def replica_minutes(self) -> float:
        # Billed from the moment a replica is asked for (it holds a GPU while it starts).
        return sum(t.desired for t in self.ticks) / 60

    def attainment(self) -> float:
        """Share of requests whose predicted TTFT and TPOT are inside the SLO."""
        total = sum(t.arrivals for t in self.ticks)
        if total == 0:
            return 1.0
        ok = 0.0
        p = self.params
        for t in self.ticks:
            ttft_ok = p.ttft_target is None or (t.ttft is not None and t.ttft <= p.ttft_target)
            tpot_ok = p.tpot_target is None or (t.tpot is not None and t.tpot <= p.tpot_target)
            if ttft_ok and tpot_ok:
                ok += t.arrivals
        return ok / total


def simulate(
    trace: Sequence[LoadPoint],
    params: ScalingParams,
    engine: EngineModel = EngineModel(),
    *,
    interval: float = 15.0,
    initial_replicas: int | None = None,
    seed: int | None = 0,
    duration: float | None = None,
    observe: bool = True,
    batch: BatchJob | None = None,
) -> Result:
    """Tick the model every second and let `decide` act every `interval` seconds. `seed` draws
    Poisson arrivals (None: the exact rates, no noise); `batch`: a batch to drain as well."""
    rng = random.Random(seed) if seed is not None else None
    start = initial_replicas if initial_replicas is not None else max(params.min_replicas, 1)
    pool = ReplicaPool(engine, start)
    end = duration if duration is not None else trace[-1].time + 60
    state = ScalerState()
    ticks: list[Tick] = []
    events: list[Event] = []
    history = max(params.stable_window, params.panic_window)
    queue = None
    if batch is not None:
        # The batch fills a replica up to the load the SLO decision sizes for: what it
        # sustains at the TPOT target, times the target utilisation (the headroom for bursts).
        step = StepModel(engine.overhead, engine.per_token)
        limit = step.capacity(params.tpot_target, engine.max_tokens_per_step)
        queue = BatchQueue(batch, limit * params.target_utilization)
    t = 0.0
    while t < end:
        load = load_at(trace, t)
        arrivals = _poisson(rng, load.request_rate) if rng else load.request_rate
        ticks.append(pool.tick(t, load, arrivals, queue))
        t += 1.0
        if observe and t % interval < 1e-9:
            recent = ticks[-int(history) :]
            obs = Observation(
                time=t,
                replicas=pool.desired,
                ready=pool.ready(t),
                short=window_of(recent[-int(params.panic_window) :], params),
                long=window_of(recent[-int(params.stable_window) :], params),
            )
            decision, state = decide(params, state, obs)
            if queue is not None:
                backlog = queue.backlog(t)
                decision = with_deadline(
                    decision, backlog, obs.ready, params.max_replicas, params.target_utilization
                )
            if decision.changed:
                events.append(Event(t, decision))
                if not params.advisory:
                    pool.scale(decision.desired, t)
    return Result(ticks, events, params, queue)


def _poisson(rng: random.Random, lam: float) -> float:
    if lam <= 0:
        return 0.0
    if lam > 50:  # normal approximation: exact enough, and O(1)
        return max(0.0, round(rng.gauss(lam, math.sqrt(lam))))
    k, p, limit = 0, 1.0, math.exp(-lam)
    while True:
        p *= rng.random()
        if p <= limit:
            return float(k)
        k += 1


def summary(result: Result) -> str:
    p = result.params
    ttfts = [t.ttft for t in result.ticks if t.ttft is not None and t.arrivals > 0]
    finite = [v for v in ttfts if math.isfinite(v)]
    lines = [
        f"duration           {len(result.ticks) / 60:.1f} min, "
        f"{sum(t.arrivals for t in result.ticks):.0f} requests",
        f"decisions          {len(result.events)} "
        f"({sum(1 for e in result.events if e.decision.desired > e.decision.current)} up, "
        f"{sum(1 for e in result.events if e.decision.desired < e.decision.current)} down)",
        f"replicas           min {min(t.desired for t in result.ticks)}, "
        f"max {max(t.desired for t in result.ticks)}",
        f"replica-minutes    {result.replica_minutes:.1f}",
        f"SLO attainment     {result.attainment() * 100:.1f}% of requests "
        f"(TTFT <= {_ms(p.ttft_target)}, TPOT <= {_ms(p.tpot_target)})",
    ]
    if finite:
        lines.append(f"predicted TTFT     worst {max(finite) * 1000:.0f} ms")
    if result.batch is not None:
        lines.append(result.batch.summary())
    return "\n".join(lines)


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1000:.0f} ms"


def decision_lines(events: Iterable[Event]) -> list[str]:
    return [
        f"{e.time / 60:7.2f} min  {e.decision.current:>3} -> {e.decision.desired:<3} "
        f"{e.decision.reason}"
        for e in events
    ]


def plot(result: Result, path: Path, title: str = "") -> Path:
    """Load, replicas (asked for and ready) and predicted TTFT against the target, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ticks = result.ticks
    minutes = [t.time / 60 for t in ticks]
    fig, (ax_load, ax_rep, ax_ttft) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    ax_load.plot(minutes, [t.load.request_rate for t in ticks], color="tab:blue")
    ax_load.set_ylabel("requests/s")
    ax_load.set_title(title or "kvpilot autoscale simulate")
    ax_rep.step(minutes, [t.desired for t in ticks], where="post", label="asked for")
    ax_rep.step(minutes, [t.ready for t in ticks], where="post", label="ready")
    ax_rep.set_ylabel("replicas")
    ax_rep.legend(loc="upper left")
    cap = 10 * (result.params.ttft_target or 1.0)
    ttft = [min(t.ttft, cap) * 1000 if t.ttft is not None else math.nan for t in ticks]
    ax_ttft.plot(minutes, ttft, color="tab:red", label="predicted TTFT")
    if result.params.ttft_target is not None:
        ax_ttft.axhline(result.params.ttft_target * 1000, color="black", ls="--", label="target")
    ax_ttft.set_ylabel("TTFT ms (clipped)")
    ax_ttft.set_xlabel("minutes")
    ax_ttft.legend(loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def with_overrides(params: ScalingParams, **overrides: object) -> ScalingParams:
    return dataclasses.replace(params, **{k: v for k, v in overrides.items() if v is not None})
