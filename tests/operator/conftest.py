"""A local control plane (etcd, apiserver, controller-manager, scheduler; no nodes), shared by the
operator tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kvpilot_operator.localcluster import LocalCluster, ensure_binaries


@pytest.fixture(scope="session")
def cluster() -> Iterator[LocalCluster]:
    ensure_binaries()
    c = LocalCluster()
    try:
        c.start()
        yield c
    finally:
        c.stop()
