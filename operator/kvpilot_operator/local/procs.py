"""Process and scratch-space helpers shared by the local stack's parts (control plane, Prometheus,
node agent, `kvpilot up`): children that die with their parent, signals to a whole process group,
free loopback ports, a cache folder, and the `... up` commands' wait loop."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

STOP_GRACE_S = 5.0


def cache_dir() -> Path:
    return Path(os.environ.get("KVPILOT_CACHE") or Path.home() / ".cache" / "kvpilot")


def scratch_dir(prefix: str) -> Path:
    """A fresh directory on tmpfs when there is one (etcd fsyncs every write, and nothing in it
    needs to outlive the machine)."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports. The sockets stay open until all are picked, so the kernel
    cannot hand out the same port twice within one cluster."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()
_PR_SET_PDEATHSIG = 1


def child_setup_factory() -> Callable[[], None]:
    """preexec_fn for the components: a new session (so a signal to the group reaches any
    children) and, on Linux, SIGKILL when the parent dies, so a SIGKILLed test run leaks nothing.
    PDEATHSIG fires when the forking *thread* exits, so it is only set from the main thread."""
    libc: Any = None
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def setup() -> None:
        os.setsid()
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
            # The parent may have died between fork and prctl; then nobody would reap us.
            if os.getppid() != parent:
                os._exit(1)

    return setup


def signal_group(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    # The child called setsid, so its pid is its process group id.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)


def run_until_signalled(died: Callable[[], str | None]) -> int:
    """For `... up` commands: 0 on SIGINT/SIGTERM, or 1 (saying why) as soon as `died`, polled
    every second, reports that a component exited."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            why = died()
            if why:
                print(why, file=sys.stderr)
                return 1
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    return 0
