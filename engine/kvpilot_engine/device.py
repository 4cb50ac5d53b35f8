"""Host lists to device tensors without stalling the GPU, and the GPU's SM count."""

from __future__ import annotations

import functools

import torch


def to_device(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A copy from pageable host memory waits until the GPU's queue has drained (a host sync
    per call); one from pinned memory is queued like a kernel. On CPU it is just the tensor."""
    t = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


@functools.cache
def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device (the kernels size split-K grids by it); None
    elsewhere, where each caller picks its stand-in."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_properties(index).multi_processor_count
