"""Export to the compressed-tensors "pack-quantized" format, which transformers (with the compressed-tensors
package) and vLLM load as a normal Hugging Face folder.

What that format represents, read from compressed-tensors 0.20 (compressors/pack_quantized, quantization/):
  - integer weight-only quantization, 1..8 bits, strategy "group" (group_size must divide in_features) or
    "channel" (one group per row), symmetric or asymmetric;
  - codes are signed, q_s = q - 2^(bits-1), and dequantize as (q_s - zp_s) * scale, so our unsigned
    (q - zero) * scale is the same number with zp_s = zero - 2^(bits-1); symmetric means zp_s = 0;
  - `weight_packed` int32 [out, ceil(in*bits/32)]: each row a little-endian bitstream of q_s + 2^(bits-1),
    i.e. exactly our codes' bitstream padded to whole 32-bit words;
  - `weight_zero_point` (asymmetric only) int32: the [out, n_groups] zero points packed the same way but
    down the columns (packed_dim=0), shape [ceil(out*bits/32), n_groups];
  - `weight_scale` [out, n_groups] in the model's dtype; `weight_shape` int64 [2].
Not representable: act-order g_idx (compressed-tensors removed "group" activation ordering), a partial last
group, ternary grids, and any sparse layout (its sparse compressors do not combine with pack-quantized).
"""

import json
from pathlib import Path

import torch

from peakllm.errors import PeakError
from peakllm.formats.bitpack import pack_bits
from peakllm.formats.folder import staged_dir
from peakllm.formats.intk import PackedIntK
from peakllm.formats.tensor_file import write_safetensors

CT_FORMAT = "pack-quantized"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _as_words(packed_bytes: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, nbytes] -> int32 [rows, ceil(nbytes/4)], zero-padded (little-endian words)."""
    rows, nbytes = packed_bytes.shape
    pad = -nbytes % 4
    if pad:
        packed_bytes = torch.nn.functional.pad(packed_bytes, (0, pad))
    return packed_bytes.contiguous().reshape(-1).view(torch.int32).reshape(rows, -1)


def _check_representable(name: str, mod) -> None:
    if not isinstance(mod, PackedIntK):
        raise PeakError(f"{name}: compressed-tensors export supports int-k weights only, not {mod.kind!r} "
                        "(ternary, sub-1-bit and sparse layouts have no pack-quantized form)")
    if mod.g_idx is not None:
        raise PeakError(f"{name}: act-order groups (g_idx) cannot be exported: compressed-tensors "
                        "no longer supports group activation ordering; use --act-order static (the default)")
    if mod.group_size != -1 and mod.in_features % mod.group_size:
        raise PeakError(f"{name}: compressed-tensors needs group_size ({mod.group_size}) to divide "
                        f"in_features ({mod.in_features})")


def module_scheme(mod: PackedIntK) -> dict:
    weights = {"num_bits": mod.bits, "type": "int", "symmetric": mod.sym, "dynamic": False,
               "strategy": "channel" if mod.group_size == -1 else "group",
               "group_size": None if mod.group_size == -1 else mod.group_size}
    return {"weights": weights, "input_activations": None, "output_activations": None, "format": CT_FORMAT}


def module_tensors(name: str, mod: PackedIntK, dtype: torch.dtype) -> dict:
    """The compressed-tensors tensors of one int-k linear layer."""
    _check_representable(name, mod)
    out = {f"{name}.weight_packed": _as_words(mod.qweight),
           f"{name}.weight_scale": mod.scales.to(dtype).contiguous(),
           f"{name}.weight_shape": torch.tensor([mod.out_features, mod.in_features], dtype=torch.int64)}
    if not mod.sym:
        # zero points packed down the rows: transpose, pack each column as a bitstream, transpose back
        out[f"{name}.weight_zero_point"] = _as_words(pack_bits(mod.zeros.T.contiguous(), mod.bits)).T.contiguous()
    return out


def stored_bits(name: str, mod: PackedIntK, dtype: torch.dtype) -> int:
    """Bits this format stores for one module (its tensors; the config entry is shared)."""
    return 8 * sum(t.numel() * t.element_size() for t in module_tensors(name, mod, dtype).values())


def bits_per_param(packed_modules: dict, dtype: torch.dtype) -> float:
    """Bits per parameter of these modules as written here (scales in the model's dtype)."""
    bits = sum(stored_bits(name, mod, dtype) for name, mod in packed_modules.items())
    return bits / sum(mod.num_params for mod in packed_modules.values())


def model_dtype(hf_model_config: dict, dense_tensors: dict) -> torch.dtype:
    return _model_dtype(hf_model_config, dense_tensors)


def quantization_config(packed_modules: dict, actorder: str | None = None) -> dict:
    """config.json's quantization_config: one config group per distinct scheme, targeting modules by name.

    transformers 5.23 with compressed-tensors 0.20 cannot load asymmetric pack-quantized weights the default
    way (it lays out the compressed modules with unpacked zero points, then finds the packed ones on disk),
    so with any asymmetric module the config asks transformers to dequantize at load time instead; that path
    decodes every module with the first config group, so it takes exactly one scheme.
    """
    return config_from_schemes({name: module_scheme(mod) for name, mod in packed_modules.items()}, actorder)


def config_from_schemes(schemes: dict, actorder: str | None = None) -> dict:
    """quantization_config from each module's scheme (see quantization_config). ``actorder`` "static" records
    that GPTQ swept the columns in activation order with contiguous groups (nothing changes in the tensors)."""
    if actorder not in (None, "none", "static"):
        raise PeakError(f"compressed-tensors cannot store act_order {actorder!r} (only static: no g_idx)")
    if actorder == "static":
        schemes = {name: {**s, "weights": {**s["weights"], "actorder": "static"}} for name, s in schemes.items()}
    groups: dict[str, dict] = {}
    for name, scheme in schemes.items():
        key = json.dumps(scheme, sort_keys=True)
        groups.setdefault(key, {"targets": [], **scheme})["targets"].append(name)
    config = {"quant_method": "compressed-tensors", "format": CT_FORMAT, "quantization_status": "compressed",
              "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
              "ignore": [], "kv_cache_scheme": None, "global_compression_ratio": None}
    if any(not scheme["weights"]["symmetric"] for scheme in schemes.values()):
        if len(groups) > 1:
            raise PeakError("compressed-tensors export of asymmetric weights takes one scheme (bits, group size) "
                            "for all layers, since transformers can only dequantize those at load time and then "
                            f"applies the first scheme to every layer; got {len(groups)} schemes")
        config["dequantize"] = True
    return config


def _model_dtype(hf_model_config: dict, dense_tensors: dict) -> torch.dtype:
    name = hf_model_config.get("dtype") or hf_model_config.get("torch_dtype")
    if name is not None:
        if name not in _DTYPES:
            raise PeakError(f"model dtype {name!r} is not one of {sorted(_DTYPES)}")
        return _DTYPES[name]
    floats = {t.dtype for t in dense_tensors.values() if t.dtype.is_floating_point}
    return floats.pop() if len(floats) == 1 else torch.float32


def export_compressed_tensors(out_dir, hf_model_config: dict, dense_tensors: dict, packed_modules: dict,
                              tokenizer_save_fn=None, *, overwrite: bool = False, actorder: str | None = None) -> Path:
    """Write a Hugging Face folder (config.json with quantization_config, model.safetensors, tokenizer via
    tokenizer_save_fn(tmp_dir)) that `AutoModelForCausalLM.from_pretrained` loads with compressed-tensors.

    packed_modules maps Linear module names ("model.layers.0.mlp.up_proj") to PackedIntK; dense_tensors
    holds every other parameter under its Hugging Face name. Weight scales are written in the model dtype
    (exact for fp32/fp16 since they are fp16 values; bf16 rounds them).
    """
    out_dir = Path(out_dir)
    if not packed_modules:
        raise PeakError("nothing to export: no quantized modules (save a dense model with transformers instead)")
    dtype = _model_dtype(hf_model_config, dense_tensors)
    tensors = dict(dense_tensors)
    if hf_model_config.get("tie_word_embeddings") and "lm_head.weight" not in packed_modules:
        tensors.pop("lm_head.weight", None)  # transformers re-ties it to the embedding on load
    for name, mod in packed_modules.items():
        for key, t in module_tensors(name, mod, dtype).items():
            if key in tensors or f"{name}.weight" in dense_tensors:
                raise PeakError(f"{name} is given both as a dense weight and as a quantized module")
            tensors[key] = t
    config = dict(hf_model_config)
    config["quantization_config"] = quantization_config(packed_modules, actorder)
    try:
        config_text = json.dumps(config, indent=2, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise PeakError(f"hf_model_config must be JSON-serialisable: {e}") from None

    with staged_dir(out_dir, overwrite) as tmp:
        write_safetensors(tmp / "model.safetensors", tensors, {"format": "pt"})
        (tmp / "config.json").write_text(config_text + "\n")
        if tokenizer_save_fn is not None:
            tokenizer_save_fn(tmp)
    return out_dir
