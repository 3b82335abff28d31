"""Writing a compressed model: a plain Hugging Face folder (dense, loads anywhere), a peakllm folder
(packed: bitmask / N:M / int-k / ternary, run by peakllm's kernels), a compressed-tensors folder, or one
.gguf file in llama.cpp's block types (formats/gguf)."""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from peakllm.errors import PeakError
from peakllm.formats import compressed_tensors as ct, sub1_size
from peakllm.formats.container import bits_per_param, save_model_folder
from peakllm.formats.folder import check_output, staged_dir
from peakllm.formats.gguf.presets import gguf_allocation
from peakllm.formats.gguf.vocab import save_tokenizer
from peakllm.formats.gguf.writer import check_model as check_gguf_model, write_gguf
from peakllm.formats.intk import PackedIntK, PackedTernary
from peakllm.formats.sparse import PackedBitmask, PackedNM
from peakllm.formats.sub1 import PackedSub1
from peakllm.models.anatomy import is_expert, outer_modules

FORMATS = ("hf", "peakllm", "sub1", "compressed-tensors", "gguf")
RUN_FILE = "peakllm_run.json"  # what produced a folder (method, settings, measured numbers)


def check_destination(out, fmt: str, overwrite: bool) -> Path:
    """Refuse, before any work, an output that would clobber something: a folder for every format but gguf,
    which writes one .gguf file."""
    out = Path(out)
    if fmt != "gguf":
        return check_output(out, overwrite)
    if out.suffix != ".gguf":
        raise PeakError(f"--format gguf writes one file: give --output a name ending in .gguf, not {out}")
    if out.is_dir():
        raise PeakError(f"output {out} is a folder; --format gguf writes one .gguf file")
    if out.exists() and not overwrite:
        raise PeakError(f"output {out} already exists (use --overwrite to replace it)")
    return out


def check_writable(model, tokenizer, out_dir, fmt: str) -> None:
    """Try, before the compression, what could make writing `model` in `fmt` fail after it: transformers'
    refusal to save a model it holds as quantized (an `hf` folder), a config that does not serialize, a
    tokenizer that cannot be saved, an output folder that cannot be created. One PeakError saying which."""
    out = Path(out_dir)
    if fmt == "gguf":
        check_gguf_model(model)  # the families the GGUF writer knows
    quantizer = getattr(model, "hf_quantizer", None)
    if fmt == "hf" and quantizer is not None and not quantizer.is_serializable():
        method = getattr(quantizer.quantization_config, "quant_method", "?")
        raise PeakError(f"the model is held quantized by transformers ({getattr(method, 'value', method)}), which "
                        "cannot save it as an hf folder; choose another --format")
    try:
        json.dumps(model.config.to_dict())
    except (TypeError, ValueError) as exc:
        raise PeakError(f"the model's config cannot be written as JSON: {exc}") from None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.check-", dir=out.parent))
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        raise PeakError(f"cannot create the output folder {out}: {exc.strerror or exc}{where}") from None
    try:
        tokenizer.save_pretrained(tmp)
    except (OSError, TypeError, ValueError) as exc:
        raise PeakError(f"cannot write the model's tokenizer to {out}: {str(exc).strip().splitlines()[0][:300]}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def packed_module(result, fmt: str = "peakllm", dictionary=None):
    """The packed form of one compressed matrix (a ModuleResult from recipes.py). In the `sub1` format
    ternary matrices use the sub-1-bit dictionary code; elsewhere they use the dense 2-bit layout."""
    if result.mask is not None:
        # float values in the dtype the recipe rounded them to (exact: the weight holds such values)
        dtype = getattr(result, "values_dtype", None)
        weight = result.weight if dtype is None or result.quant is not None else result.weight.to(dtype)
        if result.pattern is not None:
            n, m = result.pattern
            return PackedNM.pack(weight, result.mask, n, m, result.quant)
        return PackedBitmask.pack(weight, result.mask, result.quant)
    if result.quant is not None:
        if result.quant.grid["kind"] == "ternary":
            if fmt == "sub1":
                return PackedSub1.from_quantized(result.quant, dictionary)
            return PackedTernary.from_quantized(result.quant)
        return PackedIntK.from_quantized(result.quant)
    raise PeakError("a compressed module has neither a mask nor codes to pack")


def dense_state(model, skip_modules: set[str]) -> dict[str, torch.Tensor]:
    """State dict without the packed modules' weights and without tied duplicates."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    fused = {name.rsplit(".", 1)[0] for name in skip_modules if is_expert(name)}  # <experts>.<part>
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith(".weight") and name[: -len(".weight")] in skip_modules:
            continue
        if name in fused:
            continue
        if tied and name == "lm_head.weight":
            continue
        out[name] = t.detach().contiguous()
    return out


def layer_tensors(layer, prefix: str, packed: dict, fmt: str) -> tuple[dict, dict]:
    """(dense tensors, packed modules) of one compressed decoder layer under its full names, as the
    whole-model writers would store them (streaming writes them shard by shard)."""
    packed = {} if fmt == "hf" else packed
    fused = {name.rsplit(".", 1)[0] for name in packed if is_expert(name)}
    dense = {}
    for name, t in layer.state_dict().items():
        full = prefix + name
        if full.endswith(".weight") and full[: -len(".weight")] in packed:
            continue
        if full in fused:
            continue
        dense[full] = t.detach().contiguous()
    return dense, packed


def save_compressed(model, tokenizer, modules: dict, out_dir, *, fmt: str, run_info: dict,
                    overwrite: bool = False) -> dict:
    """Write `model` (already compressed in place) to `out_dir` in format `fmt`; return size facts."""
    if fmt not in FORMATS:
        raise PeakError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = check_destination(out_dir, fmt, overwrite)
    if fmt == "gguf":
        return _save_gguf(model, tokenizer, modules, out, file_type=run_info.get("file_type"))
    if fmt == "hf":
        if any(r.quant is not None for r in modules.values()):
            raise PeakError("quantized weights need --format peakllm or compressed-tensors (an hf folder would store "
                            "them dequantized at full size)")
        with staged_dir(out, overwrite) as tmp:
            model.save_pretrained(tmp)
            save_tokenizer(tokenizer, tmp)
            (tmp / RUN_FILE).write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")
        return {"size_bytes": folder_bytes(out), "bits_per_param": None}

    dictionary = sub1_size.shared_dictionary(modules) if fmt == "sub1" else None
    packed = {name: packed_module(r, fmt, dictionary) for name, r in modules.items()}
    dense = dense_state(model, set(packed))

    def extra(tmp_dir):
        save_tokenizer(tokenizer, tmp_dir)
        (Path(tmp_dir) / RUN_FILE).write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")

    config = model.config.to_dict()
    config.pop("quantization_config", None)

    outer = set(outer_modules(model))
    linears = {n: p for n, p in packed.items() if n not in outer}
    total_params = sum(t.numel() for t in dense.values()) + sum(p.num_params for p in packed.values())
    if fmt in ("peakllm", "sub1"):
        save_model_folder(out, config=config, dense_tensors=dense, packed_modules=packed,
                          manifest={"method": run_info.get("method"), "run": run_info}, extra_files=extra,
                          overwrite=overwrite)
        sizes = {"size_bytes": folder_bytes(out), "bits_per_param": bits_per_param(linears) if linears else None,
                 "bits_per_param_total": 8 * weight_file_bytes(out) / total_params}
        experts = {n: p for n, p in packed.items() if is_expert(n)}
        if experts:
            sizes["bits_per_param_experts"] = bits_per_param(experts)
        sizes.update(decode_read(model, packed))
        return sizes
    ct.export_compressed_tensors(out, config, dense, packed, extra, overwrite=overwrite, actorder=ct_actorder(run_info))
    return {"size_bytes": folder_bytes(out), "bits_per_param": ct.bits_per_param(linears, ct.model_dtype(config, dense)),
            "bits_per_param_total": 8 * weight_file_bytes(out) / total_params}


def decode_read(model, packed: dict) -> dict:
    """What decoding one token reads of the weights as written (every linear module and the lm_head, a tied
    one being the stored embedding; fused MoE experts are not counted), the same for the dense model in bf16,
    and their ratio: the decode speed-up over bf16 that a bandwidth-bound decode would reach (`peakllm bench`
    measures the real one)."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(m): n for n, m in model.named_modules()}
    tied = head is not None and len(outer_modules(model)) == 1
    read, params = 0, 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        key = names[id(embed)] if tied and mod is head else name
        weight = embed.weight if key != name else mod.weight
        read += packed[key].nbytes if key in packed else weight.numel() * weight.element_size()
        params += weight.numel()
    if not params:
        return {}
    return {"decode_bytes_per_token": read, "decode_bytes_per_token_bf16": 2 * params,
            "roofline_speedup_vs_bf16": 2 * params / read}


def _save_gguf(model, tokenizer, modules: dict, out: Path, file_type: str | None = None) -> dict:
    """Every compressed matrix in its block type, the rest as llama.cpp's converter stores it (F16, norms F32)."""
    missing = [n for n, r in modules.items() if r.ggml is None]
    if missing:
        raise PeakError(f"--format gguf stores matrices solved onto a GGUF block type; {missing[0]} is not")
    written = write_gguf(model, tokenizer, out, {f"{n}.weight": r.ggml for n, r in modules.items()},
                         file_type=file_type)
    return gguf_sizes(written, sum(p.numel() for p in model.parameters()), out)  # a tied lm_head counts once


def gguf_sizes(written: list, total_params: int, out: Path) -> dict:
    """Size facts of a written .gguf file: bits/param of the decoder's matrices and of the whole file."""
    linears = [t for t in written if t.name.startswith("blk.") and len(t.shape) == 2]  # the decoder's matrices
    linear_bytes = sum(t.nbytes for t in linears)
    linear_params = sum(math.prod(t.shape) for t in linears)
    types: dict[str, int] = {}
    for t in written:
        types[t.type] = types.get(t.type, 0) + 1
    return {"size_bytes": out.stat().st_size, "bits_per_param": 8 * linear_bytes / linear_params if linear_params else None,
            "bits_per_param_total": 8 * out.stat().st_size / total_params, "gguf_tensor_types": types,
            **gguf_allocation(written)}


def ct_actorder(run_info: dict) -> str | None:
    """What a compressed-tensors config records of GPTQ's column order (only GPTQ orders columns)."""
    return run_info.get("act_order") if run_info.get("method") == "gptq" else None


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weight_file_bytes(path: Path) -> int:
    """The weights' files; a sharded folder's index too (its manifest is what a single file's header holds)."""
    files = list(Path(path).glob("*.safetensors")) + list(Path(path).glob("model.safetensors.index.json"))
    return sum(f.stat().st_size for f in files)
