"""kvpilot's container images, built and run with Debian's daemonless tools (mmdebstrap, buildah,
podman, runc): no Docker daemon and no registry needed.

- `runtime.py`: the storage under ~/.cache/kvpilot/images, the containers.conf this host needs
  (runc, cgroupfs, ulimits it accepts), and the environment and `podman run` flags that use them.
- `build.py`: `kvpilot images build`: the Debian base rootfs, the kvpilot wheel, and one build per
  Containerfile in the repository's `images/`, skipped when its inputs are unchanged.
"""
