"""The whole system on one machine, as `kvpilot up` runs it: the local control plane, the
operator (autoscaler and rollouts), Prometheus discovering the pods through the API server and
evaluating the chart's rules, the node agent running engines and routers as local processes,
and the official `openai` client as the user.

One scenario: apply an LLMService -> Ready; chat through the router; a load ramp adds a replica
and its end removes it; a canary revision is promoted; a shadow reports agreement; every query of
the shipped dashboard returns data; two LoRA adapters answer by name, a canary of one promoted
and a broken canary of the other rolled back; deleting the LLMService leaves no object and no
process.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kvpilot_operator.local.stack import Stack
from kvpilot_operator.observability.dashboard import dashboard_queries

from tests.support.kube import Users, wait_for
from tests.support.lora import write_adapter, write_corrupt_adapter

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
NAME = "chat"
TOPIC = "Tell me about the number {i}{n}."

SERVICE = {
    "apiVersion": "kvpilot.io/v1alpha1",
    "kind": "LLMService",
    "metadata": {"name": NAME},
    "spec": {
        "model": {
            "source": {"path": "smollm2"},
            "servedName": "smollm2",
            "dtype": "float32",
            "maxContext": 512,
        },
        "quantization": "none",
        "engine": {"kvCacheMemory": "64MiB", "maxNumSeqs": 16, "drainTimeoutSeconds": 5},
        # Tight enough that eight streams on two shared cores breach it.
        "slo": {
            "ttft": {"percentile": 95, "targetMs": 300},
            "tpot": {"percentile": 95, "targetMs": 40},
            "window": "1m",
        },
        "scaling": {
            "minReplicas": 1,
            "maxReplicas": 2,
            "stableWindowSeconds": 20,
            "panicWindowSeconds": 10,
            "scaleUpCooldownSeconds": 0,
            "scaleDownCooldownSeconds": 0,
        },
        "rollout": {
            "canary": {
                "steps": [50, 100],
                "stepSeconds": 10,
                "maxTtftRegression": 1.0,
                "maxTpotRegression": 1.0,
            }
        },
    },
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack")
    sample = workdir / "chat.yaml"
    sample.write_text(yaml.safe_dump(SERVICE))
    s = Stack(workdir=workdir, sample=sample, autoscale_interval=2.0, scrape_interval=1.0)
    s.start()
    try:
        yield s
    finally:
        s.stop()


def status(stack: Stack) -> dict[str, Any]:
    return (stack.get("llmservice", NAME) or {}).get("status") or {}


def spec_replicas(stack: Stack) -> int | None:
    return ((stack.get("llmservice", NAME) or {}).get("spec") or {}).get("replicas")


def test_whole_system(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> None:
    from openai import OpenAI

    # 1. Ready, and the openai client chats through the router.
    assert status(stack)["readyReplicas"] == 1
    url = stack.router_url(NAME)
    assert url is not None
    client = OpenAI(base_url=url, api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["smollm2"]
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=16,
        temperature=0,
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0

    # 2. A load ramp breaches the SLO: the autoscaler adds a replica; its end removes it.
    load = Users(url, workers=8, model="smollm2", max_tokens=24, prompt=TOPIC)
    try:
        wait_for("a scale-up", lambda: (spec_replicas(stack) or 1) >= 2, timeout=180)
        wait_for("two ready engines", lambda: status(stack).get("readyReplicas") == 2, 180)
    finally:
        load.stop()
    assert load.errors == [], load.errors[:3]
    decisions = status(stack)["lastDecisions"]
    assert decisions[0]["from"] == 1 and decisions[0]["to"] == 2
    wait_for("the scale-down", lambda: spec_replicas(stack) == 1, timeout=180)
    wait_for("one engine", lambda: status(stack).get("replicas") == 1, timeout=120)

    # 3. A canary revision is promoted (users keep streaming through it).
    load = Users(url, workers=3, model="smollm2", max_tokens=8, prompt=TOPIC)
    try:
        doc = {**SERVICE, "spec": {**SERVICE["spec"]}}
        doc["spec"]["engine"] = {**SERVICE["spec"]["engine"], "maxWaiting": 200}
        stack.kubectl("apply", "-n", stack.namespace, "-f", "-", input=yaml.safe_dump(doc))
        wait_for("a canary", lambda: (status(stack).get("canary") or {}).get("phase"))
        revision = status(stack)["canary"]["revision"]
        try:
            wait_for(
                "the promotion",
                lambda: (status(stack).get("canary") or {}).get("phase") == "Promoted",
                timeout=300,
            )
        except AssertionError as e:  # say where the rollout stood
            raise AssertionError(f"{e}; status.canary: {status(stack).get('canary')}") from None
        wait_for("the new stable revision", lambda: status(stack)["stableRevision"] == revision)

        # 4. A shadow with the same settings agrees on every greedy request.
        doc["spec"]["rollout"] = {**doc["spec"]["rollout"], "shadow": {"mirrorPercent": 100}}
        stack.kubectl("apply", "-n", stack.namespace, "-f", "-", input=yaml.safe_dump(doc))
        shadow = wait_for(
            "shadow comparisons",
            lambda: (lambda s: s if s.get("greedyCompared", 0) >= 5 else None)(
                status(stack).get("shadow") or {}
            ),
            timeout=240,
        )
        # >= 0.9, not 1.0: batch composition differs between the engines (see
        # tests/operator/test_rollout_cluster.py)
        assert shadow["greedyAgreement"] >= 0.9, shadow
        healthy = next(c for c in status(stack)["conditions"] if c["type"] == "ShadowHealthy")
        assert healthy["status"] == "True"

        # 5. Every query of the shipped dashboard returns data from this Prometheus, but the
        # Batch API's and the LoRA adapters' panels: this service has no spec.batch and no
        # spec.adapters, so its routers export neither series (tests/router/test_batch_api.py
        # and tests/router/test_adapter_engines.py check those metrics).
        prom = stack.prometheus
        assert prom is not None
        queries = [
            q
            for q in dashboard_queries()
            if "kvpilot_batch_" not in q and "kvpilot_router_adapter_" not in q
        ]
        assert len(queries) < len(dashboard_queries())  # the filter matches what it means to

        def empty_queries() -> list[str] | None:
            missing = []
            for q in queries:
                expr = q.replace("$namespace", stack.namespace).replace("$llmservice", NAME)
                if not prom.query(expr.replace("$__rate_interval", "1m")):
                    missing.append(expr)
            return missing or None

        deadline = time.monotonic() + 120
        while (missing := empty_queries()) and time.monotonic() < deadline:
            time.sleep(3)
        assert not missing, missing
    finally:
        load.stop()
    assert load.errors == [], load.errors[:3]

    # 6. Two LoRA adapters answer by name through the router; a new version of sql is promoted
    # as a canary, a broken version of help (weights that are not a safetensors file) is rolled
    # back on its errors. Adding adapters rolls the engines in place, not as a model canary.
    loras = tmp_path_factory.mktemp("loras")
    sql, sql_v2 = write_adapter(loras / "sql", seed=1), write_adapter(loras / "sql-v2", seed=2)
    help_, broken = write_adapter(loras / "help", seed=3), write_corrupt_adapter(loras / "bad")
    steps = {"steps": [50, 100], "stepSeconds": 10, "maxTtftRegression": 3.0,
             "maxTpotRegression": 3.0}  # fmt: skip
    doc["spec"]["adapters"] = [
        {"name": "sql", "source": {"path": str(sql)},
         "canary": {**steps, "source": {"path": str(sql_v2)}}},
        {"name": "help", "source": {"path": str(help_)},
         "canary": {**steps, "source": {"path": str(broken)}}},
    ]  # fmt: skip
    stack.kubectl("apply", "-n", stack.namespace, "-f", "-", input=yaml.safe_dump(doc))

    def serving_adapters() -> bool:
        try:
            ids = {m.id for m in client.models.list().data}
        except Exception:
            return False
        return {"sql", "help"} <= ids and status(stack).get("readyReplicas") == 1

    wait_for("engines with the adapters", serving_adapters, timeout=300)
    assert status(stack)["canary"]["revision"] == revision  # no model canary for adapters
    for model in ("sql", "help"):
        reply = client.completions.create(model=model, prompt="SELECT", max_tokens=4)
        assert reply.choices[0].text, model
    sql_users = Users(url, workers=2, model="sql", max_tokens=4, prompt=TOPIC)
    help_users = Users(url, workers=2, model="help", max_tokens=4, prompt=TOPIC)

    def phases() -> dict[str, str] | None:
        found = {a["name"]: a["canary"]["phase"] for a in status(stack).get("adapters") or []}
        return found if found == {"sql": "Promoted", "help": "RolledBack"} else None

    try:
        wait_for("the adapter canaries' verdicts", phases, timeout=300)
    except AssertionError as e:
        raise AssertionError(f"{e}; status.adapters: {status(stack).get('adapters')}") from None
    finally:
        sql_users.stop()
        help_users.stop()
    assert sql_users.errors == [], sql_users.errors[:3]
    assert help_users.errors and all("502" in e for e in help_users.errors), help_users.errors[:3]

    # 7. Deleting the LLMService leaves no object and no process behind.
    assert stack.agent is not None
    pids = [p.proc.pid for p in stack.agent.pods.values()]
    assert len(pids) >= 3  # engine, shadow, router
    stack.kubectl("delete", "llmservice", NAME, "-n", stack.namespace, "--wait=true")

    def leftovers() -> str:
        kinds = (
            "deployments,replicasets,pods,services,configmaps,serviceaccounts,roles,"
            "rolebindings,pdb"
        )
        out = stack.kubectl(
            "get", kinds, "-n", stack.namespace, "-l", f"kvpilot.io/llmservice={NAME}", "-o", "name"
        )
        return out.strip()

    wait_for("no objects left", lambda: leftovers() == "", timeout=120)
    wait_for("no pod processes", lambda: stack.agent.pods == {}, timeout=60)  # type: ignore[union-attr]

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return (
            Path(f"/proc/{pid}").exists()
            and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
        )

    wait_for("the pods' processes to exit", lambda: not any(alive(p) for p in pids), timeout=60)
