"""A real `kvpilot serve` subprocess on loopback, shared by the server tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.engine import Server, run_server


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with run_server(log, "--max-num-seqs", "8", "--max-waiting", "64") as s:
        yield s


@pytest.fixture(scope="session")
def base_url(server: Server) -> str:
    return server.url


