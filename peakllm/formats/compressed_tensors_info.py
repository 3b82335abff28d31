"""What a compressed-tensors folder holds, read from its config and safetensors headers without loading the
model: logical parameters, scheme(s), bytes and bits per parameter (`peakllm info`).

A quantized module `m` is one with `m.weight_scale`. Its logical shape is `m.weight_shape` (two int64 values)
when the weight is stored packed (`m.weight_packed`, int32 words of `num_bits`-bit codes: pack-quantized),
otherwise that of `m.weight` (e.g. int8 naive-quantized, fp8 float-quantized). Which config group's scheme
applies to `m` follows compressed-tensors' matching: a target is a module name, `re:<regex>` (re.match), or
a class name such as "Linear" (taken to match every quantized module: classes are not in the files).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from peakllm.errors import PeakError

INDEX_FILE = "model.safetensors.index.json"
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
             "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1}
SCHEME_FIELDS = ("num_bits", "type", "symmetric", "strategy", "group_size", "actorder")


def quantization_config(folder) -> dict | None:
    """config.json's quantization_config when it is compressed-tensors', else None."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    qc = config.get("quantization_config") if isinstance(config, dict) else None
    if isinstance(qc, dict) and qc.get("quant_method") == "compressed-tensors":
        return qc
    return None


def weight_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise PeakError(f"{index} is not a valid safetensors index") from None
        missing = [n for n in names if not isinstance(n, str) or "/" in n or not (folder / n).is_file()]
        if missing:
            raise PeakError(f"{folder}: shard {missing[0]} listed in {INDEX_FILE} is missing")
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PeakError(f"{folder} holds no .safetensors file")
    return files


def _tensors(files: list[Path]) -> dict:
    """name -> (file, dtype, shape, bytes), from the headers."""
    from safetensors import safe_open

    out = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype, shape = sl.get_dtype(), [int(d) for d in sl.get_shape()]
                    if dtype not in _ITEMSIZE:
                        raise PeakError(f"{path.name}: {name} has dtype {dtype}, unknown to peakllm info")
                    out[name] = (path, dtype, shape, math.prod(shape) * _ITEMSIZE[dtype])
        except PeakError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors' SafetensorError derives from Exception only
            raise PeakError(f"cannot read {path}: {(str(exc) or type(exc).__name__).splitlines()[0]}") from None
    return out


def _group_of(name: str, groups: dict) -> str | None:
    for gname, group in groups.items():
        for target in group.get("targets") or []:
            if target.startswith("re:"):
                if re.match(target[3:], name):
                    return gname
            elif target == name or target[:1].isupper():  # a module name, or a class name ("Linear")
                return gname
    return None


def _logical_shape(name: str, tensors: dict, scheme: dict | None) -> list[int]:
    """out x in of quantized module `name`, checked against what is stored for it."""
    if f"{name}.weight_packed" not in tensors:
        if f"{name}.weight" not in tensors:
            raise PeakError(f"{name} has a weight_scale but neither weight_packed nor weight")
        return tensors[f"{name}.weight"][2]
    from safetensors import safe_open

    path, dtype, shape, _ = tensors.get(f"{name}.weight_shape", (None, None, None, 0))
    if path is None or dtype not in ("I64", "I32") or shape != [2]:
        raise PeakError(f"{name}.weight_shape must be 2 integers beside weight_packed")
    with safe_open(str(path), framework="pt") as f:
        out_f, in_f = (int(v) for v in f.get_tensor(f"{name}.weight_shape").tolist())
    _, pdtype, packed, _ = tensors[f"{name}.weight_packed"]
    bits = (scheme or {}).get("num_bits")
    if out_f < 1 or in_f < 1 or (pdtype == "I32" and bits and packed != [out_f, math.ceil(in_f * bits / 32)]):
        raise PeakError(f"{name}: weight_shape {[out_f, in_f]} does not fit weight_packed {packed} at {bits} bits")
    return [out_f, in_f]


def describe_folder(folder) -> dict | None:
    """None when `folder` is not a compressed-tensors folder; else parameters, schemes, bytes, bits/param, and
    one row per weight-bearing module (name, kind, shape, bytes as stored)."""
    folder = Path(folder)
    qc = quantization_config(folder)
    if qc is None:
        return None
    groups = qc.get("config_groups") or {}
    files = weight_files(folder)
    tensors = _tensors(files)
    parts = {n[: -len(".weight_scale")]: [] for n in tensors if n.endswith(".weight_scale")}  # quantized modules
    for n in tensors:
        module, _, leaf = n.rpartition(".")
        if module in parts and leaf.startswith("weight"):  # weight_packed, _scale, _zero_point, _shape, _g_idx...
            parts[module].append(n)
    owned = {n for names in parts.values() for n in names}
    rows, counts, q_params, q_bytes = [], {}, 0, 0
    for m, names in parts.items():
        gname = _group_of(m, groups)
        scheme = (groups.get(gname) or {}).get("weights") or {}
        shape = _logical_shape(m, tensors, scheme)
        nbytes = sum(tensors[n][3] for n in names)
        q_params, q_bytes = q_params + math.prod(shape), q_bytes + nbytes
        bits = scheme.get("num_bits")
        fmt = (groups.get(gname) or {}).get("format") or qc.get("format")
        kind = f"{scheme.get('type') or 'int'}{bits} {fmt}" if bits else str(fmt)
        rows.append({"name": m, "kind": kind, "shape": shape, "bytes": nbytes})
        key = json.dumps({k: scheme.get(k) for k in SCHEME_FIELDS} | {"format": fmt})
        counts[key] = counts.get(key, 0) + 1
    params = q_params + sum(math.prod(t[2]) for n, t in tensors.items() if n not in owned)
    for n, (_, _, shape, nbytes) in tensors.items():
        if n not in owned and n.endswith(".weight") and len(shape) == 2:
            rows.append({"name": n[: -len(".weight")], "kind": "dense", "shape": shape, "bytes": nbytes})
    file_bytes = sum(f.stat().st_size for f in files) + sum(
        f.stat().st_size for f in [folder / INDEX_FILE] if f.is_file())
    return {
        "format": qc.get("format"),
        "schemes": [{**json.loads(k), "modules": c} for k, c in counts.items()],
        "parameters": params,
        "quantized_parameters": q_params,
        "bytes": sum(t[3] for t in tensors.values()),
        "bits_per_param": 8 * q_bytes / q_params if q_params else None,
        "bits_per_param_total": 8 * file_bytes / params if params else None,
        "modules": sorted(rows, key=lambda r: _natural(r["name"])),
    }


def _natural(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]
