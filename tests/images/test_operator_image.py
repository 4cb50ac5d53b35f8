"""The operator image runs `kvpilot render` and `kvpilot crds --check` from its installed wheel
(no checkout inside: the CRDs, presets and examples are the wheel's data files), read-only and as
uid 65532, and carries no torch."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml
from kvpilot_operator.images.runtime import podman_run_args

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "docs" / "examples" / "quickstart.yaml"


def _run(image: str, env: dict[str, str], command: list[str], **kw) -> subprocess.CompletedProcess:
    argv = podman_run_args(image, command=command, **kw)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)


def test_render_from_the_wheel(images: dict[str, str], podman_env: dict[str, str]) -> None:
    inside = _run(
        images["operator"],
        podman_env,
        ["render", "-f", "/in/quickstart.yaml"],
        volumes=[f"{QUICKSTART}:/in/quickstart.yaml:ro"],
    )
    assert inside.returncode == 0, inside.stderr
    here = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "kvpilot"), "render", "-f", str(QUICKSTART)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    # The image is built from the last commit, this checkout may be ahead of it: the same
    # objects, each engine and router pod running the image's own command.
    ours, theirs = list(yaml.safe_load_all(inside.stdout)), list(yaml.safe_load_all(here.stdout))
    assert [(d["kind"], d["metadata"]["name"]) for d in ours] == [
        (d["kind"], d["metadata"]["name"]) for d in theirs
    ]
    commands = {
        d["metadata"]["name"]: d["spec"]["template"]["spec"]["containers"][0]["command"]
        for d in ours
        if d["kind"] == "Deployment"
    }
    assert commands == {
        "smollm2-chat-engine": ["kvpilot", "serve"],
        "smollm2-chat-router": ["kvpilot"],
    }


def test_crds_check_passes_on_the_wheel_data(
    images: dict[str, str], podman_env: dict[str, str]
) -> None:
    out = _run(images["operator"], podman_env, ["crds", "--check"])
    assert out.returncode == 0, out.stderr
    # And it can fail: a CRD folder with a stale file is reported.
    stale = _run(
        images["operator"],
        podman_env,
        ["crds", "--check", "--out", "/in"],
        volumes=[f"{ROOT / 'docs' / 'examples'}:/in:ro"],
    )
    assert stale.returncode == 1 and "out of date: /in/" in stale.stderr


def test_no_torch(images: dict[str, str], podman_env: dict[str, str]) -> None:
    out = _run(
        images["operator"],
        podman_env,
        ["-c", "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('kopf').name)"],
        entrypoint="python3",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["None", "kopf"]


def test_installed_code_is_the_built_commit(
    images: dict[str, str], podman_env: dict[str, str]
) -> None:
    """The wheel layer is rebuilt when the wheel changes (the layer cache cannot see into a bind
    mount): the image's code is the commit `kvpilot images build` exported."""
    from kvpilot_operator.images.runtime import images_dir

    module = "kvpilot_operator/local/nodeagent.py"
    out = _run(
        images["operator"],
        podman_env,
        ["-c", f"import kvpilot_operator, pathlib; print(pathlib.Path(kvpilot_operator.__file__)"
               f".parent.parent.joinpath('{module}').read_text(), end='')"],
        entrypoint="python3",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout == (images_dir() / "src" / "operator" / module).read_text()
