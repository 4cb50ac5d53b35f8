"""`kvpilot operator`, `kvpilot crds`, `kvpilot render`, `kvpilot cluster`: the control plane's
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
    from kvpilot_operator.kube import Kube
    from kvpilot_operator.manifests import RenderOptions

    if ns.kubeconfig:
        os.environ["KUBECONFIG"] = ns.kubeconfig
    kopf.configure(
        verbose=ns.log_level == "debug",
        log_format=kopf.LogFormat.JSON if ns.log_format == "json" else kopf.LogFormat.PLAIN,
    )
    kube = Kube.connect(ns.kubeconfig)
    handlers.State.kube = kube
    handlers.State.opts = RenderOptions(
        engine_image=ns.engine_image, pdb_api_version=kube.pdb_api_version()
    )
    if ns.metrics_port:
        start_http_server(ns.metrics_port)
    kopf.run(
        clusterwide=not ns.namespace,
        namespaces=ns.namespace or (),
        standalone=True,
        liveness_endpoint=f"http://0.0.0.0:{ns.health_port}/healthz" if ns.health_port else None,
    )
    return 0


def cmd_crds(ns: argparse.Namespace) -> int:
    from kvpilot_operator.crds import (
        CRD_DIRS,
        REFERENCE,
        reference_markdown,
        render_crds,
        write_crds,
    )

    dirs = tuple(Path(d) for d in ns.out) if ns.out else CRD_DIRS
    reference = None if ns.out else REFERENCE
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

    from kvpilot_operator.api import ServingPolicy
    from kvpilot_operator.manifests import RenderOptions, SpecError, render
    from kvpilot_operator.policy import load_presets, resolve_spec
    from kvpilot_operator.reconcile import parse, validation_message

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
    opts = RenderOptions(engine_image=ns.engine_image, pdb_api_version=ns.pdb_api_version)
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
    from kvpilot_operator import localcluster

    return localcluster.main([ns.action])


def cmd_bench_operator(ns: argparse.Namespace) -> int:
    from kvpilot_operator import bench_operator

    return bench_operator.main(ns)


def add_commands(sub: Any, bench: Any) -> None:
    from kvpilot_operator.manifests import DEFAULT_ENGINE_IMAGE

    o = sub.add_parser("operator", help="run the kopf operator (LLMService -> engine pods)")
    o.add_argument("--namespace", action="append", help="watch only this namespace (repeat)")
    o.add_argument("--kubeconfig", help="default: in-cluster, then KUBECONFIG, ~/.kube/config")
    o.add_argument(
        "--engine-image", default=os.environ.get("KVPILOT_ENGINE_IMAGE", DEFAULT_ENGINE_IMAGE)
    )
    o.add_argument("--health-port", type=int, default=8080, help="kopf /healthz; 0 disables")
    o.add_argument("--metrics-port", type=int, default=9090, help="Prometheus; 0 disables")
    o.add_argument("--log-level", default="info", choices=["debug", "info"])
    o.add_argument("--log-format", default="json", choices=["json", "plain"])
    o.set_defaults(func=cmd_operator)

    c = sub.add_parser("crds", help="write crds/*.yaml from the pydantic models")
    c.add_argument("--out", action="append", help="directory (repeat; default: crds/ and chart)")
    c.add_argument("--check", action="store_true", help="exit 1 if the files are out of date")
    c.set_defaults(func=cmd_crds)

    r = sub.add_parser("render", help="print the manifests an LLMService becomes (no cluster)")
    r.add_argument("-f", "--file", required=True, help="YAML with LLMService(s); - for stdin")
    r.add_argument("--policy-file", action="append", help="extra ServingPolicy YAML (repeat)")
    r.add_argument("--namespace", default="default")
    r.add_argument("--engine-image", default=DEFAULT_ENGINE_IMAGE)
    r.add_argument(
        "--pdb-api-version", default="policy/v1", choices=["policy/v1", "policy/v1beta1"]
    )
    r.set_defaults(func=cmd_render)

    k = sub.add_parser("cluster", help="a local control plane (etcd + kube-apiserver + ...)")
    k.add_argument("action", choices=["up"])
    k.set_defaults(func=cmd_cluster)

    b = bench.add_parser("operator", help="reconcile throughput on a local control plane")
    b.add_argument("--services", type=int, default=200, help="LLMServices applied at once")
    b.add_argument("--timeout", type=float, default=900.0)
    b.add_argument("--json", default=None, help="also write the figures to this file")
    b.set_defaults(func=cmd_bench_operator)
