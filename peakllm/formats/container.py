"""The peakllm model folder: config.json, model.safetensors (dense + packed tensors) and peakllm.json.

The manifest (format "peakllm", version 1) lists every dense tensor and every packed module (kind, small
JSON metadata, its tensors' dtypes and shapes). It is stored in the safetensors header, which is the
authority, and copied to peakllm.json for people. The loader parses the safetensors file itself, checks
every size, dtype, shape and offset against the file and the manifest before it makes a tensor, and never
unpickles. A packed module is anything with the protocol of formats/intk.py registered under its kind.
"""

import json
import math
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from peakllm.errors import PeakError
from peakllm.formats.folder import check_output, staged_dir
from peakllm.formats.intk import PackedIntK, PackedTernary
from peakllm.formats.sparse import PackedBitmask, PackedNM
from peakllm.formats.tensor_file import (DTYPES, check_dtype, check_shape, data_sha256, describe_tensor,
                                         read_safetensors, write_safetensors)

FORMAT_NAME = "peakllm"
CONTAINER_VERSION = 1
TENSORS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"  # sharded folders (written layer by layer, formats/shards.py)
MANIFEST_FILE = "peakllm.json"
CONFIG_FILE = "config.json"
RESERVED_KEYS = ("format", "version", "dense", "modules", "data_sha256", "shards")


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


def module_entry(module) -> dict:
    return {"kind": _kind_of(module), "metadata": module.metadata(),
            "tensors": {k: describe_tensor(v) for k, v in module.to_tensors("").items()}}


def compact_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def bits_per_param(packed_modules: dict) -> float:
    """Bits stored per original parameter over these modules: every tensor (codes, scales, zeros, masks,
    indices, g_idx, ...) plus each module's manifest entry (kind, metadata, tensor dtypes/shapes) as
    compact JSON, divided by the number of parameters of the dense weights they replace."""
    return manifest_bits_per_param({name: module_entry(module) for name, module in packed_modules.items()})


def manifest_bits_per_param(entries: dict) -> float:
    """bits_per_param from manifest entries alone ({name: {kind, metadata, tensors}}), as a folder's
    manifest holds them: nothing needs to be read but the manifest."""
    total_bits, params = 0, 0
    for name, entry in entries.items():
        nbytes = sum(math.prod(d["shape"]) * DTYPES[d["dtype"]].itemsize for d in entry["tensors"].values())
        total_bits += 8 * (nbytes + len(compact_json({name: entry}).encode()))
        params += entry["metadata"]["out_features"] * entry["metadata"]["in_features"]
    if params == 0:
        raise PeakError("bits_per_param needs at least one packed module")
    return total_bits / params


def all_tensors(dense_tensors: dict, packed_modules: dict) -> dict:
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
                dense={k: describe_tensor(v) for k, v in dense_tensors.items()},
                modules={k: module_entry(m) for k, m in packed_modules.items()})
    return full


def save_model_folder(out_dir, *, config: dict, dense_tensors: dict, packed_modules: dict, manifest: dict,
                      extra_files=None, overwrite: bool = False) -> Path:
    """Write the folder into a temp dir beside out_dir, then rename it into place.

    An existing non-empty out_dir is refused unless overwrite=True, in which case it is replaced whole.
    extra_files(tmp_dir), if given, writes further files (tokenizer, ...) into the folder before the rename.
    """
    out_dir = Path(out_dir)
    if sys.byteorder != "little":
        raise PeakError("peakllm folders are little-endian; this machine is big-endian")
    check_output(out_dir, overwrite)  # before the hashing, not after
    tensors = all_tensors(dense_tensors, packed_modules)
    full = build_manifest(dense_tensors, packed_modules, manifest)
    full["data_sha256"] = data_sha256(tensors)  # bit rot in tensor data would otherwise load silently
    try:
        manifest_text, config_text = compact_json(full), json.dumps(config, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise PeakError(f"manifest and config must be JSON-serialisable: {e}") from None
    with staged_dir(out_dir, overwrite) as tmp:
        write_safetensors(tmp / TENSORS_FILE, tensors, {FORMAT_NAME: manifest_text})
        (tmp / MANIFEST_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        (tmp / CONFIG_FILE).write_text(config_text + "\n")
        if extra_files is not None:
            extra_files(tmp)
    return out_dir


# ---- loading ----------------------------------------------------------------------------------



def _check_entry(desc, t: torch.Tensor, where: str) -> None:
    if not isinstance(desc, dict):
        raise PeakError(f"{where}: manifest entry is not an object")
    dtype = check_dtype(desc.get("dtype"), where)
    shape = check_shape(desc.get("shape"), where)
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
        packed[mod_name] = build_module(cls, mod_name, local, entry.get("metadata"))
    extra = set(tensors) - expected
    if extra:
        raise PeakError(f"{folder}: {len(extra)} tensors are not in the manifest, e.g. {sorted(extra)[0]!r}")
    return manifest, dense, packed


def build_module(cls, mod_name: str, local: dict, metadata):
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
