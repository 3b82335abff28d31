"""llama-quantize's presets: the block type each tensor of a file gets, by its GGUF name.

``preset_types`` is ``llama_tensor_get_type`` of src/llama-quant.cpp (the llama.cpp vendored in llama-cpp-python
0.3.36) for the presets whose block types peakllm solves (Q2_K, Q3_K_S/M/L, Q4_K_S/M, Q5_K_S/M, Q6_K, Q4_0,
Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL): tensors are visited in llama.cpp's order (non-layer tensors first, then by
layer, by name within a layer), the rules read the tensor's category from its name (attn_v, ffn_down, ...),
the counters of attn_v and ffn_down tensors seen so far, the GQA ratio and the expert count, exactly as
llama.cpp does; ``--tensor-type`` patterns replace the rules for the tensors they match (the first matching
pattern wins, as in llama-quantize); last, a type whose blocks do not divide the rows falls back
(``blocks.fallback_type``). Written by name, the rules hold for every family whose tensors llama.cpp names so.

Rules of llama.cpp that need a type peakllm does not solve (the IQ1-IQ3 mixtures, Falcon, MXFP4) are left out;
the 70B rule (llama, 80 layers, GQA: attn_v Q3_K/Q4_K -> Q5_K) is kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from peakllm.errors import PeakError
from peakllm.formats.gguf.blocks import BLOCK_TYPES, fallback_type

# name -> (the type every other tensor gets, general.file_type as gguf.LlamaFileType names it)
PRESETS = {
    "Q2_K": ("Q2_K", "MOSTLY_Q2_K"), "Q3_K_S": ("Q3_K", "MOSTLY_Q3_K_S"), "Q3_K_M": ("Q3_K", "MOSTLY_Q3_K_M"),
    "Q3_K_L": ("Q3_K", "MOSTLY_Q3_K_L"), "Q4_K_S": ("Q4_K", "MOSTLY_Q4_K_S"), "Q4_K_M": ("Q4_K", "MOSTLY_Q4_K_M"),
    "Q5_K_S": ("Q5_K", "MOSTLY_Q5_K_S"), "Q5_K_M": ("Q5_K", "MOSTLY_Q5_K_M"), "Q6_K": ("Q6_K", "MOSTLY_Q6_K"),
    "Q4_0": ("Q4_0", "MOSTLY_Q4_0"), "Q4_1": ("Q4_1", "MOSTLY_Q4_1"), "Q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "Q5_1": ("Q5_1", "MOSTLY_Q5_1"), "Q8_0": ("Q8_0", "MOSTLY_Q8_0"), "IQ4_NL": ("IQ4_NL", "MOSTLY_IQ4_NL"),
}
# Block types that are no preset's name: one type on every decoder matrix (llama-quantize reads Q3_K, Q4_K and
# Q5_K as aliases of the _M presets; peakllm keeps its meaning from before the presets)
SINGLE_TYPES = tuple(t for t in BLOCK_TYPES if t not in PRESETS)


@dataclass(frozen=True)
class ModelShape:
    """What llama.cpp's rules read of the model besides tensor names."""

    n_layer: int
    n_head: int
    n_head_kv: int
    n_expert: int = 0
    arch: str = "llama"

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0


def canonical_type(text: str, *, presets: bool = False) -> str:
    """A block type (or, with ``presets``, a preset) name as the user wrote it, any case, or one error."""
    name = str(text).strip().upper()
    if name in BLOCK_TYPES or (presets and name in PRESETS):
        return name
    known = list(PRESETS) + list(SINGLE_TYPES) if presets else list(BLOCK_TYPES)
    kind = "GGUF type or preset" if presets else "GGUF block type"
    raise PeakError(f"unknown {kind} {text!r}; known: {', '.join(known)}")


def parse_overrides(items) -> tuple[tuple[str, str], ...]:
    """``PATTERN=TYPE`` strings (llama-quantize's --tensor-type) -> ((pattern, type), ...), each checked."""
    out = []
    for item in items or ():
        pattern, sep, type_name = str(item).rpartition("=")
        if not sep or not pattern or not type_name:
            raise PeakError(f"--tensor-type takes PATTERN=TYPE (e.g. attn_v=Q8_0), got {item!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise PeakError(f"--tensor-type pattern {pattern!r} is not a regular expression: {exc}") from None
        out.append((pattern, canonical_type(type_name)))
    return tuple(out)


def category(name: str) -> str:
    """llama.cpp's tensor_get_category."""
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for key, cat in (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
                     ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"),
                     ("attn_output.weight", "attn_output"), ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"),
                     ("ffn_down", "ffn_down")):
        if key in name:
            return cat
    return "other"


def quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """llama.cpp's tensor_allows_quantization, for the tensors the families peakllm writes hold."""
    return (len(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and "ffn_gate_inp.weight" not in name)


def layer_of(name: str) -> int:
    m = re.match(r"blk\.(\d+)\.", name)
    return int(m.group(1)) if m else -1


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def rule_type(preset: str, cat: str, width: int, shape: ModelShape, *, i_wv: int, n_wv: int, i_down: int,
              tied: bool, imatrix: bool, output_type: str | None = None) -> str:
    """llama_tensor_get_type_impl for one tensor of a ``preset`` file (``width``: its row length, ne[0])."""
    default = PRESETS[preset][0]
    t = default
    if cat == "output" or (tied and cat == "token_embd"):
        if output_type is not None:
            return output_type
        if width % BLOCK_TYPES[default].block:
            return "Q8_0"
        return "Q6_K" if t != "Q8_0" else t
    if cat == "token_embd":
        return t
    n_expert, n_gqa = shape.n_expert, shape.n_gqa
    if cat == "attn_v":
        if preset == "Q2_K":
            t = "Q4_K" if n_gqa >= 4 else "Q3_K"
        elif preset == "Q3_K_M":
            t = "Q5_K" if i_wv < 2 else "Q4_K"
        elif preset == "Q3_K_L":
            t = "Q5_K"
        elif preset == "IQ4_NL" and n_gqa >= 4:
            t = "Q5_K"
        elif preset in ("Q4_K_M", "Q5_K_M") and use_more_bits(i_wv, n_wv):
            t = "Q6_K"
        elif preset == "Q4_K_S" and i_wv < 4:
            t = "Q5_K"
        if shape.arch == "llama" and shape.n_layer == 80 and shape.n_head != shape.n_head_kv and t in ("Q3_K", "Q4_K"):
            t = "Q5_K"  # LLM_TYPE_70B
        return "Q8_0" if n_expert == 8 else t
    if cat == "attn_k":
        return "Q8_0" if n_expert == 8 else t
    if cat == "ffn_down":
        i, n = i_down, shape.n_layer
        if preset == "Q2_K":
            t = "Q3_K"
        elif preset == "Q3_K_M":
            t = "Q5_K" if i < n // 16 else "Q4_K"
        elif preset == "Q3_K_L":
            t = "Q5_K"
        elif preset == "Q4_K_M":
            t = "Q6_K" if use_more_bits(i, n) else t
        elif i < n // 8 and preset == "IQ4_NL" and not imatrix:
            t = "Q5_K"
        elif preset == "Q5_K_M" and use_more_bits(i, n):
            t = "Q6_K"
        elif preset == "Q4_K_S" and i < n // 8:
            t = "Q5_K"
        elif preset in ("Q4_0", "Q5_0") and imatrix and i < n // 8:
            t = "Q4_1" if preset == "Q4_0" else "Q5_1"
        return t
    if cat == "attn_output":
        if n_expert == 8:
            return "Q5_K" if preset in ("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M") else t
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(preset, t)
    return t


def llamacpp_order(names) -> list[str]:
    """llama-model-loader's weight_name_comparer: by layer (-1 for the others), then by name."""
    return sorted(names, key=lambda n: (layer_of(n), n))


def preset_types(preset: str | None, tensors: dict[str, tuple[int, ...]], shape: ModelShape, *,
                 overrides=(), imatrix: bool = True, embed_type: str | None = None,
                 base: str | None = None) -> dict[str, str]:
    """GGUF name -> block type (or "F16" where no block type takes the width) of every tensor of ``tensors``
    (GGUF name -> shape, ggml order reversed: ``(rows, cols)``) that llama-quantize quantizes.

    ``preset``: a PRESETS name; None puts the block type ``base`` on every tensor but token_embd/output (one
    type, no mixture; token_embd/output as the _M presets: Q6_K, or Q8_0 where 256 does not divide the width). ``overrides``: (pattern, type) pairs, regexes searched in the name, the first match wins.
    ``embed_type``: the type of token_embd and output (llama-quantize's --token-embedding-type and
    --output-tensor-type together; None: the preset's rule). ``imatrix``: the rules as llama-quantize applies
    them with an importance matrix (peakllm always calibrates)."""
    if preset is not None and preset not in PRESETS:
        raise PeakError(f"unknown preset {preset!r}; known: {', '.join(PRESETS)}")
    if preset is None:
        canonical_type(base)  # one type on every matrix: any block type (the CLI names Q3_K, Q4_K, Q5_K so)
    compiled = [(re.compile(p), t) for p, t in overrides]
    names = [n for n in llamacpp_order(tensors) if quantizable(n, tensors[n])]
    tied = "output.weight" not in tensors
    n_wv = sum(category(n) == "attn_v" for n in names)
    i_wv = i_down = 0
    out = {}
    for name in names:
        cat, width = category(name), tensors[name][-1]
        if embed_type is not None and cat in ("token_embd", "output"):
            out[name] = fallback_type(embed_type, width)
            continue
        manual = next((t for p, t in compiled if p.search(name)), None)
        if manual is not None:
            t = manual
        elif preset is None:  # a single type; token_embd and output as the _M presets' output (Q6_K or Q8_0)
            t = base if cat not in ("token_embd", "output") else rule_type(
                "Q4_K_M", "output", width, shape, i_wv=0, n_wv=0, i_down=0, tied=tied, imatrix=imatrix)
        else:
            t = rule_type(preset, cat, width, shape, i_wv=i_wv, n_wv=n_wv, i_down=i_down, tied=tied, imatrix=imatrix)
            i_wv += cat == "attn_v"  # llama.cpp counts only the tensors its rules saw
            i_down += cat == "ffn_down"
        out[name] = fallback_type(t, width)
    return out


def type_summary(tensors) -> dict[str, dict]:
    """Per block type, over ``tensors`` ((name, type, n_params, nbytes) each): how many tensors, their
    parameters, bytes and bits per parameter."""
    out: dict[str, dict] = {}
    for _name, type_name, n, nbytes in tensors:
        s = out.setdefault(type_name, {"tensors": 0, "params": 0, "bytes": 0})
        s["tensors"] += 1
        s["params"] += int(n)
        s["bytes"] += int(nbytes)
    for s in out.values():
        s["bits_per_param"] = 8 * s["bytes"] / s["params"] if s["params"] else None
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["params"]))


def gguf_allocation(tensors) -> dict:
    """What a result records of a file's types: per type (tensors, params, bytes, bits/param) over the 2-D
    tensors, and the type of each one by GGUF name. ``tensors``: objects with ``name``, ``type``, ``shape``,
    ``nbytes`` (the writer's WrittenTensor)."""
    matrices = [t for t in tensors if len(t.shape) == 2]
    return {"gguf_types": type_summary((t.name, t.type, t.shape[0] * t.shape[1], t.nbytes) for t in matrices),
            "gguf_tensor_map": {t.name: t.type for t in matrices}}


def file_allocation(path) -> dict:
    """The types a .gguf file holds: general.file_type, whole-file bits/param, and gguf_allocation's summary."""
    import os
    from types import SimpleNamespace

    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    file_type = gguf.LlamaFileType(int(field.parts[-1][0])).name if field is not None else None
    tensors = [SimpleNamespace(name=t.name, type=t.tensor_type.name, shape=tuple(int(d) for d in reversed(t.shape)),
                               nbytes=int(t.n_bytes)) for t in reader.tensors]
    params = sum(int(t.n_elements) for t in reader.tensors)
    return {"gguf_file_type": file_type, "bits_per_param_total": 8 * os.path.getsize(path) / params,
            **gguf_allocation(tensors)}
