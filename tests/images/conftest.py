"""The images under test, built (or found cached) once per session with `kvpilot images build`:
the same command CI's install runs, so here it is a cache hit of a few seconds."""

from __future__ import annotations

import pytest
from kvpilot_operator.images.runtime import DEBIAN_TOOLS, container_env, missing_tools


@pytest.fixture(scope="session")
def images() -> dict[str, str]:
    """name -> tag of the operator and CPU engine images."""
    from kvpilot_operator.images.build import build
    from kvpilot_operator.packaged import source_tree

    if missing := missing_tools(DEBIAN_TOOLS):
        pytest.fail(f"missing {', '.join(missing)}: `bash .ci/install` installs them")
    root = source_tree()
    assert root is not None, "the image tests run from a checkout"
    return build(("operator", "engine-cpu"), root=root)


@pytest.fixture(scope="session")
def podman_env() -> dict[str, str]:
    return container_env()
