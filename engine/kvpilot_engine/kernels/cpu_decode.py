"""The C++ decode-attention kernel for CPUs (csrc/paged_decode.cpp), and how it gets built.

It reads the paged KV cache in place, where the PyTorch reference gathers every decode row's
blocks into a contiguous copy first. torch's extension tooling compiles it once per machine
(`.ci/install`, or the first use) into `~/.cache/kvpilot/cpu-kernels/<key>`, the key covering
the source, torch, Python and the CPU's flags, since `-march=native` code only runs where it was
built. The engine uses it with `KVPILOT_CPU_KERNELS=1` (see `enabled`); without a compiler it
stays on the PyTorch reference, with one warning saying why.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
from pathlib import Path

import torch

logger = logging.getLogger("kvpilot.engine")

SOURCE = Path(__file__).parent / "csrc" / "paged_decode.cpp"
# KVPILOT_CPU_ARCH picks the target (e.g. x86-64-v3 in an image built for other machines).
CFLAGS = [
    "-O3",
    f"-march={os.environ.get('KVPILOT_CPU_ARCH', 'native')}",
    "-fopenmp-simd",
    "-ffast-math",  # vectorized exp (libmvec) and reductions; the kernel keeps to finite values
    "-std=c++17",
]

_lock = threading.Lock()
_loaded: bool | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    key = hashlib.sha256(
        "\n".join(
            [SOURCE.read_text(), torch.__version__, sys.version, " ".join(CFLAGS), _cpu_flags()]
        ).encode()
    ).hexdigest()[:16]
    cache = Path(os.environ.get("KVPILOT_CACHE") or Path.home() / ".cache" / "kvpilot")
    return cache / "cpu-kernels" / key


def load() -> bool:
    """Build (once) and load the kernel; False, with a warning, when it cannot be had."""
    global _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        built = build_dir() / "kvpilot_cpu_kernels.so"
        if built.is_file():  # the usual case: no compiler run, not even ninja's up-to-date check
            try:
                torch.ops.load_library(str(built))
                _loaded = True
                return True
            except OSError as e:
                logger.warning("rebuilding the CPU decode kernel: %s", e)
        try:
            from torch.utils import cpp_extension

            # torch looks for ninja on PATH; the one the `ninja` wheel puts next to this Python
            # counts too.
            bin_dir = str(Path(sys.executable).parent)
            if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
                os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
            directory = build_dir()
            directory.mkdir(parents=True, exist_ok=True)
            cpp_extension.load(
                name="kvpilot_cpu_kernels",
                sources=[str(SOURCE)],
                extra_cflags=CFLAGS,
                build_directory=str(directory),
                is_python_module=False,
                verbose=False,
            )
            _loaded = True
        except Exception as e:  # no compiler, no ninja, a read-only cache: the reference works
            logger.warning(
                "the C++ CPU decode-attention kernel is unavailable (%s: %s); decode attention "
                "uses the slower PyTorch reference",
                type(e).__name__,
                str(e).strip().splitlines()[-1][:300] if str(e).strip() else "",
            )
            _loaded = False
        return _loaded


def enabled() -> bool:
    """Whether the engine's decode steps use the kernel: only with KVPILOT_CPU_KERNELS=1 for now.
    On a quiet 2-core EPYC it reaches 0.90-0.95x of the gather + SDPA reference's speed
    (`kvpilot bench decode-attention`, docs/benchmarks.md), so it is not the default yet."""
    return os.environ.get("KVPILOT_CPU_KERNELS") == "1" and load()


def paged_decode(
    out: torch.Tensor,
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    seq_ids: torch.Tensor,
    rows: torch.Tensor,
    scale: float,
) -> None:
    """out[rows[i]] = attention of query[rows[i]] over sequence seq_ids[i]'s first
    context_lens[seq_ids[i]] cached tokens (block_tables[seq_ids[i]]), for every i."""
    torch.ops.kvpilot_cpu.paged_decode(
        out, query, key_cache, value_cache, block_tables, context_lens, seq_ids, rows, scale
    )


if __name__ == "__main__":  # `python -m kvpilot_engine.kernels.cpu_decode`: build it now
    logging.basicConfig(level=logging.INFO)
    ok = load()
    print(f"kvpilot CPU decode kernel: {'built' if ok else 'unavailable'} in {build_dir()}")
    sys.exit(0 if ok else 1)
