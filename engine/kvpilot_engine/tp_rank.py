"""The entry point of a tensor-parallel rank process: `python -m kvpilot_engine.tp_rank FD`.

The engine (worker.WorkerGroup) starts it with one end of a socket pair as FD and sends, as the
first message, the function to run and its arguments; the function gets the connection and keeps
serving it. A module of its own so that starting a rank imports nothing of the user's program
and nothing that imports this module first.
"""

from __future__ import annotations

import importlib
import sys
from multiprocessing.connection import Connection


def main(fd: int) -> None:
    conn = Connection(fd)
    try:
        module, name, args = conn.recv()
    except (EOFError, OSError):  # the engine went away before we started
        return
    target = getattr(importlib.import_module(module), name)
    target(*args[:3], conn, *args[3:])


if __name__ == "__main__":
    main(int(sys.argv[1]))
