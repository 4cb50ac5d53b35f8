"""A small GGUF reader: metadata and tensor directory parsed from bytes, tensor data memory-mapped.

`gguf.GGUFReader` builds a numpy view per field part and spends seconds on a 49k-token
vocabulary; engine start-up is on the autoscaler's critical path (cold starts), so we parse the
header ourselves and only borrow `gguf`'s dequantization kernels.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    pass


@dataclass
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), i.e. ggml's ne reversed
    ggml_type: int
    offset: int  # from the start of the file


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf = buf
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _SCALARS:
                fmt = _SCALARS[etype]
                size = struct.calcsize(fmt)
                arr = np.frombuffer(self.buf, dtype=np.dtype(fmt), count=count, offset=self.pos)
                self.pos += size * count
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        raise GGUFFormatError(f"unknown GGUF value type {vtype}")


class GGUFFile:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self._parse(memoryview(self._mmap))
        except (struct.error, UnicodeDecodeError, ValueError, IndexError) as e:
            raise GGUFFormatError(f"{self.path} is not a readable GGUF file: {e}") from e

    def _parse(self, buf: memoryview) -> None:
        if bytes(buf[:4]) != b"GGUF":
            raise GGUFFormatError("bad magic (not a GGUF file)")
        cur = _Cursor(buf)
        cur.pos = 4
        version = cur.unpack("<I")
        if version not in (2, 3):
            raise GGUFFormatError(f"unsupported GGUF version {version}")
        n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            ndim = cur.unpack("<I")
            dims = [cur.unpack("<Q") for _ in range(ndim)]
            infos.append((name, tuple(reversed(dims)), cur.unpack("<I"), cur.unpack("<Q")))
        align = int(self.metadata.get("general.alignment", 32))
        data_start = -(-cur.pos // align) * align
        self.tensors = [GGUFTensorInfo(n, s, t, data_start + o) for n, s, t, o in infos]

    def tensor_data(self, info: GGUFTensorInfo) -> np.ndarray:
        """The raw tensor as `gguf.quants.dequantize` expects it: rows of bytes (quantized) or
        the typed array (float types)."""
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        qtype = GGMLQuantizationType(info.ggml_type)
        block, type_size = GGML_QUANT_SIZES[qtype]
        n = int(np.prod(info.shape))
        nbytes = n // block * type_size
        raw = self._mmap[info.offset : info.offset + nbytes]
        if len(raw) != nbytes:
            raise GGUFFormatError(f"tensor {info.name!r} runs past the end of {self.path}")
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16):
            dtype = {
                GGMLQuantizationType.F32: np.float32,
                GGMLQuantizationType.F16: np.float16,
                GGMLQuantizationType.BF16: np.uint16,
            }[qtype]
            return raw.view(dtype).reshape(info.shape)
        row_bytes = info.shape[-1] // block * type_size
        return raw.reshape(*info.shape[:-1], row_bytes)

    def dequantize(self, info: GGUFTensorInfo) -> np.ndarray:
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        data = self.tensor_data(info)
        out = dequantize(data, GGMLQuantizationType(info.ggml_type))
        return out.reshape(info.shape)
