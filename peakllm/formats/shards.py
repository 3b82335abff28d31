"""Writing a model folder one shard at a time, in every output format, for models bigger than memory.

The streaming pipeline hands over each decoder layer's tensors as soon as the layer is compressed
(`write(k, dense, packed)`), and the rest (embeddings, norms, lm_head) last; `finish()` writes the index
and config. What the writer must remember between shards (tensor descriptions, module entries, shard
checksums, size accounting) is small and JSON-serialisable (`state()` / `from_state()`), so a killed run
resumes with the shards already on disk. Formats:
  - peakllm / sub1: shards in the container's layout; the manifest (as in a single-file folder, with
    each shard's sha256 instead of one data checksum) lives in `model.safetensors.index.json`'s metadata
    and in peakllm.json;
  - hf: dense weights (pruned or not) in the input's dtype, the standard sharded Hugging Face layout;
  - compressed-tensors: pack-quantized int-k tensors, standard sharded layout, quantization_config.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from peakllm.errors import PeakError
from peakllm.formats.compressed_tensors import config_from_schemes, module_scheme, module_tensors, stored_bits
from peakllm.formats.container import (CONFIG_FILE, CONTAINER_VERSION, FORMAT_NAME, INDEX_FILE, MANIFEST_FILE,
                                       RESERVED_KEYS, all_tensors, build_module, compact_json, kind_class,
                                       module_entry)
from peakllm.formats.sub1 import PackedSub1
from peakllm.formats.tensor_file import data_sha256, describe_tensor, read_safetensors, write_safetensors
from peakllm.models.anatomy import is_expert


def shard_name(k: int, total: int) -> str:
    return f"model-{k + 1:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    def __init__(self, folder: Path, fmt: str, total: int, dtype: torch.dtype = torch.float32):
        self.folder, self.fmt, self.total, self.dtype = Path(folder), fmt, total, dtype
        self.dense: dict = {}       # name -> {"dtype", "shape"}
        self.modules: dict = {}     # name -> manifest entry
        self.schemes: dict = {}     # compressed-tensors: name -> scheme
        self.shards: dict = {}      # file -> sha256 (peakllm) or "" (others)
        self.weight_map: dict = {}
        self.total_size = 0
        self.packed_bits = 0        # for bits_per_param, counted as container.bits_per_param does
        self.packed_params = 0
        self.expert_bits = 0        # MoE experts alone (bits_per_param_experts)
        self.expert_params = 0
        self.dense_params = 0
        self.all_packed_params = 0  # linears and outer matrices (embedding, lm_head): bits_per_param_total
        self.outer: list = []       # packed embedding / lm_head: not linears of bits_per_param

    def state(self) -> dict:
        return {k: getattr(self, k) for k in ("fmt", "total", "dense", "modules", "schemes", "shards", "weight_map",
                                              "total_size", "packed_bits", "packed_params", "expert_bits", "expert_params",
                                              "dense_params", "all_packed_params", "outer")}

    @classmethod
    def from_state(cls, folder: Path, state: dict, dtype: torch.dtype) -> "ShardWriter":
        w = cls(folder, state["fmt"], state["total"], dtype)
        for k, v in state.items():
            setattr(w, k, v)
        return w

    def write(self, k: int, dense: dict, packed: dict, outer: bool = False) -> str:
        """Write shard k (atomically: temp file, then rename) and remember what it holds. ``outer``: the
        packed modules are the embedding / lm_head, which bits_per_param (of the linears) leaves out."""
        if outer:
            self.outer.extend(n for n in packed if n not in self.outer)
        fname = shard_name(k, self.total)
        tmp = self.folder / f".{fname}.tmp"
        if self.fmt in ("peakllm", "sub1"):
            tensors = all_tensors(dense, packed)
            digest = data_sha256(tensors)
            write_safetensors(tmp, tensors, {"peakllm_shard": fname})
            self.shards[fname] = digest
            self.dense.update({n: describe_tensor(t) for n, t in dense.items()})
            for name, mod in packed.items():
                entry = module_entry(mod)
                self.modules[name] = entry
                if name not in self.outer:
                    self._count(name, mod, entry)
        else:
            tensors = {n: (t.to(self.dtype) if t.is_floating_point() else t).contiguous() for n, t in dense.items()}
            if self.fmt == "compressed-tensors":
                for name, mod in packed.items():
                    tensors.update(module_tensors(name, mod, self.dtype))
                    self.schemes[name] = module_scheme(mod)
                    if name not in self.outer:
                        self._count(name, mod, module_entry(mod), stored_bits(name, mod, self.dtype))
            elif packed:
                raise PeakError("quantized weights need --format peakllm or compressed-tensors")
            write_safetensors(tmp, tensors, {"format": "pt"})
            self.shards[fname] = ""
        self.dense_params += sum(t.numel() for t in dense.values())
        self.all_packed_params += sum(mod.num_params for mod in packed.values())
        for name, t in tensors.items():
            self.weight_map[name] = fname
            self.total_size += t.numel() * t.element_size()
        os.replace(tmp, self.folder / fname)
        return fname

    def _count(self, name: str, mod, entry: dict, bits: int | None = None) -> None:
        # as container.bits_per_param counts them, or the bits another format stores
        if bits is None:
            bits = 8 * (mod.nbytes + len(compact_json({name: entry}).encode()))
        self.packed_bits += bits
        self.packed_params += mod.num_params

        if is_expert(name):
            self.expert_bits += bits
            self.expert_params += mod.num_params

    def bits_per_param(self) -> float | None:
        return self.packed_bits / self.packed_params if self.packed_params else None

    def finish(self, config: dict, manifest: dict | None = None, actorder: str | None = None) -> None:
        """Index and config.json (the caller adds tokenizer and run files); ``actorder`` as compressed-tensors
        records it."""
        config = dict(config)
        config.pop("quantization_config", None)
        index_meta: dict = {"total_size": self.total_size}
        if self.fmt in ("peakllm", "sub1"):
            full = {k: v for k, v in (manifest or {}).items() if k not in RESERVED_KEYS}
            full.update(format=FORMAT_NAME, version=CONTAINER_VERSION, dense=self.dense, modules=self.modules,
                        shards=self.shards)
            index_meta[FORMAT_NAME] = compact_json(full)
            (self.folder / MANIFEST_FILE).write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        elif self.fmt == "compressed-tensors":
            if not self.schemes:
                raise PeakError("nothing to export: no quantized modules")
            config["quantization_config"] = config_from_schemes(self.schemes, actorder)
        index = {"metadata": index_meta, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        (self.folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def ternary_to_sub1(writer: ShardWriter, dictionary) -> ShardWriter:
    """Re-encode the ternary modules of every shard `writer` wrote in the sub-1-bit code, with one
    dictionary fitted to the whole model's codes (known only once every layer is done). Shard by shard
    into a staging folder, then moved over the originals: a run killed meanwhile still has them."""
    import shutil


    staging = writer.folder / ".sub1"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    new = ShardWriter(staging, "sub1", writer.total, writer.dtype)
    new.outer = list(writer.outer)
    home = {mod: writer.weight_map[f"{mod}.{next(iter(entry['tensors']))}"] for mod, entry in writer.modules.items()}
    for fname, digest in sorted(writer.shards.items()):
        _, tensors = read_safetensors(writer.folder / fname, lambda _m, d=digest: d)
        dense = {n: t for n, t in tensors.items() if n in writer.dense}
        packed = {}
        for mod, entry in writer.modules.items():
            if home[mod] != fname:
                continue
            local = {ln: tensors[f"{mod}.{ln}"] for ln in entry["tensors"]}
            pm = build_module(kind_class(entry["kind"]), mod, local, entry["metadata"])
            if pm.kind == "ternary":
                pm = PackedSub1.encode(pm.codes(), pm.scale_neg, pm.scale_pos, pm.group_size, dictionary)
            packed[mod] = pm
        new.write(int(fname.split("-")[1]) - 1, dense, packed)
    for fname in new.shards:
        os.replace(staging / fname, writer.folder / fname)
    staging.rmdir()
    new.folder = writer.folder
    return new
