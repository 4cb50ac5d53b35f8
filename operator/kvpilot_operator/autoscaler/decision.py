"""The autoscaler's decision: a pure function of what Prometheus showed and the service's policy.

`decide(params, state, obs) -> (Decision, new state)`. No I/O, no clock: the loop in
`loop.py`, the unit tests and `kvpilot autoscale simulate` all drive this same function.

Two signals, combined:

- A capacity model. Each engine step costs `overhead + per_token * tokens` seconds (fitted from the
  engines' `kvpilot_engine_step_*` histograms). Holding TPOT at its target bounds a step's length,
  hence its tokens, hence a replica's token throughput at the SLO. Demand (arrivals x tokens per
  request, plus the backlog to drain) over that capacity is the replica count, reached in one move.
  With speculative decoding a step's tokens include the drafts it verified; the rejected ones are
  work that yields no token, so capacity in served tokens is the step capacity divided by
  1 + (rejected drafts per served token), measured from vLLM's spec_decode counters.
- SLO feedback. A TTFT/TPOT percentile above its target (beyond the tolerance band) forces at least
  one more replica even when the model disagrees (the model is then wrong); scaling down needs the
  percentiles comfortably inside the target for the whole stable window.

Guards: scale-down takes the highest recommendation of the stable window (no flapping); scale-up
waits out its cooldown unless the short (panic) window shows load beyond `panic_threshold` times
the ready capacity; step rates and min/max bound every move; replicas still starting are not
capacity, and SLO feedback never stacks on a scale-up still in flight; missing data holds.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from kvpilot_operator.api.types import LLMServiceSpec

# Points of the step-time fit kept (one per evaluation); older load levels still inform the slope.
MAX_FIT_POINTS = 240
# A step-time fit needs this relative spread of tokens per step; below it the points sit on top of
# each other and only the through-origin estimate (overhead folded into the slope) is safe.
MIN_FIT_SPREAD = 0.25
# Idle (scale-to-zero) means no arrivals and nothing queued or running.
IDLE_RATE = 1e-3


@dataclass(frozen=True)
class ScalingParams:
    """The resolved spec's SLO and scaling fields, in seconds."""

    min_replicas: int = 1
    max_replicas: int = 4
    scale_to_zero: bool = False
    idle_seconds: float = 600.0
    advisory: bool = False
    stable_window: float = 120.0
    panic_window: float = 15.0
    panic_threshold: float = 2.0
    tolerance: float = 0.1
    up_cooldown: float = 30.0
    down_cooldown: float = 300.0
    max_up_rate: float = 4.0
    max_down_rate: float = 2.0
    target_utilization: float = 0.8
    ttft_target: float | None = 1.0
    ttft_percentile: int = 95
    tpot_target: float | None = 0.1
    tpot_percentile: int = 95
    max_tokens_per_step: int | None = None

    @classmethod
    def from_spec(cls, spec: LLMServiceSpec) -> ScalingParams:
        """From a spec already passed through `api.policies.resolve_spec` (every field set)."""
        s, slo = spec.scaling, spec.slo
        assert s is not None and slo is not None
        engine = spec.engine
        return cls(
            min_replicas=s.min_replicas if s.min_replicas is not None else 1,
            max_replicas=s.max_replicas if s.max_replicas is not None else 4,
            scale_to_zero=bool(s.scale_to_zero),
            idle_seconds=float(s.idle_seconds or 600),
            advisory=s.mode == "advisory",
            stable_window=float(s.stable_window_seconds or 120),
            panic_window=float(s.panic_window_seconds or 15),
            panic_threshold=s.panic_threshold or 2.0,
            tolerance=s.tolerance if s.tolerance is not None else 0.1,
            up_cooldown=float(s.scale_up_cooldown_seconds or 0),
            down_cooldown=float(s.scale_down_cooldown_seconds or 0),
            max_up_rate=s.max_scale_up_rate or 4.0,
            max_down_rate=s.max_scale_down_rate or 2.0,
            target_utilization=s.target_utilization or 0.8,
            ttft_target=slo.ttft.target_ms / 1000 if slo.ttft else None,
            ttft_percentile=slo.ttft.percentile if slo.ttft else 95,
            tpot_target=slo.tpot.target_ms / 1000 if slo.tpot else None,
            tpot_percentile=slo.tpot.percentile if slo.tpot else 95,
            max_tokens_per_step=engine.max_num_batched_tokens if engine else None,
        )


@dataclass(frozen=True)
class Window:
    """The engines of one service over one time window (sums over replicas unless noted)."""

    request_rate: float  # arrivals per second (accepted and rejected)
    token_rate: float = 0.0  # prompt + generated tokens per second
    tokens_per_request: float | None = None  # prompt + output tokens of a finished request
    waiting: float = 0.0  # requests queued (engines, and the router's queue when scaled to zero)
    running: float = 0.0
    ttft: float | None = None  # the SLO percentile, seconds; None when no request got a token
    tpot: float | None = None
    step_time: float | None = None  # mean wall time of one engine step
    step_tokens: float | None = None  # mean tokens (prefill + decode + drafts) in one step
    kv_usage: float | None = None  # mean over replicas, 0..1
    draft_rate: float = 0.0  # speculative draft tokens verified per second
    accepted_rate: float = 0.0  # of which accepted (each an output token)

    @property
    def rejected_share(self) -> float:
        """Rejected drafts per prompt or output token: step work that served nothing."""
        rejected = max(0.0, self.draft_rate - self.accepted_rate)
        return rejected / self.token_rate if self.token_rate > 0 else 0.0


@dataclass(frozen=True)
class Observation:
    time: float  # seconds, any monotonic origin
    replicas: int  # spec.replicas as last written (the current desired count)
    ready: int  # replicas serving; the others are starting and are not capacity
    short: Window | None = None  # the panic window
    long: Window | None = None  # the stable window
    # Set when there is nothing trustworthy to decide on: (reason, message).
    missing: tuple[str, str] | None = None


@dataclass(frozen=True)
class StepModel:
    """step_time = overhead + per_token * tokens."""

    overhead: float
    per_token: float
    confident: bool = True  # fitted over several load levels, not extrapolated from one

    def capacity(self, tpot_target: float | None, max_tokens: int | None) -> float:
        """Tokens per second one replica sustains with steps no longer than the TPOT target."""
        limit = max_tokens or math.inf
        if tpot_target is not None and tpot_target > self.overhead:
            limit = min(limit, (tpot_target - self.overhead) / self.per_token)
        if math.isinf(limit):
            return 1.0 / self.per_token
        return limit / (self.overhead + self.per_token * limit)


def fit_step_model(points: tuple[tuple[float, float], ...]) -> StepModel | None:
    """Least squares over (tokens per step, seconds per step); falls back to a line through the
    origin (all time per token: a lower, so safe, capacity; `confident` False) when the points do
    not spread."""
    pts = [(x, y) for x, y in points if x > 0 and y > 0]
    if not pts:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    if n >= 3 and math.sqrt(sxx / n) >= MIN_FIT_SPREAD * mx:
        slope = sum((x - mx) * (y - my) for x, y in pts) / sxx
        overhead = my - slope * mx
        if slope > 0 and overhead >= 0:
            return StepModel(overhead, slope, confident=True)
    return StepModel(0.0, my / mx, confident=False)


@dataclass(frozen=True)
class ScalerState:
    """What the loop carries between evaluations (replaced, never mutated)."""

    recommendations: tuple[tuple[float, int], ...] = ()  # (time, replicas) over the stable window
    fit_points: tuple[tuple[float, float], ...] = ()
    started: float | None = None  # first observation with data
    last_active: float | None = None
    last_up: float | None = None
    last_down: float | None = None
    settled_since: float | None = None  # since when every replica asked for has been ready
    last_waiting: float | None = None  # queue length at the previous evaluation
    panic_until: float | None = None


@dataclass(frozen=True)
class Decision:
    desired: int
    current: int
    reason: str
    # Conditions (status, reason, message): ScalingActive, AbleToScale, SLOMet.
    scaling_active: tuple[str, str, str]
    able_to_scale: tuple[str, str, str]
    slo_met: tuple[str, str, str]
    capacity: float | None = None  # tokens/s per replica at the SLO
    required: float | None = None  # replicas the capacity model asks for (short window)
    panic: bool = False
    details: dict[str, float] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return self.desired != self.current


def _ratio(value: float | None, target: float | None) -> float | None:
    if value is None or target is None or math.isnan(value):
        return None
    return value / target


def slo_ratios(params: ScalingParams, w: Window) -> dict[str, float]:
    """Measured percentile over target, per SLO that has both."""
    out = {}
    for name, value, target in (
        ("ttft", w.ttft, params.ttft_target),
        ("tpot", w.tpot, params.tpot_target),
    ):
        r = _ratio(value, target)
        if r is not None:
            out[name] = r
    return out


def demand_tokens(params: ScalingParams, w: Window, backlog: bool = True) -> float:
    """Tokens per second the service must process: arrivals plus the queue, drained over the
    stable window. Not what the engines processed: that is capped by today's capacity and
    inflated while a backlog drains."""
    per_request = w.tokens_per_request or 0.0
    arriving = w.request_rate * per_request
    if not backlog:
        return arriving
    return arriving + w.waiting * per_request / params.stable_window


def required_replicas(
    params: ScalingParams, w: Window, capacity: float | None, backlog: bool = True
) -> float | None:
    if capacity is None or capacity <= 0 or not w.tokens_per_request:
        return None
    return demand_tokens(params, w, backlog) / (capacity * params.target_utilization)


def slo_condition(params: ScalingParams, w: Window | None) -> tuple[str, str, str]:
    if w is None:
        return ("Unknown", "NoMetrics", "no latency measured yet")
    ratios = slo_ratios(params, w)
    if not ratios:
        return ("Unknown", "NoTraffic", "no request finished its first token in the window")
    parts = []
    for name, value, target, pct in (
        ("TTFT", w.ttft, params.ttft_target, params.ttft_percentile),
        ("TPOT", w.tpot, params.tpot_target, params.tpot_percentile),
    ):
        if value is not None and target is not None and not math.isnan(value):
            parts.append(f"{name} p{pct} {value * 1000:.0f}ms (target {target * 1000:.0f}ms)")
    breached = [k for k, r in ratios.items() if r > 1.0]
    if breached:
        return ("False", "SLOBreached", "; ".join(parts))
    return ("True", "WithinSLO", "; ".join(parts))


def _hold(
    params: ScalingParams,
    state: ScalerState,
    obs: Observation,
    reason: str,
    message: str,
) -> tuple[Decision, ScalerState]:
    return (
        Decision(
            desired=obs.replicas,
            current=obs.replicas,
            reason=message,
            scaling_active=("False", reason, message),
            able_to_scale=("True", "ReadyForNewScale", "holding the current replicas"),
            slo_met=("Unknown", reason, message),
        ),
        state,
    )


def decide(
    params: ScalingParams, state: ScalerState, obs: Observation
) -> tuple[Decision, ScalerState]:
    """One evaluation. `obs.replicas` is the count in force; the decision says what it should be."""
    if obs.missing is not None:
        return _hold(params, state, obs, *obs.missing)
    current, now = obs.replicas, obs.time
    short, long = obs.short, obs.long
    if current > 0 and (short is None or long is None):
        return _hold(params, state, obs, "NoMetrics", "no engine metrics in Prometheus")

    started = state.started if state.started is not None else now
    busy = [w for w in (short, long) if w is not None]
    active = any(w.request_rate > IDLE_RATE or w.waiting > 0 or w.running > 0 for w in busy)
    last_active = now if active or state.last_active is None else state.last_active
    state = dataclasses.replace(state, started=started, last_active=last_active)
    slo_met = slo_condition(params, long)
    active_cond = ("True", "ValidMetrics", "deciding on engine metrics from Prometheus")

    if current == 0:
        # Scaled to zero: the only signal is a queue (the router's) waiting for a replica.
        queued = short.waiting if short is not None else 0.0
        if queued > 0 or (short is not None and short.request_rate > IDLE_RATE):
            desired = max(1, params.min_replicas)
            return (
                Decision(
                    desired=desired,
                    current=0,
                    reason=f"waking from zero: {queued:.0f} requests queued",
                    scaling_active=active_cond,
                    able_to_scale=("True", "ReadyForNewScale", "waking from zero"),
                    slo_met=slo_met,
                ),
                dataclasses.replace(state, last_up=now, last_active=now, recommendations=()),
            )
        return (
            Decision(
                desired=0,
                current=0,
                reason="scaled to zero, no requests",
                scaling_active=("False", "ScaledToZero", "no replicas: waiting for requests"),
                able_to_scale=("True", "ReadyForNewScale", "waiting for requests"),
                slo_met=slo_met,
            ),
            state,
        )
    assert short is not None and long is not None

    # Capacity model: fit step time against tokens per step, over every load level seen.
    points = state.fit_points
    if short.step_time and short.step_tokens:
        points = (*points, (short.step_tokens, short.step_time))[-MAX_FIT_POINTS:]
    state = dataclasses.replace(state, fit_points=points)
    model = fit_step_model(points)
    capacity = model.capacity(params.tpot_target, params.max_tokens_per_step) if model else None
    if capacity is not None:
        # In served tokens: the fit counts verified drafts as step tokens, rejected ones included.
        capacity /= 1.0 + long.rejected_share
    in_flight = obs.ready < current  # replicas still starting: not capacity yet
    settled_since = state.settled_since if state.settled_since is not None else now
    settled_since = None if in_flight else settled_since
    state = dataclasses.replace(state, settled_since=settled_since)
    # Latency and queues from before the last replicas came up say little about the replicas now
    # serving: SLO feedback and the backlog term wait until one short window has passed with all
    # of them ready (counting a queue built during a cold start would stack a second scale-up on
    # the first, which is already on its way to drain it).
    settled = settled_since is not None and now - settled_since >= params.panic_window
    req_short = required_replicas(params, short, capacity, backlog=settled)
    ratios_short = slo_ratios(params, short)
    worst_short = max(ratios_short.values(), default=0.0)
    breach = worst_short > 1.0 + params.tolerance
    comfortable_short = all(r <= 1.0 - params.tolerance for r in ratios_short.values())
    ready_capacity = (capacity or 0.0) * obs.ready
    demand = demand_tokens(params, short)
    overload = (
        capacity is not None and demand > 0 and demand >= params.panic_threshold * (ready_capacity)
    )
    panic = overload or (settled and worst_short >= params.panic_threshold)
    panic = panic or (state.panic_until is not None and now < state.panic_until)
    if panic and (state.panic_until is None or now >= state.panic_until):
        state = dataclasses.replace(state, panic_until=now + params.stable_window)

    # --- up: one move to what the model asks for; at least one more on a breach ----------------
    up, up_why = current, []
    # An extrapolated (not fitted) model underestimates capacity: it may add replicas only when
    # latency is no longer comfortable.
    trust = model is not None and (model.confident or not comfortable_short or overload)
    if trust and req_short is not None and req_short > current * (1 + params.tolerance):
        up = math.ceil(req_short)
        up_why.append(f"load needs {req_short:.1f} replicas at {capacity:.0f} tok/s each")
    # A queue that is shrinking will take the latency back inside the SLO by itself.
    draining = state.last_waiting is not None and short.waiting < state.last_waiting
    state = dataclasses.replace(state, last_waiting=short.waiting)
    if breach and settled and not draining:
        # A fitted model that says "enough" is off by a little: one more. Without one, grow in
        # proportion to the breach, at most doubling.
        proportional = math.ceil(current * min(worst_short, 2.0))
        feedback = current + 1 if model is not None and model.confident else proportional
        feedback = max(current + 1, feedback)
        if feedback > up:
            up = feedback
            up_why.append(
                ", ".join(f"{k.upper()} at {r:.2f}x target" for k, r in ratios_short.items())
            )
    up = min(up, max(current + 1, math.floor(current * params.max_up_rate)), params.max_replicas)
    if current < params.min_replicas:
        up, up_why = max(up, params.min_replicas), [*up_why, "below minReplicas"]

    # --- down: the highest recommendation of the stable window, and only inside the SLO ---------
    ratios_long = slo_ratios(params, long)
    # Traffic without a single latency sample (every request stuck before its first token) is
    # not comfort: only measured latency inside the band, or no traffic at all, allows a step down.
    measured = bool(ratios_long) or long.request_rate <= IDLE_RATE
    comfortable = (
        measured and all(r <= 1.0 - params.tolerance for r in ratios_long.values()) and not breach
    )
    if req_short is not None and comfortable:
        # The short window's need; the max over the stable window below is the smoothing.
        rec = max(math.ceil(req_short), params.min_replicas, 1)
    elif comfortable and not ratios_long and not active:
        rec = max(params.min_replicas, 1)  # no traffic at all: the floor
    else:
        rec = current
    recs = tuple((t, r) for t, r in state.recommendations if t > now - params.stable_window)
    recs = (*recs, (now, max(rec, up) if up > current else rec))
    state = dataclasses.replace(state, recommendations=recs)
    window_full = now - started >= params.stable_window
    stable_rec = max(r for _, r in recs)

    details = {"stable_recommendation": float(stable_rec)}
    details.update({f"{k}_ratio": r for k, r in ratios_short.items()})
    if model is not None:
        details.update(step_overhead_s=model.overhead, step_per_token_s=model.per_token)
    if long.draft_rate > 0:
        details["spec_rejected_share"] = long.rejected_share
    ready_for_new = ("True", "ReadyForNewScale", "the last scaling has taken effect")
    base = Decision(
        desired=current,
        current=current,
        reason="steady",
        scaling_active=active_cond,
        able_to_scale=ready_for_new,
        slo_met=slo_met,
        capacity=capacity,
        required=req_short,
        panic=panic,
        details=details,
    )

    def decision(desired: int, reason: str, able: tuple[str, str, str]) -> Decision:
        return dataclasses.replace(base, desired=desired, reason=reason, able_to_scale=able)

    if current > params.max_replicas:
        return decision(params.max_replicas, "above maxReplicas", ready_for_new), state
    if up > current:
        cooling = state.last_up is not None and now - state.last_up < params.up_cooldown
        if cooling and not panic and current >= params.min_replicas:
            left = params.up_cooldown - (now - state.last_up)  # type: ignore[operator]
            msg = f"scale-up to {up} waits {left:.0f}s more (scale-up cooldown)"
            return decision(current, msg, ("False", "ScaleUpCooldown", msg)), state
        reason = "; ".join(up_why) or "scale up"
        if panic:
            reason = f"panic: {reason}"
        new = dataclasses.replace(state, last_up=now)
        return decision(up, reason, ready_for_new), new

    if params.scale_to_zero and not active and now - last_active >= params.idle_seconds:
        reason = f"idle for {now - last_active:.0f}s: scaling to zero"
        return decision(0, reason, ready_for_new), dataclasses.replace(state, last_down=now)

    if stable_rec < current and not panic and window_full:
        last_change = max(t for t in (state.last_up, state.last_down, started) if t is not None)
        if now - last_change < params.down_cooldown:
            left = params.down_cooldown - (now - last_change)
            msg = f"scale-down to {stable_rec} waits {left:.0f}s more (scale-down cooldown)"
            return decision(current, msg, ("False", "ScaleDownCooldown", msg)), state
        floor_rate = math.ceil(current / params.max_down_rate)
        down = max(stable_rec, floor_rate, params.min_replicas)
        if down < current:
            reason = f"load inside the SLO has needed at most {stable_rec} over the stable window"
            if down > stable_rec:
                reason += f" (maxScaleDownRate {params.max_down_rate:g} per move)"
            return decision(down, reason, ready_for_new), dataclasses.replace(state, last_down=now)

    if in_flight:
        msg = f"waiting for {current - obs.ready} starting replicas"
        return decision(current, msg, ("False", "ScaleInProgress", msg)), state
    if stable_rec < current and not window_full:
        msg = "stabilising: the stable window has not passed since the autoscaler started"
        return decision(current, msg, ("True", "ScaleDownStabilized", msg)), state
    return base, state
