"""Models bigger than memory: a meta-device skeleton whose decoder layers are read one at a time.

`StreamedModel.open(folder)` checks a Hugging Face folder (one `model.safetensors`, or shards listed by
`model.safetensors.index.json`; bf16, fp16 or fp32) *before anything is loaded*: the index parses, every
shard exists, every header is whole and agrees with the file's size, every tensor the model needs is
there with its shape. It then builds the model on the meta device. `load_layer(i)` reads layer i's
tensors from the memory-mapped shards and upcasts them to fp32 (the same values `from_pretrained(...,
dtype=float32)` gives); `release_layer(i)` turns them back into meta tensors, so memory holds one layer.
The embedding, final norm and lm_head are loaded only while a phase needs them (`load_outer`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from peakllm import memory
from peakllm.errors import PeakError
from peakllm.formats.gguf.vocab import folder_tokenizer
from peakllm.models import resolve  # the package's loader imports this module
from peakllm.models.anatomy import check_architecture, decoder_layers
import peakllm.models.moe  # noqa: F401 - registers peakllm_moe
from peakllm.models.packed import materialize_buffers

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SOURCE_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, checked against the file's size (a cut-short file fails)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise PeakError(f"{path} is truncated ({size} bytes): not a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 256 << 20):
                raise PeakError(f"{path}: header length {n} does not fit in a {size}-byte file (truncated?)")
            header = json.loads(f.read(n).decode("utf-8"))
    except OSError as e:
        raise PeakError(f"cannot read {path}: {e.strerror}") from None
    except (UnicodeDecodeError, ValueError):
        raise PeakError(f"{path}: safetensors header is not valid JSON (corrupt file)") from None
    if not isinstance(header, dict):
        raise PeakError(f"{path}: safetensors header is not a JSON object")
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            count = 1
            for d in entry["shape"]:
                count *= int(d)
            width = _ITEMSIZE[entry["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise PeakError(f"{path}: tensor {name!r} has a malformed header entry") from None
        if stop - begin != count * width or begin < 0:
            raise PeakError(f"{path}: tensor {name!r} offsets do not match its shape")
        end = max(end, stop)
    if 8 + n + end != size:
        raise PeakError(f"{path} is truncated or padded: its header needs {8 + n + end} bytes, the file has {size}")
    return header


@dataclass
class SourceFiles:
    """Where each stored tensor lives: name -> (file, dtype name, shape)."""
    folder: Path
    tensors: dict = field(default_factory=dict)
    files: list = field(default_factory=list)

    @classmethod
    def scan(cls, folder: Path) -> "SourceFiles":
        folder = Path(folder)
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                    raise ValueError
            except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
                raise PeakError(f"{index} is not a valid safetensors index (needs a 'weight_map' of names to files)") from None
            files = sorted(set(weight_map.values()))
        elif (folder / SINGLE_FILE).is_file():
            weight_map, files = None, [SINGLE_FILE]
        else:
            raise PeakError(f"{folder} has neither {SINGLE_FILE} nor {INDEX_FILE}: streaming reads safetensors folders")
        src = cls(folder, {}, files)
        for fname in files:
            path = folder / fname
            if os.path.sep in fname or fname.startswith("..") or not path.is_file():
                raise PeakError(f"shard {fname} listed in {INDEX_FILE} is missing from {folder}")
            for name, entry in read_header(path).items():
                if name != "__metadata__":
                    src.tensors[name] = (fname, entry["dtype"], tuple(entry["shape"]))
        if weight_map is not None:
            for name, fname in weight_map.items():
                if src.tensors.get(name, (fname,))[0] != fname:
                    raise PeakError(f"{INDEX_FILE} puts {name!r} in {fname}, but that shard does not hold it")
            lost = set(weight_map) - set(src.tensors)
            if lost:
                raise PeakError(f"{INDEX_FILE} lists {len(lost)} tensors no shard holds, e.g. {sorted(lost)[0]!r}")
        return src

    def fingerprint(self) -> str:
        """Changes when any weight file or the config changes (sizes, mtimes and headers; not a full hash)."""
        h = hashlib.sha256()
        for fname in self.files + ["config.json"]:
            path = self.folder / fname
            st = path.stat()
            h.update(f"{fname}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            if fname.endswith(".safetensors"):
                with open(path, "rb") as f:
                    (n,) = struct.unpack("<Q", f.read(8))
                    h.update(f.read(n))
            else:
                h.update(path.read_bytes())
        return h.hexdigest()


class StreamedModel:
    """A causal LM on the meta device whose tensors are read from disk on demand (see the module doc)."""

    def __init__(self, folder: Path, model: nn.Module, tokenizer, source: SourceFiles, names: dict):
        self.folder, self.model, self.tokenizer, self.source = folder, model, tokenizer, source
        self._names = names  # model tensor name -> stored name

        self.layers, self.prefix = decoder_layers(model)
        self.layer_params = [sum(p.numel() for p in layer.parameters()) for layer in self.layers]
        self.source_dtype = self._source_dtype()

    @classmethod
    def open(cls, spec: str) -> "StreamedModel":
        from transformers import AutoConfig, AutoModelForCausalLM


        kind, folder = resolve(spec)
        if kind not in ("hf", "default"):
            raise PeakError(f"streaming reads Hugging Face safetensors folders; {spec!r} is a {kind} model "
                            "(load it in memory instead: --stream off)")
        source = SourceFiles.scan(folder)
        try:
            config = AutoConfig.from_pretrained(str(folder))
            tokenizer = folder_tokenizer(folder)
        except (ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
            raise PeakError(f"cannot read config/tokenizer of {folder}: {str(exc).splitlines()[0][:300]}") from None
        check_architecture(config)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.eval()
        model.config.use_cache = False
        names = _match_names(model, source, folder)

        materialize_buffers(model)
        return cls(folder, model, tokenizer, source, names)

    def _source_dtype(self) -> torch.dtype:
        kinds = {self.source.tensors[n][1] for n in self._names.values()}
        floats = [SOURCE_DTYPES[k] for k in kinds if k in SOURCE_DTYPES]
        return max(floats, key=lambda d: torch.finfo(d).bits) if floats else torch.float32

    # -- tensors
    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Model tensors by model name, read from the shards and upcast to fp32."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.source.tensors[self._names[n]][0], []).append(n)
        out = {}
        for fname, group in by_file.items():
            try:
                with safe_open(str(self.folder / fname), framework="pt") as f:
                    for n in group:
                        t = f.get_tensor(self._names[n])
                        out[n] = t.to(torch.float32) if t.is_floating_point() else t.clone()
            except (OSError, RuntimeError, ValueError) as e:  # SafetensorError derives from Exception
                raise PeakError(f"cannot read {self.folder / fname}: {str(e).splitlines()[0][:200]}") from None
            except Exception as e:
                if type(e).__name__ == "SafetensorError":
                    raise PeakError(f"cannot read {self.folder / fname}: {e}") from None
                raise
        return out

    def _assign(self, module: nn.Module, prefix: str, recurse: bool = True) -> None:
        own = [n for n, _ in module.named_parameters(recurse=recurse)]
        values = self._read([f"{prefix}{n}" for n in own if f"{prefix}{n}" in self._names])
        for n in own:
            if f"{prefix}{n}" in values:
                _set_tensor(module, n, values[f"{prefix}{n}"])

    def load_layer(self, i: int) -> nn.Module:
        layer = self.layers[i]
        self._assign(layer, f"{self.prefix}.{i}.")
        left = [n for n, p in layer.named_parameters() if p.is_meta]
        if left:
            raise PeakError(f"{self.folder}: no stored tensor for {self.prefix}.{i}.{left[0]}")
        return layer

    def release_layer(self, i: int) -> None:
        self.layers[i].to("meta")

    def outer_modules(self) -> list[tuple[str, nn.Module]]:
        """Modules outside the decoder layers that hold parameters (embedding, final norm, lm_head, ...)."""
        layer_ids = {id(m) for layer in self.layers for m in layer.modules()}
        out = []
        for name, mod in self.model.named_modules():
            if id(mod) in layer_ids or not list(mod.parameters(recurse=False)):
                continue
            out.append((name, mod))
        return out

    def load_outer(self, which: str = "all") -> None:
        """'input': everything the base model runs (embedding, norms), not an untied lm_head;
        'all': every non-layer parameter."""
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        head = self.model.get_output_embeddings()
        for name, mod in self.outer_modules():
            if which == "input" and mod is head:
                continue
            if any(p.is_meta for p in mod.parameters(recurse=False)):
                self._assign(mod, f"{name}." if name else "", recurse=False)
        if tied:
            self.model.tie_weights()

    def release_outer(self) -> None:
        for _, mod in self.outer_modules():
            for n, p in list(mod.named_parameters(recurse=False)):
                _set_tensor(mod, n, torch.empty_like(p, device="meta"))

    def stored_dtype_name(self) -> str:
        return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}[self.source_dtype]

    def num_params(self) -> int:
        """Parameters as stored (a tied lm_head counts once, even while the meta skeleton is untied)."""
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        head = self.model.get_output_embeddings()
        return sum(p.numel() for n, p in self.model.named_parameters()
                   if not (tied and head is not None and p is head.weight and not n.startswith(self.prefix)
                           and n.endswith("lm_head.weight")))

    def bytes_on_disk(self) -> int:
        return sum((self.folder / f).stat().st_size for f in self.source.files)


def should_stream(model: str, mode: str, limit_bytes: int | None) -> bool:
    """--stream on/off, or auto: stream when `model` is a safetensors folder whose weights in fp32 take more
    than half of `limit_bytes` (default: the memory the machine has available)."""
    if mode != "auto":
        return mode == "on"

    kind, path = resolve(model)
    if kind != "hf":
        return False
    src = SourceFiles.scan(path)
    fp32 = sum(4 * math.prod(shape) for _, dtype, shape in src.tensors.values() if dtype in SOURCE_DTYPES)
    limit = limit_bytes if limit_bytes is not None else memory.available_bytes()
    return limit is not None and fp32 > limit // 2


def _set_tensor(module: nn.Module, dotted: str, value: torch.Tensor) -> None:
    parent_name, _, leaf = dotted.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    old = parent._parameters.get(leaf)
    parent._parameters[leaf] = nn.Parameter(value, requires_grad=False if old is None else old.requires_grad)


def _match_names(model: nn.Module, source: SourceFiles, folder: Path) -> dict:
    """Map every parameter of the model to a stored tensor of the same name and shape (tied lm_head may be
    absent). Checked up front, so a missing or mis-shaped tensor fails before any work."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    names = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if name not in source.tensors:
            if tied and name == "lm_head.weight":
                continue
            raise PeakError(f"{folder}: the weights lack {name!r} (a missing shard, or a checkpoint layout this "
                            "transformers version renames on load, which streaming does not support)")
        fname, dtype, shape = source.tensors[name]
        if dtype not in SOURCE_DTYPES and p.is_floating_point():
            raise PeakError(f"{folder}: {name!r} is stored as {dtype}; streaming reads bf16, fp16 or fp32 weights")
        if tuple(shape) != tuple(p.shape):
            raise PeakError(f"{folder}: {name!r} is stored with shape {list(shape)}, the config needs {list(p.shape)}")
        names[name] = name
    return names
