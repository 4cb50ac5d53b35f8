"""`kvpilot operator`, `crds`, `render`, `autoscale simulate`, `cluster`: the control plane's
subcommands of the one `kvpilot` command. Heavy imports (kopf, the Kubernetes client) happen
inside the commands."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def cmd_operator(ns: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import start_http_server

    from kvpilot_operator import handlers
    from kvpilot_operator.controller.kube import Kube
    from kvpilot_operator.controller.manifests import RenderOptions

    if ns.kubeconfig:
        os.environ["KUBECONFIG"] = ns.kubeconfig
    kopf.configure(
        verbose=ns.log_level == "debug",
        log_format=kopf.LogFormat.JSON if ns.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    kube = Kube.connect(ns.kubeconfig)
    handlers.State.kube = kube
    handlers.State.opts = RenderOptions(
        engine_image=ns.engine_image,
        router_image=ns.router_image,
        pdb_api_version=kube.pdb_api_version(),
        scraper_pod_labels=ns.metrics_scraper_pod_labels,
        scraper_namespace_labels=ns.metrics_scraper_namespace_labels,
    )
    from kvpilot_operator.observability.prometheus import PrometheusSource
    from kvpilot_operator.rollout.controller import RolloutController

    source = None
    try:
        _prometheus_access(ns)
    except ValueError as err:
        print(f"error: --prometheus-*: {err}", file=sys.stderr)
        return 2
    if ns.prometheus_url:
        from kvpilot_operator.autoscaler.loop import Autoscaler

        source = PrometheusSource(
            ns.prometheus_url, ns.prometheus_selector, access=_prometheus_access(ns)
        )
        handlers.State.autoscaler = Autoscaler(
            kube=kube,
            source=source,
            interval=ns.autoscale_interval,
            lock=handlers.service_lock,
        )
    # Without a Prometheus a canary cannot be judged: it waits at its first step and says why.
    handlers.State.rollouts = RolloutController(
        kube=kube,
        source=source,
        interval=ns.rollout_interval,
        lock=handlers.service_lock,
        reconcile=handlers.reconcile_now,
    )
    if ns.metrics_port:
        start_http_server(ns.metrics_port)

    health = f"http://0.0.0.0:{ns.health_port}/healthz" if ns.health_port else None

    def operate(loop: Any = None, stop_flag: Any = None) -> None:
        kopf.run(
            clusterwide=not ns.namespace,
            namespaces=ns.namespace or (),
            standalone=True,
            liveness_endpoint=health,
            loop=loop,
            stop_flag=stop_flag,
        )

    if not ns.leader_election:
        operate()
        return 0
    from kvpilot_operator.controller.leader import (
        LeaderElector,
        lease_namespace,
        replica_identity,
        run_elected,
    )

    elector = LeaderElector(
        kube,
        namespace=ns.leader_election_namespace or lease_namespace(),
        identity=replica_identity(),
        name=ns.leader_election_name,
    )
    handlers.State.identity = elector.identity
    # Exit 1 on a lost Lease: restarted, this replica waits as a follower.
    return 0 if run_elected(elector, ns.health_port, operate) else 1


def cmd_up(ns: argparse.Namespace) -> int:
    from kvpilot_operator.local import stack

    workdir = Path(ns.workdir) if ns.workdir else stack.default_workdir()
    sample = None if ns.no_sample else (Path(ns.file) if ns.file else stack.SAMPLE)
    if ns.foreground:
        return stack.run_foreground(workdir, sample, ns.containers)
    return stack.up(workdir, sample, ns.containers)


def cmd_down(ns: argparse.Namespace) -> int:
    from kvpilot_operator.local import stack

    return stack.down(Path(ns.workdir) if ns.workdir else stack.default_workdir())


def cmd_observability(ns: argparse.Namespace) -> int:
    from kvpilot_operator.observability.files import write

    stale = write(check=ns.check)
    for path in stale:
        if ns.check:
            print(f"out of date: {path} (run `kvpilot observability`)", file=sys.stderr)
        else:
            print(path)
    return 1 if ns.check and stale else 0


def _prometheus_access(ns: argparse.Namespace) -> Any:
    from kvpilot_operator.observability.connection import PrometheusAccess

    return PrometheusAccess(
        ca_file=ns.prometheus_ca_file,
        bearer_token_file=ns.prometheus_bearer_token_file,
        headers=dict(ns.prometheus_header or []),
        insecure_skip_verify=ns.prometheus_insecure_skip_verify,
    )


def _header(text: str) -> tuple[str, str]:
    from kvpilot_operator.observability.connection import parse_header

    try:
        return parse_header(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _labels(text: str) -> dict[str, str]:
    """`k=v,k2=v2` as a label map; empty is {} (a selector that matches everything)."""
    pairs = [part.strip() for part in text.split(",") if part.strip()]
    if any("=" not in p for p in pairs):
        raise argparse.ArgumentTypeError(f"expected k=v[,k2=v2], got {text!r}")
    return dict(p.split("=", 1) for p in pairs)


def cmd_crds(ns: argparse.Namespace) -> int:
    from kvpilot_operator.api.crds import (
        CRD_DIRS,
        REFERENCE,
        reference_markdown,
        render_crds,
        write_crds,
    )

    dirs = tuple(Path(d) for d in ns.out) if ns.out else CRD_DIRS
    reference = None if ns.out else REFERENCE
    if not ns.check and not ns.out and REFERENCE is None:
        print("error: outside a checkout, pass --out DIR to write the CRDs", file=sys.stderr)
        return 2
    if ns.check:
        stale = [
            str(d / name)
            for d in dirs
            for name, text in render_crds().items()
            if not (d / name).is_file() or (d / name).read_text() != text
        ]
        if reference is not None and reference.read_text() != reference_markdown():
            stale.append(str(reference))
        for path in stale:
            print(f"out of date: {path} (run `kvpilot crds`)", file=sys.stderr)
        return 1 if stale else 0
    for path in write_crds(dirs, reference):
        print(path)
    return 0


def cmd_render(ns: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from kvpilot_operator.api.policies import load_presets, parse, resolve_spec, validation_message
    from kvpilot_operator.api.types import ServingPolicy
    from kvpilot_operator.controller.manifests import RenderOptions, SpecError, render

    text = sys.stdin.read() if ns.file == "-" else Path(ns.file).read_text()
    docs: list[dict[str, Any]] = [d for d in yaml.safe_load_all(text) if d]
    policies = {name: p.spec for name, p in load_presets().items()}
    for path in ns.policy_file or []:
        for doc in yaml.safe_load_all(Path(path).read_text()):
            if doc:
                docs.append(doc)
    try:
        for doc in docs:
            if doc.get("kind") == "ServingPolicy":
                policy = ServingPolicy.model_validate(doc)
                policies[policy.metadata.name] = policy.spec
        services = [parse(d) for d in docs if d.get("kind") == "LLMService"]
    except ValidationError as err:
        print(f"error: {validation_message(err, 'spec file')}", file=sys.stderr)
        return 2
    if not services:
        print("error: no LLMService in the input", file=sys.stderr)
        return 2
    opts = RenderOptions(
        engine_image=ns.engine_image,
        router_image=ns.router_image,
        pdb_api_version=ns.pdb_api_version,
    )
    out = []
    for svc in services:
        if svc.metadata.namespace is None:
            svc.metadata.namespace = ns.namespace
        if svc.spec.policy and svc.spec.policy not in policies:
            print(
                f"error: {svc.metadata.name}: ServingPolicy {svc.spec.policy!r} not found "
                f"(presets: {', '.join(sorted(policies))}; add one with --policy-file)",
                file=sys.stderr,
            )
            return 2
        policy = policies.get(svc.spec.policy) if svc.spec.policy else None
        try:
            out += render(svc, resolve_spec(svc.spec, policy), opts)
        except (SpecError, ValidationError) as err:
            print(f"error: {svc.metadata.name}: {err}", file=sys.stderr)
            return 2
    sys.stdout.write(yaml.safe_dump_all(out, sort_keys=False))
    return 0


def cmd_cluster(ns: argparse.Namespace) -> int:
    from kvpilot_operator.local import cluster

    return cluster.main([ns.action])


def cmd_bench_operator(ns: argparse.Namespace) -> int:
    from kvpilot_operator.local import bench

    return bench.main(ns)


def _simulation_params(ns: argparse.Namespace) -> Any:
    """The resolved scaling policy: an LLMService file (with its policy), else a preset."""
    import yaml

    from kvpilot_operator.api.policies import load_presets, parse, resolve_spec
    from kvpilot_operator.autoscaler.decision import ScalingParams

    presets = {name: p.spec for name, p in load_presets().items()}
    if ns.file:
        docs = [d for d in yaml.safe_load_all(Path(ns.file).read_text()) if d]
        service = next((d for d in docs if d.get("kind") == "LLMService"), None)
        if service is None:
            raise ValueError(f"{ns.file}: no LLMService")
        service.setdefault("metadata", {}).setdefault("namespace", "default")
        svc = parse(service)
    else:
        svc = parse(
            {
                "apiVersion": "kvpilot.io/v1alpha1",
                "kind": "LLMService",
                "metadata": {"name": "simulated", "namespace": "default"},
                "spec": {"model": {"source": {"path": "model"}}, "policy": ns.policy},
            }
        )
    name = svc.spec.policy
    if name and name not in presets:
        raise ValueError(f"unknown policy {name!r} (presets: {', '.join(sorted(presets))})")
    return ScalingParams.from_spec(resolve_spec(svc.spec, presets.get(name) if name else None))


def cmd_autoscale_simulate(ns: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from kvpilot_operator.autoscaler import simulate as sim
    from kvpilot_operator.autoscaler.backlog import BatchJob
    from kvpilot_operator.router.batch.objects import window_seconds

    try:
        params = _simulation_params(ns)
        trace = sim.read_trace(Path(ns.trace))
        batch = None
        if ns.batch:
            batch = BatchJob(
                ns.batch,
                window=window_seconds(ns.batch_window),
                start=ns.batch_start,
                input_len=ns.batch_input_len,
                output_len=ns.batch_output_len,
            )
    except (ValueError, OSError, ValidationError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    engine = sim.EngineModel(
        overhead=ns.step_overhead_ms / 1000,
        per_token=ns.per_token_ms / 1000,
        max_tokens_per_step=params.max_tokens_per_step or ns.max_tokens_per_step,
        cold_start=ns.cold_start,
    )
    result = sim.simulate(
        trace,
        params,
        engine,
        interval=ns.interval,
        seed=None if ns.no_noise else ns.seed,
        batch=batch,
    )
    for line in sim.decision_lines(result.events):
        print(line)
    print(sim.summary(result))
    for n in ns.compare_fixed or []:
        fixed = sim.simulate(
            trace,
            params,
            engine,
            interval=ns.interval,
            seed=None if ns.no_noise else ns.seed,
            initial_replicas=n,
            observe=False,
            batch=batch,
        )
        print(
            f"fixed {n:<3} replicas   replica-minutes {fixed.replica_minutes:.1f}, "
            f"SLO attainment {fixed.attainment() * 100:.1f}%"
            + (f"; {fixed.batch.outcome()}" if fixed.batch else "")
        )
    if ns.out:
        title = f"{Path(ns.trace).name}: {ns.file or ns.policy}"
        print(f"plot               {sim.plot(result, Path(ns.out), title)}")
    return 0


def add_commands(sub: Any, bench: Any) -> None:
    from kvpilot_operator.api.names import PROMETHEUS_SELECTOR
    from kvpilot_operator.controller.manifests import DEFAULT_ENGINE_IMAGE, DEFAULT_ROUTER_IMAGE

    o = sub.add_parser("operator", help="run the kopf operator (LLMService -> engine pods)")
    o.add_argument("--namespace", action="append", help="watch only this namespace (repeat)")
    o.add_argument("--kubeconfig", help="default: in-cluster, then KUBECONFIG, ~/.kube/config")
    o.add_argument(
        "--engine-image", default=os.environ.get("KVPILOT_ENGINE_IMAGE", DEFAULT_ENGINE_IMAGE)
    )
    o.add_argument(
        "--router-image",
        default=os.environ.get("KVPILOT_ROUTER_IMAGE", DEFAULT_ROUTER_IMAGE),
        help="image of the routers (`kvpilot router`); the chart passes the operator's own",
    )
    o.add_argument(
        "--metrics-scraper-pod-labels",
        type=_labels,
        default={"app.kubernetes.io/name": "prometheus"},
        help="k=v,...: pods allowed past the engines' NetworkPolicy to scrape them (empty: any "
        "pod in the namespaces below; default: app.kubernetes.io/name=prometheus)",
    )
    o.add_argument(
        "--metrics-scraper-namespace-labels",
        type=_labels,
        default={},
        help="k=v,...: namespaces those pods may be in (default: empty, any namespace)",
    )
    o.add_argument("--health-port", type=int, default=8080, help="kopf /healthz; 0 disables")
    o.add_argument("--metrics-port", type=int, default=9090, help="Prometheus; 0 disables")
    o.add_argument(
        "--prometheus-url",
        default=os.environ.get("KVPILOT_PROMETHEUS_URL", ""),
        help="Prometheus that scrapes the engines; empty disables the autoscaler",
    )
    o.add_argument(
        "--prometheus-selector",
        default=PROMETHEUS_SELECTOR,
        help="PromQL label matchers of one service's series ({namespace}, {name})",
    )
    o.add_argument(
        "--prometheus-ca-file",
        default="",
        help="CA bundle (PEM) to verify an https Prometheus with (default: the system's)",
    )
    o.add_argument(
        "--prometheus-bearer-token-file",
        default="",
        help="send its content as `Authorization: Bearer`; re-read every minute (tokens rotate)",
    )
    o.add_argument(
        "--prometheus-header",
        action="append",
        type=_header,
        metavar="'NAME: VALUE'",
        help="extra header on every query, e.g. 'X-Scope-OrgID: tenant' (Thanos, Mimir); repeat",
    )
    o.add_argument(
        "--prometheus-insecure-skip-verify",
        action="store_true",
        help="do not verify the Prometheus's TLS certificate",
    )
    o.add_argument(
        "--autoscale-interval", type=float, default=15.0, help="seconds between evaluations"
    )
    o.add_argument(
        "--rollout-interval",
        type=float,
        default=5.0,
        help="seconds between canary/shadow evaluations",
    )
    o.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="act only while holding a Lease, so that one of several replicas acts "
        "(--no-leader-election: act at once, as the only replica)",
    )
    o.add_argument(
        "--leader-election-namespace",
        default="",
        help="namespace of the Lease (default: $POD_NAMESPACE, the service account's, or default)",
    )
    o.add_argument("--leader-election-name", default="kvpilot-operator", help="name of the Lease")
    o.add_argument("--log-level", default="info", choices=["debug", "info"])
    o.add_argument("--log-format", default="json", choices=["json", "plain"])
    o.set_defaults(func=cmd_operator)

    c = sub.add_parser("crds", help="write crds/*.yaml from the pydantic models")
    c.add_argument("--out", action="append", help="directory (repeat; default: crds/ and chart)")
    c.add_argument("--check", action="store_true", help="exit 1 if the files are out of date")
    c.set_defaults(func=cmd_crds)

    up = sub.add_parser(
        "up",
        help="the whole system on this machine: control plane, operator, router, Prometheus, "
        "and a SmolLM2 LLMService; prints the OpenAI base URL",
    )
    up.add_argument(
        "-f", "--file", help="LLMService to apply (default docs/examples/quickstart.yaml)"
    )
    up.add_argument("--no-sample", action="store_true", help="apply no LLMService")
    up.add_argument("--workdir", help="state, logs and data (default ~/.cache/kvpilot/stack)")
    up.add_argument("--foreground", action="store_true", help="run in this terminal until Ctrl-C")
    up.add_argument(
        "--containers",
        action="store_true",
        help="run the pods as podman containers from kvpilot's images (built first, cached) "
        "instead of local processes",
    )
    up.set_defaults(func=cmd_up)
    down = sub.add_parser("down", help="stop what `kvpilot up` started")
    down.add_argument("--workdir", help="as given to `kvpilot up`")
    down.set_defaults(func=cmd_down)

    ob = sub.add_parser(
        "observability", help="write the chart's recording rules, alerts and Grafana dashboard"
    )
    ob.add_argument("--check", action="store_true", help="exit 1 if the files are out of date")
    ob.set_defaults(func=cmd_observability)

    r = sub.add_parser("render", help="print the manifests an LLMService becomes (no cluster)")
    r.add_argument("-f", "--file", required=True, help="YAML with LLMService(s); - for stdin")
    r.add_argument("--policy-file", action="append", help="extra ServingPolicy YAML (repeat)")
    r.add_argument("--namespace", default="default")
    r.add_argument("--engine-image", default=DEFAULT_ENGINE_IMAGE)
    r.add_argument("--router-image", default=DEFAULT_ROUTER_IMAGE)
    r.add_argument(
        "--pdb-api-version", default="policy/v1", choices=["policy/v1", "policy/v1beta1"]
    )
    r.set_defaults(func=cmd_render)

    a = sub.add_parser("autoscale", help="the SLO autoscaler offline").add_subparsers(
        dest="autoscale", required=True
    )
    s = a.add_parser(
        "simulate",
        help="replay a load trace through a scaling policy against a model of engine replicas",
    )
    s.add_argument("trace", help="CSV: time,request_rate,input_len,output_len (seconds, req/s)")
    s.add_argument("-f", "--file", help="an LLMService YAML (its policy and scaling fields)")
    s.add_argument("--policy", default="interactive-chat", help="preset, when no -f is given")
    s.add_argument("--out", default="autoscale-simulation.png", help="PNG plot; '' for none")
    s.add_argument("--interval", type=float, default=15.0, help="seconds between decisions")
    s.add_argument("--step-overhead-ms", type=float, default=10.0, help="engine step, fixed")
    s.add_argument("--per-token-ms", type=float, default=0.1, help="engine step, per token")
    s.add_argument("--max-tokens-per-step", type=int, default=2048)
    s.add_argument("--cold-start", type=float, default=60.0, help="seconds until a replica serves")
    s.add_argument("--seed", type=int, default=0, help="Poisson arrivals seed")
    s.add_argument("--no-noise", action="store_true", help="exact rates instead of Poisson")
    s.add_argument(
        "--compare-fixed",
        type=int,
        action="append",
        metavar="N",
        help="also run a fixed fleet of N replicas on the same trace (repeat)",
    )
    s.add_argument(
        "--batch", type=int, metavar="N", help="also a Batch API batch of N requests (spec.batch)"
    )
    s.add_argument("--batch-start", type=float, default=0.0, help="seconds: when it arrives")
    s.add_argument("--batch-window", default="24h", help="its completion_window (24h, 90m, ...)")
    s.add_argument("--batch-input-len", type=float, default=200.0)
    s.add_argument("--batch-output-len", type=float, default=200.0)
    s.set_defaults(func=cmd_autoscale_simulate)

    k = sub.add_parser("cluster", help="a local control plane (etcd + kube-apiserver + ...)")
    k.add_argument("action", choices=["up"])
    k.set_defaults(func=cmd_cluster)

    b = bench.add_parser("operator", help="reconcile throughput on a local control plane")
    b.add_argument("--services", type=int, default=200, help="LLMServices applied at once")
    b.add_argument("--timeout", type=float, default=900.0)
    b.add_argument("--json", default=None, help="also write the figures to this file")
    b.set_defaults(func=cmd_bench_operator)

    add_router_commands(sub, bench)
    from kvpilot_operator.images.build import add_commands as add_image_commands

    add_image_commands(sub)


def cmd_router(ns: argparse.Namespace) -> int:
    from kvpilot_operator.router.server import run_router

    return run_router(ns)


def cmd_bench_router(ns: argparse.Namespace) -> int:
    from kvpilot_operator.router.bench import run_router_bench

    return run_router_bench(ns)


def cmd_bench_batch(ns: argparse.Namespace) -> int:
    from kvpilot_operator.router.batch.bench import run_batch_bench

    return run_batch_bench(ns)


def _add_engine_args(p: Any) -> None:
    """The flags router/bench.py's `engine_url` reads: a model to start, or a running engine."""
    p.add_argument("model", nargs="?", default="smollm2", help="for the engine started here")
    p.add_argument("--engine-url", help="use this running engine instead of starting one")
    p.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        help="extra `kvpilot serve` argument (repeat), e.g. --engine-arg=--dtype=bfloat16",
    )


def add_router_commands(sub: Any, bench: Any) -> None:
    """`kvpilot router`, `kvpilot bench router` and `kvpilot bench batch` (flags only: nothing
    heavy at parse time)."""
    r = sub.add_parser(
        "router", help="the OpenAI-compatible streaming proxy in front of an LLMService's engines"
    )
    r.add_argument("--host", default="0.0.0.0")
    r.add_argument("--port", type=int, default=8000)
    r.add_argument("--config", help="route JSON file, re-read when it changes (no Kubernetes)")
    r.add_argument("--namespace", help="read routes and pods of --service in this namespace")
    r.add_argument(
        "--service", help="the LLMService whose ConfigMap <service>-router and pods to use"
    )
    r.add_argument("--kubeconfig", help="default: in-cluster, then KUBECONFIG, ~/.kube/config")
    r.add_argument(
        "--refresh-interval",
        type=float,
        default=1.0,
        help="seconds between looks at the routes (the file's stamp; in a cluster, the watches' "
        "cache: no request)",
    )
    r.add_argument(
        "--scrape-interval", type=float, default=2.0, help="seconds between engine /metrics scrapes"
    )
    r.add_argument(
        "--prefix-chars",
        type=int,
        default=256,
        help="prompts at least this long go by prefix affinity (their first N characters)",
    )
    r.add_argument("--load-factor", type=float, default=1.25, help="prefix affinity's load bound")
    r.add_argument("--eject-seconds", type=float, default=5.0, help="after a refused connection")
    r.add_argument(
        "--retries", type=int, default=2, help="other endpoints tried before the first byte"
    )
    r.add_argument("--connect-timeout", type=float, default=2.0)
    r.add_argument("--request-timeout", type=float, default=600.0, help="total, seconds")
    r.add_argument("--max-in-flight", type=int, default=1024, help="requests proxied at once")
    r.add_argument(
        "--max-queue", type=int, default=1024, help="requests waiting beyond; more get 503"
    )
    r.add_argument("--queue-timeout", type=float, default=60.0, help="seconds a request may wait")
    r.add_argument(
        "--max-request-bytes",
        type=int,
        default=8 * 2**20,
        help="larger request bodies get 413, read no further (default: 8 MiB, as the engine's)",
    )
    r.add_argument(
        "--max-connections",
        type=int,
        default=4096,
        help="client connections served at once; beyond, 503 at once (default: 4096)",
    )
    r.add_argument(
        "--max-header-bytes",
        type=int,
        default=64 * 2**10,
        help="request lines and headers still incomplete past this are refused with 400 (a slow "
        "trickle, or a block longer than one read; default: 64 KiB)",
    )
    r.add_argument(
        "--header-timeout",
        type=float,
        default=30.0,
        help="seconds a client connection has to send each request's headers, from connecting or "
        "the last response; past it 408 and close (default: 30)",
    )
    r.add_argument(
        "--failover-wait",
        type=float,
        default=10.0,
        help="seconds a request refused by a draining engine waits for another endpoint",
    )
    r.add_argument(
        "--api-key",
        action="append",
        help="require Authorization: Bearer KEY on /v1/* (repeat; also KVPILOT_API_KEY=k1,k2)",
    )
    r.add_argument(
        "--default-priority",
        type=int,
        default=0,
        help="X-KVPilot-Priority sent to the engines for callers without a tier (lower first)",
    )
    r.add_argument(
        "--upstream-api-key",
        help="send Authorization: Bearer KEY to the engines and shadows, whose `kvpilot serve "
        "--api-key` it is (default: $KVPILOT_UPSTREAM_API_KEY)",
    )
    r.add_argument("--shadow-timeout", type=float, default=120.0, help="per mirrored request")
    r.add_argument("--shadow-max-concurrency", type=int, default=64, help="beyond: dropped_busy")
    r.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    from kvpilot_operator.router.batch.api import add_batch_args

    add_batch_args(r)
    r.set_defaults(func=cmd_router)

    b = bench.add_parser(
        "router", help="latency the router adds to an engine's streams, and its max requests/s"
    )
    _add_engine_args(b)
    b.add_argument("--num-requests", type=int, default=100, help="request pairs (direct, router)")
    b.add_argument("--concurrency", type=int, default=1, help="pairs in flight at once")
    b.add_argument("--max-tokens", type=int, default=16)
    b.add_argument("--prompt-words", type=int, default=32)
    b.add_argument("--trivial-requests", type=int, default=3000, help="for the max requests/s run")
    b.add_argument("--trivial-concurrency", type=int, default=64)
    b.add_argument("--json", default=None, help="also write the figures to this file")
    b.set_defaults(func=cmd_bench_router)

    bb = bench.add_parser(
        "batch",
        help="interactive TTFT alone and while a Batch API batch drains, against the SLO",
    )
    _add_engine_args(bb)
    bb.add_argument(
        "--router-url", help="a running router with the Batch API (nothing is started here)"
    )
    bb.add_argument(
        "--router-arg",
        action="append",
        default=[],
        help="extra `kvpilot router` argument (repeat), e.g. --router-arg=--batch-max-in-flight=4",
    )
    bb.add_argument(
        "--api-key", help="for a router with --api-key (default: $OPENAI_API_KEY, else none)"
    )
    bb.add_argument(
        "--duration", type=float, default=30.0, help="seconds of the interactive load alone"
    )
    bb.add_argument(
        "--concurrency", type=int, default=1, help="interactive requests in flight (default: 1)"
    )
    bb.add_argument(
        "--request-rate",
        type=float,
        default=None,
        help="instead: interactive requests/s, evenly spaced, whatever the answers' pace",
    )
    bb.add_argument("--max-tokens", type=int, default=16, help="per interactive request")
    bb.add_argument("--prompt-words", type=int, default=32, help="per request, both kinds")
    bb.add_argument("--batch-size", type=int, default=300, help="requests in the batch")
    bb.add_argument("--batch-max-tokens", type=int, default=16, help="per batch request")
    bb.add_argument(
        "--policy",
        default="interactive-chat",
        help="the preset whose TTFT SLO the interactive load is held to (default: "
        "interactive-chat, p95 <= 500 ms)",
    )
    bb.add_argument("--ttft-slo-ms", type=float, help="instead of the preset's TTFT target")
    bb.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds before the batch is cancelled"
    )
    bb.add_argument("--json", default=None, help="also write the figures to this file")
    bb.set_defaults(func=cmd_bench_batch)
