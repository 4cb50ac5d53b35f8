"""spec.adapters through the real API server and operator: the CRD takes the fields, the engine
Deployment gets the LoRA flags and one download init container per adapter source (the
credentials in that container only), an adapter canary is started in status.adapters with its
share in the routes; a broken spec is Degraded naming the field, with no engine Deployment.
(Serving and rolling adapters out with real engines: tests/router/test_adapter_engines.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kvpilot_operator.api.names import ROUTES_KEY, engine_name, router_name
from kvpilot_operator.controller.manifests import cache_dir
from kvpilot_operator.local.cluster import LocalCluster

from tests.support.kube import apply, condition, get, running_operator, service_doc, wait_for

pytestmark = pytest.mark.slow

SQL = {"uri": "s3://adapters/sql-v1", "secretName": "s3-creds", "endpoint": "http://m:9000"}
SQL_V2 = {"uri": "s3://adapters/sql-v2", "secretName": "s3-creds", "endpoint": "http://m:9000"}
HELP = {"uri": "hf://acme/help-lora"}


def test_adapters_become_engine_args_init_containers_and_routes(
    cluster: LocalCluster, ns: str, tmp_path: Path
) -> None:
    adapters = [
        {"name": "sql", "source": SQL, "canary": {"source": SQL_V2, "steps": [10, 100]}},
        {"name": "support", "servedName": "help", "source": HELP},
    ]
    engine = {"maxLoras": 2, "maxLoraRank": 16}
    broken = [{"name": "a", "source": {"path": "/x"}}, {"name": "a", "source": {"path": "/y"}}]
    with running_operator(cluster, tmp_path / "operator.log"):
        apply(cluster, service_doc("chat", replicas=0, engine=engine, adapters=adapters), ns)
        apply(cluster, service_doc("dup", replicas=0, adapters=broken), ns)

        dep = wait_for("the engine Deployment", lambda: get(cluster, "deployment",
                                                             engine_name("chat"), ns))  # fmt: skip
        pod = dep["spec"]["template"]["spec"]
        args = pod["containers"][0]["args"]
        v1, v2 = cache_dir(SQL["uri"]), cache_dir(SQL_V2["uri"])
        i = args.index("--lora-modules")
        assert args[i + 1 : i + 3] == [f"sql={v1}", f"help={cache_dir(HELP['uri'])}"]
        assert args[args.index("--max-loras") + 1] == "2"
        assert "--enable-lora" in args and "--allow-runtime-lora-updating" in args
        inits = {c["name"]: c for c in pod["initContainers"]}
        assert set(inits) == {"adapter-sql", "adapter-sql-canary", "adapter-support"}
        assert inits["adapter-sql-canary"]["args"][:2] == [SQL_V2["uri"], v2]
        refs = {
            c: [e["valueFrom"]["secretKeyRef"]["name"] for e in inits[c]["env"] if "valueFrom" in e]
            for c in inits
        }
        assert refs["adapter-support"] == [] and set(refs["adapter-sql"]) == {"s3-creds"}
        assert "s3-creds" not in json.dumps(pod["containers"])

        def started() -> dict | None:
            svc = get(cluster, "llmservice", "chat", ns) or {}
            return ((svc.get("status") or {}).get("adapters") or [None])[0]

        canary = wait_for("status.adapters", started)["canary"]
        assert (canary["phase"], canary["weight"]) == ("Progressing", 10)
        cm = get(cluster, "configmap", router_name("chat"), ns)
        assert cm is not None
        routes = {a["name"]: a for a in json.loads(cm["data"][ROUTES_KEY])["adapters"]}
        assert [(v["path"], v["weight"]) for v in routes["sql"]["variants"]] == [(v1, 90), (v2, 10)]

        def degraded() -> dict | None:
            cond = condition(get(cluster, "llmservice", "dup", ns), "Degraded")
            return cond if cond.get("status") == "True" else None

        assert "spec.adapters" in wait_for("dup Degraded", degraded)["message"]
        assert get(cluster, "deployment", engine_name("dup"), ns) is None
