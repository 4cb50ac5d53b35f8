"""Real engines (`kvpilot serve` with SmolLM2) and real `kvpilot router` processes on loopback.

Engines are shared by the router tests and stopped when they are done (package scope: each takes
~1 GB, and no more than three may run at once): two fast ones and one slowed by
`--inject-step-delay`. Routers are cheap and start per test, each with a static route file that
a test may rewrite to move traffic live.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.engine import Server, run_server
from tests.support.router import SLOW_STEP_S


@pytest.fixture(scope="package")
def engine_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("engine_a") / "serve.log", "--max-num-seqs", "16") as s:
        yield s


@pytest.fixture(scope="package")
def engine_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(tmp_path_factory.mktemp("engine_b") / "serve.log", "--max-num-seqs", "16") as s:
        yield s


@pytest.fixture(scope="package")
def slow_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("engine_slow") / "serve.log"
    with run_server(log, "--max-num-seqs", "8", "--inject-step-delay", str(SLOW_STEP_S)) as s:
        yield s


