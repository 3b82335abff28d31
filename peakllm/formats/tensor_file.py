"""One safetensors file, read and written by peakllm itself: the header parsed with every size, dtype, shape
and offset checked against the file before a tensor is made (never unpickled), tensors memory-mapped in
place, and a sha256 of the tensor data in a fixed order so bit rot cannot load silently. The peakllm folder
(container.py) and its sharded form (shards.py) are built on it."""

import hashlib
import json
import math
import mmap
import os
import struct
from pathlib import Path

import torch

from peakllm.errors import PeakError

MAX_HEADER_BYTES = 256 << 20


MAX_NDIM = 8


MAX_DIM_SIZE = 1 << 40


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}


DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def describe_tensor(t: torch.Tensor) -> dict:
    if t.dtype not in DTYPE_NAMES:
        raise PeakError(f"cannot store a tensor of dtype {t.dtype}")
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}


def _storage_order(tensors: dict) -> list:
    # Widest element first: with an 8-byte aligned header every tensor then starts naturally aligned.
    return sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))


def _tensor_bytes(t: torch.Tensor):
    """The tensor's bytes as a buffer (a view, not a copy: a 7B model's fp32 embedding is 0.8 GB)."""
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


def data_sha256(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in _storage_order(tensors):
        h.update(_tensor_bytes(tensors[name]))
    return h.hexdigest()


def write_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    names = _storage_order(tensors)
    header, offset = {"__metadata__": metadata}, 0
    for name in names:
        size = tensors[name].numel() * tensors[name].element_size()
        header[name] = {**describe_tensor(tensors[name]), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in names:
            f.write(_tensor_bytes(tensors[name]))
        f.flush()
        os.fsync(f.fileno())


def check_shape(shape, where: str) -> tuple:
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or any(
            type(d) is not int or not 0 <= d <= MAX_DIM_SIZE for d in shape):
        raise PeakError(f"{where}: shape must be a list of at most {MAX_NDIM} integers in [0, 2^40], got {shape!r}")
    return tuple(shape)


def check_dtype(name, where: str) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:
        raise PeakError(f"{where}: unknown dtype {name!r}")
    return DTYPES[name]


def _map(path: Path):
    """The file's bytes as a private (copy-on-write) memory map: tensors made from it are views of the
    page cache, read from disk as they are touched and never copied; writing to one copies that page
    only, never the file. A file too small to map comes back as bytes."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 8:
                return f.read()
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    except OSError as e:
        raise PeakError(f"cannot read {path}: {e.strerror}") from None


def _file_sha256(path: Path, start: int) -> str:
    """sha256 of the file's bytes from `start`, read with plain reads rather than through the memory map:
    the map's pages are then not made resident by the check (a model run under --max-memory keeps its
    peak), and hashlib releases the GIL, so shards can be checked on several threads."""
    h, chunk = hashlib.sha256(), bytearray(16 << 20)
    view = memoryview(chunk)
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        while n := f.readinto(chunk):
            h.update(view[:n])
    return h.hexdigest()


def read_safetensors(path, expected_sha256=None) -> tuple[dict, dict]:
    """(string metadata, tensors) of a safetensors file, every header field checked against the file size.
    expected_sha256(metadata) may return the hex sha256 the data section must have (None: not checked).
    The tensors are views of a memory map of the file (`_map`): loading copies nothing, and the pages
    the checksum read stay in the page cache for the kernels."""
    path = Path(path)
    buf = _map(path)
    if len(buf) < 8:
        raise PeakError(f"{path} is truncated: {len(buf)} bytes")
    (n,) = struct.unpack("<Q", bytes(buf[:8]))
    if n > min(len(buf) - 8, MAX_HEADER_BYTES):
        raise PeakError(f"{path}: header length {n} does not fit in a {len(buf)}-byte file")
    try:
        header = json.loads(bytes(buf[8:8 + n]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise PeakError(f"{path}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise PeakError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise PeakError(f"{path}: __metadata__ must map strings to strings")
    data_start, data_len = 8 + n, len(buf) - 8 - n
    spans, tensors = [], {}
    for name, entry in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise PeakError(f"{where}: entry is not an object")
        dtype = check_dtype(entry.get("dtype"), where)
        shape = check_shape(entry.get("shape"), where)
        offs = entry.get("data_offsets")
        if not isinstance(offs, list) or len(offs) != 2 or any(type(o) is not int for o in offs):
            raise PeakError(f"{where}: data_offsets must be two integers")
        begin, end = offs
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= data_len or end - begin != size:
            raise PeakError(f"{where}: data_offsets {offs} do not hold {size} bytes inside {data_len} data bytes")
        spans.append((begin, end, name, dtype, shape))
    spans.sort()
    pos = 0
    for begin, end, name, _, _ in spans:
        if begin != pos:
            raise PeakError(f"{path}: tensor data overlaps or leaves a hole at byte {pos} (tensor {name!r})")
        pos = end
    if pos != data_len:
        raise PeakError(f"{path}: {data_len - pos} bytes after the last tensor (or the file is cut short)")
    want = expected_sha256(metadata) if expected_sha256 is not None else None
    if want is not None and _file_sha256(path, data_start) != want:
        raise PeakError(f"{path}: tensor data does not match its checksum (the file is corrupt)")
    for begin, end, name, dtype, shape in spans:
        if end == begin:
            tensors[name] = torch.empty(shape, dtype=dtype)
            continue
        itemsize = torch.empty((), dtype=dtype).element_size()
        if (data_start + begin) % itemsize:
            # a foreign writer's misaligned tensor: copy it rather than view unaligned memory
            raw = bytearray(buf[data_start + begin:data_start + end])
            tensors[name] = torch.frombuffer(raw, dtype=dtype).reshape(shape)
        else:
            tensors[name] = torch.frombuffer(buf, dtype=dtype, count=(end - begin) // itemsize,
                                             offset=data_start + begin).reshape(shape)
    return metadata, tensors
