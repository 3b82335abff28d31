"""The peakllm model folder: config.json, model.safetensors (dense + packed tensors) and peakllm.json.

The manifest (format "peakllm", version 1) lists every dense tensor and every packed module (kind, small
JSON metadata, its tensors' dtypes and shapes). It is stored in the safetensors header, which is the
authority, and copied to peakllm.json for people. The loader parses the safetensors file itself, checks
every size, dtype, shape and offset against the file and the manifest before it makes a tensor, and never
unpickles. A packed module is anything with the protocol of formats/intk.py registered under its kind.
"""

import contextlib
import hashlib
import json
import math
import mmap
import os
import shutil
import struct
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from peakllm.errors import PeakError
from peakllm.formats.intk import PackedIntK, PackedTernary
from peakllm.formats.sparse import PackedBitmask, PackedNM

FORMAT_NAME = "peakllm"
CONTAINER_VERSION = 1
TENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # sharded folders (written layer by layer, formats/shards.py)
MANIFEST_FILE = "peakllm.json"
CONFIG_FILE = "config.json"
MAX_HEADER_BYTES = 256 << 20
MAX_NDIM = 8
MAX_DIM_SIZE = 1 << 40
RESERVED_KEYS = ("format", "version", "dense", "modules", "data_sha256", "shards")

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

_KINDS: dict[str, type] = {}


def register_kind(name: str, cls: type) -> None:
    """Let the container store and load modules of this kind (cls has the packed-module protocol)."""
    for attr in ("from_tensors", "to_tensors", "metadata", "num_params", "nbytes"):
        if not hasattr(cls, attr):
            raise PeakError(f"packed module class {cls.__name__} lacks {attr!r}")
    if _KINDS.get(name, cls) is not cls:
        raise PeakError(f"packed module kind {name!r} is already registered to {_KINDS[name].__name__}")
    _KINDS[name] = cls


def kind_class(name: str) -> type:
    if not isinstance(name, str) or name not in _KINDS:
        raise PeakError(f"unknown packed module kind {name!r} (known: {', '.join(sorted(_KINDS))})")
    return _KINDS[name]


for _cls in (PackedIntK, PackedTernary, PackedBitmask, PackedNM):
    register_kind(_cls.kind, _cls)


def _kind_of(module) -> str:
    kind = getattr(module, "kind", None)
    if not isinstance(kind, str) or _KINDS.get(kind) is not type(module):
        raise PeakError(f"{type(module).__name__} is not a registered packed module kind")
    return kind


def _describe(t: torch.Tensor) -> dict:
    if t.dtype not in DTYPE_NAMES:
        raise PeakError(f"cannot store a tensor of dtype {t.dtype}")
    return {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape)}


def _module_entry(module) -> dict:
    return {"kind": _kind_of(module), "metadata": module.metadata(),
            "tensors": {k: _describe(v) for k, v in module.to_tensors("").items()}}


def _compact(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def bits_per_param(packed_modules: dict) -> float:
    """Bits stored per original parameter over these modules: every tensor (codes, scales, zeros, masks,
    indices, g_idx, ...) plus each module's manifest entry (kind, metadata, tensor dtypes/shapes) as
    compact JSON, divided by the number of parameters of the dense weights they replace."""
    return manifest_bits_per_param({name: _module_entry(module) for name, module in packed_modules.items()})


def manifest_bits_per_param(entries: dict) -> float:
    """bits_per_param from manifest entries alone ({name: {kind, metadata, tensors}}), as a folder's
    manifest holds them: nothing needs to be read but the manifest."""
    total_bits, params = 0, 0
    for name, entry in entries.items():
        nbytes = sum(math.prod(d["shape"]) * DTYPES[d["dtype"]].itemsize for d in entry["tensors"].values())
        total_bits += 8 * (nbytes + len(_compact({name: entry}).encode()))
        params += entry["metadata"]["out_features"] * entry["metadata"]["in_features"]
    if params == 0:
        raise PeakError("bits_per_param needs at least one packed module")
    return total_bits / params


def _all_tensors(dense_tensors: dict, packed_modules: dict) -> dict:
    out = {}
    for name, t in dense_tensors.items():
        if not isinstance(name, str) or not name or not isinstance(t, torch.Tensor):
            raise PeakError(f"dense tensor names must be non-empty strings mapping to tensors, got {name!r}")
        out[name] = t
    for mod_name, module in packed_modules.items():
        if not isinstance(mod_name, str) or not mod_name:
            raise PeakError(f"packed module names must be non-empty strings, got {mod_name!r}")
        for name, t in module.to_tensors(mod_name + ".").items():
            if name in out:
                raise PeakError(f"tensor name {name!r} is used twice (dense tensor or another module)")
            out[name] = t
    return out


def build_manifest(dense_tensors: dict, packed_modules: dict, manifest: dict | None = None) -> dict:
    """The caller's manifest keys, plus format/version/dense/modules written by the container."""
    full = {k: v for k, v in (manifest or {}).items() if k not in RESERVED_KEYS}
    full.update(format=FORMAT_NAME, version=CONTAINER_VERSION,
                dense={k: _describe(v) for k, v in dense_tensors.items()},
                modules={k: _module_entry(m) for k, m in packed_modules.items()})
    return full


def _storage_order(tensors: dict) -> list:
    # Widest element first: with an 8-byte aligned header every tensor then starts naturally aligned.
    return sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))


def _tensor_bytes(t: torch.Tensor):
    """The tensor's bytes as a buffer (a view, not a copy: a 7B model's fp32 embedding is 0.8 GB)."""
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b""


def _data_sha256(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in _storage_order(tensors):
        h.update(_tensor_bytes(tensors[name]))
    return h.hexdigest()


def write_safetensors(path: Path, tensors: dict, metadata: dict) -> None:
    names = _storage_order(tensors)
    header, offset = {"__metadata__": metadata}, 0
    for name in names:
        size = tensors[name].numel() * tensors[name].element_size()
        header[name] = {**_describe(tensors[name]), "data_offsets": [offset, offset + size]}
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


def save_model_folder(out_dir, *, config: dict, dense_tensors: dict, packed_modules: dict, manifest: dict,
                      extra_files=None, overwrite: bool = False) -> Path:
    """Write the folder into a temp dir beside out_dir, then rename it into place.

    An existing non-empty out_dir is refused unless overwrite=True, in which case it is replaced whole.
    extra_files(tmp_dir), if given, writes further files (tokenizer, ...) into the folder before the rename.
    """
    out_dir = Path(out_dir)
    if sys.byteorder != "little":
        raise PeakError("peakllm folders are little-endian; this machine is big-endian")
    refuse_existing(out_dir, overwrite)  # before the hashing, not after
    tensors = _all_tensors(dense_tensors, packed_modules)
    full = build_manifest(dense_tensors, packed_modules, manifest)
    full["data_sha256"] = _data_sha256(tensors)  # bit rot in tensor data would otherwise load silently
    try:
        manifest_text, config_text = _compact(full), json.dumps(config, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise PeakError(f"manifest and config must be JSON-serialisable: {e}") from None
    with staged_dir(out_dir, overwrite) as tmp:
        write_safetensors(tmp / TENSORS_FILE, tensors, {FORMAT_NAME: manifest_text})
        (tmp / MANIFEST_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        (tmp / CONFIG_FILE).write_text(config_text + "\n")
        if extra_files is not None:
            extra_files(tmp)
    return out_dir


def refuse_existing(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not overwrite)):
        raise PeakError(f"{out_dir} already exists and is not empty (pass overwrite=True to replace it)")


@contextlib.contextmanager
def staged_dir(out_dir: Path, overwrite: bool = False):
    """A temp dir beside out_dir to write into; renamed onto out_dir when the block succeeds, removed if not.
    A non-empty out_dir is refused unless overwrite, and then replaced whole."""
    out_dir = Path(out_dir)
    refuse_existing(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        _rename_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _rename_into_place(tmp: Path, out_dir: Path) -> None:
    if not out_dir.exists() or not any(out_dir.iterdir()):
        os.replace(tmp, out_dir)  # rename(2) may replace an empty directory
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---- loading ----------------------------------------------------------------------------------

def _check_shape(shape, where: str) -> tuple:
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or any(
            type(d) is not int or not 0 <= d <= MAX_DIM_SIZE for d in shape):
        raise PeakError(f"{where}: shape must be a list of at most {MAX_NDIM} integers in [0, 2^40], got {shape!r}")
    return tuple(shape)


def _check_dtype(name, where: str) -> torch.dtype:
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
        dtype = _check_dtype(entry.get("dtype"), where)
        shape = _check_shape(entry.get("shape"), where)
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


def _check_entry(desc, t: torch.Tensor, where: str) -> None:
    if not isinstance(desc, dict):
        raise PeakError(f"{where}: manifest entry is not an object")
    dtype = _check_dtype(desc.get("dtype"), where)
    shape = _check_shape(desc.get("shape"), where)
    if t.dtype != dtype or tuple(t.shape) != shape:
        raise PeakError(f"{where}: file holds {t.dtype} {tuple(t.shape)}, manifest says {dtype} {shape}")


def _parse_manifest(folder: Path, metadata: dict, sharded: bool = False) -> dict:
    try:
        manifest = json.loads(metadata.get(FORMAT_NAME, ""))
    except (ValueError, RecursionError, TypeError):
        raise PeakError(f"{folder}: no valid peakllm manifest in {INDEX_FILE if sharded else TENSORS_FILE}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise PeakError(f"{folder}: manifest does not name format {FORMAT_NAME!r}")
    if manifest.get("version") != CONTAINER_VERSION or type(manifest.get("version")) is not int:
        raise PeakError(f"{folder}: container version {manifest.get('version')!r}, this peakllm reads "
                        f"{CONTAINER_VERSION}")
    if sharded:
        shards = manifest.get("shards")
        if not isinstance(shards, dict) or not shards or not all(
                isinstance(k, str) and isinstance(v, str) and len(v) == 64 for k, v in shards.items()):
            raise PeakError(f"{folder}: manifest lacks the shards' checksums")
        return manifest
    digest = manifest.get("data_sha256")
    if not isinstance(digest, str) or len(digest) != 64:
        raise PeakError(f"{folder}: manifest lacks the data checksum")
    return manifest


def _read_sharded(folder: Path) -> tuple[dict, dict]:
    """(manifest, tensors) of a sharded peakllm folder: the index holds the manifest, the manifest each
    shard's checksum; every shard is read whole and checked, and must hold exactly what the index says."""
    try:
        index = json.loads((folder / INDEX_FILE).read_text())
        weight_map, meta = index["weight_map"], index["metadata"]
        if not isinstance(weight_map, dict) or not isinstance(meta, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError, RecursionError):
        raise PeakError(f"{folder / INDEX_FILE} is missing or not a valid index") from None
    manifest = _parse_manifest(folder, meta, sharded=True)
    tensors = {}
    shards = sorted(manifest["shards"].items())
    for fname, _digest in shards:
        if "/" in fname or "\\" in fname or fname.startswith(".") or not (folder / fname).is_file():
            raise PeakError(f"{folder}: shard {fname!r} is missing")
    # checked on two threads (hashing releases the GIL); the first bad shard in name order is reported
    with ThreadPoolExecutor(max_workers=min(2, len(shards))) as pool:
        parts = [pool.submit(read_safetensors, folder / fname, lambda _m, d=digest: d) for fname, digest in shards]
        parts = [(fname, job.result()[1]) for (fname, _d), job in zip(shards, parts)]
    for fname, part in parts:
        for name, t in part.items():
            if weight_map.get(name) != fname:
                raise PeakError(f"{folder}: {INDEX_FILE} does not place {name!r} in {fname}")
            tensors[name] = t
    if set(weight_map) != set(tensors):
        raise PeakError(f"{folder}: {INDEX_FILE} lists tensors that no shard holds")
    return manifest, tensors


def load_model_folder(folder) -> tuple[dict, dict, dict]:
    """(manifest, dense_tensors, packed_modules) of a peakllm folder; PeakError on anything inconsistent."""
    folder = Path(folder)
    if sys.byteorder != "little":
        raise PeakError("peakllm folders are little-endian; this machine is big-endian")
    if (folder / TENSORS_FILE).is_file():
        metadata, tensors = read_safetensors(folder / TENSORS_FILE,
                                             lambda meta: _parse_manifest(folder, meta)["data_sha256"])
        manifest = _parse_manifest(folder, metadata)
    elif (folder / INDEX_FILE).is_file():
        manifest, tensors = _read_sharded(folder)
    else:
        raise PeakError(f"{folder} is not a peakllm model folder (no {TENSORS_FILE} or {INDEX_FILE})")
    try:
        copy = json.loads((folder / MANIFEST_FILE).read_text())
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        raise PeakError(f"{folder}: {MANIFEST_FILE} is missing or not valid JSON") from None
    if copy != manifest:
        raise PeakError(f"{folder}: {MANIFEST_FILE} disagrees with the manifest in {TENSORS_FILE}")
    dense_desc, modules_desc = manifest.get("dense"), manifest.get("modules")
    if not isinstance(dense_desc, dict) or not isinstance(modules_desc, dict):
        raise PeakError(f"{folder}: manifest needs 'dense' and 'modules' objects")

    expected, dense = set(), {}
    for name, desc in dense_desc.items():
        if name not in tensors:
            raise PeakError(f"{folder}: dense tensor {name!r} is in the manifest but not in the file")
        _check_entry(desc, tensors[name], f"dense tensor {name!r}")
        dense[name] = tensors[name]
        expected.add(name)
    packed = {}
    for mod_name, entry in modules_desc.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("tensors"), dict):
            raise PeakError(f"module {mod_name!r}: manifest entry needs 'kind', 'metadata' and 'tensors'")
        cls = kind_class(entry.get("kind"))
        local = {}
        for local_name, desc in entry["tensors"].items():
            full = f"{mod_name}.{local_name}"
            if full not in tensors or full in expected:
                raise PeakError(f"module {mod_name!r}: tensor {full!r} is missing from the file or listed twice")
            _check_entry(desc, tensors[full], f"tensor {full!r}")
            local[local_name] = tensors[full]
            expected.add(full)
        packed[mod_name] = _build_module(cls, mod_name, local, entry.get("metadata"))
    extra = set(tensors) - expected
    if extra:
        raise PeakError(f"{folder}: {len(extra)} tensors are not in the manifest, e.g. {sorted(extra)[0]!r}")
    return manifest, dense, packed


def _build_module(cls, mod_name: str, local: dict, metadata):
    if not isinstance(metadata, dict):
        raise PeakError(f"module {mod_name!r}: metadata must be an object")
    try:
        module = cls.from_tensors(local, metadata)
    except PeakError as e:
        raise PeakError(f"module {mod_name!r}: {e}") from None
    except (ValueError, TypeError, KeyError, IndexError, RuntimeError, OverflowError) as e:
        # a plugged-in kind that validates less carefully still must not crash the loader
        raise PeakError(f"module {mod_name!r} ({cls.__name__}) is corrupt: {e}") from None
    if set(module.to_tensors("")) != set(local):
        raise PeakError(f"module {mod_name!r}: tensors {sorted(local)} do not match its kind {cls.kind!r}")
    return module
