"""A local control plane (etcd, apiserver, controller-manager, scheduler; no nodes), shared by the
operator tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kvpilot_operator.local.cluster import LocalCluster, ensure_binaries
from kvpilot_operator.local.prometheus import LocalPrometheus

from tests.support.helm import INSTALL_HINT, cached_helm, find_helm
from tests.support.kube import wait_for


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    ensure_binaries()
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()


@pytest.fixture
def ns(cluster: LocalCluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, named after it."""
    name = "t-" + request.node.name.replace("_", "-").lower()[5:40].strip("-")
    cluster.kubectl("create", "namespace", name)
    # Pods are refused until the token controller has given the namespace's default service
    # account its token, which takes a while on a busy machine.
    wait_for(
        f"the default service account's token in {name}",
        lambda: cluster.kubectl(
            "get", "serviceaccount", "default", "-n", name, "-o", "jsonpath={.secrets}",
            check=False,
        ).stdout.strip(),
        timeout=60,
    )  # fmt: skip
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture(scope="module")
def prometheus() -> Iterator[LocalPrometheus]:
    """A real Prometheus scraping what each test points it at (set_targets), 1 s scrapes."""
    with LocalPrometheus(scrape_interval=1.0) as prom:
        yield prom


@pytest.fixture(scope="module")
def helm() -> str:
    """A Helm 3 binary (tests/support/helm.py), or a skip that says how to get one."""
    path = find_helm()
    if path is None:
        pytest.skip(f"no Helm 3 binary ($KVPILOT_HELM, PATH, {cached_helm()}); run {INSTALL_HINT}")
    return path
