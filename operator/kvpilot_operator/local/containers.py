"""The node agent's container mode: a pod's container as a `podman run` command line.

A pure function of the pod spec (no I/O), so the mapping from Kubernetes' fields to podman's is
tested without a runtime: the securityContext (user and group, runAsNonRoot, a read-only root
filesystem, dropped and added capabilities, no privilege escalation), env (names only on the
command line; the values travel in podman's environment, so a Secret's value is not in `ps`),
volumes (host folders mounted at the container's mount paths) and the host network (the engine
binds the pod's loopback address, as in process mode, and its probes are read there).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ContainerConfigError(LookupError):
    """The pod cannot be run as specified (a kubelet's CreateContainerConfigError)."""


def security(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, Any]:
    """The container's effective securityContext: its own fields over the pod's."""
    pod_sc = pod["spec"].get("securityContext") or {}
    own = container.get("securityContext") or {}
    merged = {k: pod_sc[k] for k in ("runAsUser", "runAsGroup", "runAsNonRoot") if k in pod_sc}
    return {**merged, **own}


def podman_argv(
    pod: dict[str, Any],
    container: dict[str, Any],
    *,
    name: str,
    args: list[str],
    env_names: list[str],
    mounts: Mapping[str, str],
    read_only_mounts: Mapping[str, str] | None = None,
) -> list[str]:
    """`podman run` for one container. `args` is the container's command and args as the agent
    resolved them (bound to the pod's address); `mounts` maps mount paths to host folders."""
    sc = security(pod, container)
    uid, gid = sc.get("runAsUser"), sc.get("runAsGroup")
    if sc.get("runAsNonRoot") and (uid is None or int(uid) == 0):
        # The images' own USER is 65532, but a kubelet checks the uid it will run: say so.
        raise ContainerConfigError(
            f"container {container.get('name')!r} has runAsNonRoot and "
            + ("no runAsUser" if uid is None else "runAsUser 0")
        )
    argv = ["podman", "run", "--rm", "--replace", "--name", name, "--pull", "never"]
    argv += ["--network", "host", "--stop-timeout", "5"]
    if uid is not None:
        argv += ["--user", f"{uid}:{gid if gid is not None else 0}"]
    if sc.get("readOnlyRootFilesystem"):
        # No tmpfs of podman's own: /tmp is the pod's emptyDir, as in the cluster.
        argv += ["--read-only", "--read-only-tmpfs=false"]
    caps = sc.get("capabilities") or {}
    for cap in caps.get("drop") or []:
        argv += ["--cap-drop", cap]
    for cap in caps.get("add") or []:
        argv += ["--cap-add", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        argv += ["--security-opt", "no-new-privileges"]
    for var in env_names:
        argv += ["--env", var]
    for path, host in sorted(mounts.items()):
        argv += ["--volume", f"{host}:{path}"]
    for path, host in sorted((read_only_mounts or {}).items()):
        argv += ["--volume", f"{host}:{path}:ro"]
    image = container.get("image")
    if not image:
        raise ContainerConfigError(f"container {container.get('name')!r} names no image")
    command, rest = (args[:1], args[1:]) if container.get("command") else ([], args)
    if command:
        argv += ["--entrypoint", command[0]]
    return [*argv, image, *rest]
