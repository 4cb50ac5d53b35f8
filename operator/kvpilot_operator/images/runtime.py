"""Where the images live and how podman/buildah are pointed at them.

Everything sits under one folder (default ~/.cache/kvpilot/images, or $KVPILOT_CACHE/images): the
overlay storage, the run root, a TMPDIR (buildah stages layers there; /tmp may be a small tmpfs),
and two config files that every podman/buildah call reads through CONTAINERS_STORAGE_CONF and
CONTAINERS_CONF. The settings are the ones that work on a rootful Debian 12 host without systemd:
crun refuses its cgroup layout (runc does not), there is no systemd for cgroups, and ulimits above
nofile 20000 / nproc 32768 are refused.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from pathlib import Path

from kvpilot_operator.local.procs import cache_dir

# The uid/gid the images run as, and what the operator's pod securityContexts name.
IMAGE_UID = 65532

DEBIAN_TOOLS = ("mmdebstrap", "buildah", "podman", "runc")


def images_dir() -> Path:
    return cache_dir() / "images"


def _write_if_changed(path: Path, text: str) -> None:
    if not path.is_file() or path.read_text() != text:
        path.write_text(text)


def container_env(root: Path | None = None) -> dict[str, str]:
    """os.environ plus what points podman/buildah at kvpilot's storage (files written if needed)."""
    root = root or images_dir()
    (root / "tmp").mkdir(parents=True, exist_ok=True)
    storage = root / "storage.conf"
    _write_if_changed(
        storage,
        "[storage]\n"
        # overlay: vfs copies every layer at each container start.
        'driver = "overlay"\n'
        f'graphroot = "{root / "storage"}"\n'
        f'runroot = "{root / "run"}"\n',
    )
    containers = root / "containers.conf"
    _write_if_changed(
        containers,
        "[containers]\n"
        'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
        "[engine]\n"
        'runtime = "runc"\n'
        'cgroup_manager = "cgroupfs"\n'
        'events_logger = "file"\n',
    )
    return {
        **os.environ,
        "CONTAINERS_STORAGE_CONF": str(storage),
        "CONTAINERS_CONF": str(containers),
        "TMPDIR": str(root / "tmp"),
    }


def missing_tools(tools: Sequence[str] = DEBIAN_TOOLS) -> list[str]:
    return [t for t in tools if shutil.which(t) is None]


def podman_run_args(
    image: str,
    *,
    name: str | None = None,
    read_only: bool = True,
    user: str = f"{IMAGE_UID}:{IMAGE_UID}",
    network: str = "host",
    env: dict[str, str] | None = None,
    volumes: Sequence[str] = (),
    cap_drop_all: bool = True,
    extra: Sequence[str] = (),
    command: Sequence[str] = (),
    entrypoint: str | None = None,
) -> list[str]:
    """`podman run` as kvpilot's pods want it: read-only root, a fixed uid:gid (a bare --user UID
    would run with gid 0), no capabilities, no privilege escalation, the host's network."""
    argv = ["podman", "run", "--rm", "--network", network, "--user", user]
    if name:
        argv += ["--name", name]
    if read_only:
        # A read-only root with podman's tmpfs on /tmp, /var/tmp and /run, as an emptyDir gives.
        argv += ["--read-only"]
    if cap_drop_all:
        argv += ["--cap-drop", "ALL", "--security-opt", "no-new-privileges"]
    for key, value in (env or {}).items():
        argv += ["--env", f"{key}={value}"]
    for volume in volumes:
        argv += ["--volume", volume]
    argv += list(extra)
    if entrypoint is not None:
        argv += ["--entrypoint", entrypoint]
    return [*argv, image, *command]
