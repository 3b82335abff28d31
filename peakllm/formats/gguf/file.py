"""A .gguf file's metadata and tensors, parsed once in one pass over its header.

``gguf.GGUFReader`` builds numpy views of every part of every metadata value, which for a 262k-token vocabulary
with 515k merges (Gemma-3) takes minutes; loading a model needs them as plain Python values, so this reads the
header with ``struct`` (numeric arrays with numpy) and hands out the tensors as rows of bytes on a memory map, in
the layout ``gguf.quants.dequantize`` takes. Every size read from the file is checked against the file's length.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from peakllm.errors import PeakError

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY = 8, 9


@dataclass
class FileTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (rows last-but-one ... ), the reverse of ggml's ne
    tensor_type: gguf.GGMLQuantizationType
    data: np.ndarray  # uint8 [rows, row_bytes] (1-D tensors: [1, bytes])


class GGUFFile:
    def __init__(self, path):
        path = Path(path)
        if not path.is_file():
            raise PeakError(f"no GGUF file at {path}")
        self.path = path
        self.buf = np.memmap(path, mode="r", dtype=np.uint8)
        self.pos = 0
        try:
            self.parse()
        except (struct.error, UnicodeDecodeError, ValueError, KeyError) as exc:
            raise PeakError(f"cannot read GGUF file {path}: {exc}") from None

    def take(self, n: int) -> int:
        start = self.pos
        if n < 0 or start + n > len(self.buf):
            raise ValueError(f"a size at byte {start} runs past the end of the file")
        self.pos += n
        return start

    def scalar(self, fmt: str):
        return struct.unpack_from(fmt, self.buf, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        n = self.scalar("<Q")
        start = self.take(n)
        return bytes(self.buf[start:start + n]).decode("utf-8", errors="replace")

    def value(self, kind: int):
        if kind in SCALARS:
            return self.scalar(SCALARS[kind])
        if kind == STRING:
            return self.string()
        if kind != ARRAY:
            raise ValueError(f"unknown metadata type {kind}")
        item, n = self.scalar("<I"), self.scalar("<Q")
        if item in NUMPY:
            dtype = np.dtype(NUMPY[item])
            start = self.take(n * dtype.itemsize)
            return np.frombuffer(self.buf, dtype, n, start).tolist()
        return [self.value(item) for _ in range(n)]

    def parse(self) -> None:
        if bytes(self.buf[:4]) != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        self.take(4)
        version = self.scalar("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        n_tensors, n_kv = self.scalar("<Q"), self.scalar("<Q")
        self.fields = {}
        for _ in range(n_kv):
            key = self.string()
            self.fields[key] = self.value(self.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self.string()
            dims = [self.scalar("<Q") for _ in range(self.scalar("<I"))]
            infos.append((name, dims, gguf.GGMLQuantizationType(self.scalar("<I")), self.scalar("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        base = -(-self.pos // align) * align
        self.tensors: dict[str, FileTensor] = {}
        for name, dims, kind, offset in infos:
            block, type_bytes = gguf.GGML_QUANT_SIZES[kind]
            if dims[0] % block:
                raise ValueError(f"{name}: {dims[0]} columns are not whole blocks of {block} for {kind.name}")
            rows = int(np.prod(dims[1:], dtype=np.int64)) if len(dims) > 1 else 1
            row_bytes = dims[0] // block * type_bytes
            self.pos = base + offset
            start = self.take(rows * row_bytes)
            data = self.buf[start:start + rows * row_bytes].reshape(rows, row_bytes)
            self.tensors[name] = FileTensor(name, tuple(reversed(dims)), kind, data)

    def get(self, key: str, default=None):
        return self.fields.get(key, default)

    def dequantize(self, name: str) -> np.ndarray:
        """The tensor as float32 in its numpy shape."""
        t = self.tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(t.shape)
