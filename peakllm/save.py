"""Writing a compressed model: a plain Hugging Face folder (dense, loads anywhere), a peakllm folder
(packed: bitmask / N:M / int-k / ternary, run by peakllm's kernels), or a compressed-tensors folder."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from peakllm.errors import PeakError
from peakllm.recipes import is_expert

FORMATS = ("hf", "peakllm", "sub1", "compressed-tensors")
RUN_FILE = "peakllm_run.json"  # what produced a folder (method, settings, measured numbers)


def check_output(out_dir: str | Path, overwrite: bool) -> Path:
    """Refuse to clobber an existing non-empty folder before any work is done."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise PeakError(f"output {out} already exists and is not empty (use --overwrite to replace it)")
    return out


def check_writable(model, tokenizer, out_dir, fmt: str) -> None:
    """Try, before the compression, what could make writing `model` in `fmt` fail after it: transformers'
    refusal to save a model it holds as quantized (an `hf` folder), a config that does not serialize, a
    tokenizer that cannot be saved, an output folder that cannot be created. One PeakError saying which."""
    out = Path(out_dir)
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


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


# One 16-bit dictionary is fitted to all of a model's ternary codes when it is written, so each matrix is coded
# a little worse than by a dictionary of its own statistics (which the per-matrix accounting below assumes):
# +0.04% to +0.23% over the target at 0.8 bits/param on the moefied default model, +0.6% on tiny test experts
# (8k-16k parameters). A size target aims this much lower to land at or below it.
SUB1_SHARED_DICTIONARY_MARGIN = 0.01


def _sub1_entry_bytes(name: str, out_features: int, in_features: int, group_size: int) -> int:
    """The bytes of the manifest entry a sub1 matrix of this shape takes, sized from a placeholder."""
    from peakllm.formats.container import _compact, _module_entry
    from peakllm.formats.sub1 import placeholder

    return len(_compact({name: _module_entry(placeholder(out_features, in_features, group_size))}).encode())


def sub1_zero_share(target_bits: float, group_size: int, name: str, out_features: int, in_features: int) -> float:
    """The share of zero codes at which the ternary matrix `name` [out, in] is expected to take `target_bits`
    per parameter in the sub1 format, everything counted: stream, offsets, scales (min-max ternary levels
    are symmetric, one side stored) and its manifest entry, sized from a placeholder of its shape."""
    from peakllm.formats.sub1_code import zero_share_for_bits

    entry = _sub1_entry_bytes(name, out_features, in_features, group_size)
    return zero_share_for_bits(target_bits, out_features, in_features, group_size=group_size, extra_bytes=entry)


def sub1_bits(group_size: int, name: str, out_features: int, in_features: int, zero_share: float,
              dictionary_share: float | None = None) -> float:
    """What the ternary matrix `name` [out, in] is expected to store per parameter in the sub1 format at a
    share of zero codes, counted as `sub1_zero_share` counts. `dictionary_share`: its codes are coded by
    the dictionary of that share (one shared by many matrices) rather than by one of their own."""
    from peakllm.formats.sub1_code import PROB_Q, expected_bits_per_param

    entry = _sub1_entry_bytes(name, out_features, in_features, group_size)
    q = min(max(zero_share * PROB_Q, 1.0), PROB_Q - 1.0)
    if dictionary_share is not None:
        dq = min(max(round(dictionary_share * PROB_Q), 1), PROB_Q - 1)
        return expected_bits_per_param(out_features, in_features, q, group_size=group_size, extra_bytes=entry,
                                       dictionary_zero_q=dq)
    lo = int(q)  # own dictionaries exist at 1/256 steps: linear between them, so it is monotone in the share
    hi = min(lo + 1, PROB_Q - 1)
    b_lo, b_hi = (expected_bits_per_param(out_features, in_features, k, group_size=group_size, extra_bytes=entry)
                  for k in (lo, hi))
    return b_lo + (q - lo) * (b_hi - b_lo)


SUB1_SYM_BITS = 16  # the width of the one dictionary a model's ternary matrices share in the sub1 format


def sub1_dictionary(modules: dict):
    """The dictionary of a sub1 folder: one fitted to all ternary codes among `modules` (ModuleResults), or
    None without any (it is stored as 3 integers)."""
    from peakllm.formats.sub1_code import Sub1Dictionary

    codes = [r.quant.codes for r in modules.values() if r.quant is not None and r.quant.grid["kind"] == "ternary"]
    return Sub1Dictionary.fit(codes, SUB1_SYM_BITS) if codes else None


def packed_module(result, fmt: str = "peakllm", dictionary=None):
    """The packed form of one compressed matrix (a ModuleResult from recipes.py). In the `sub1` format
    ternary matrices use the sub-1-bit dictionary code; elsewhere they use the dense 2-bit layout."""
    from peakllm.formats.intk import PackedIntK, PackedTernary
    from peakllm.formats.sparse import PackedBitmask, PackedNM
    from peakllm.formats.sub1 import PackedSub1

    if result.mask is not None:
        if result.pattern is not None:
            n, m = result.pattern
            return PackedNM.pack(result.weight, result.mask, n, m, result.quant)
        return PackedBitmask.pack(result.weight, result.mask, result.quant)
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
    out = check_output(out_dir, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "hf":
        if any(r.quant is not None for r in modules.values()):
            raise PeakError("quantized weights need --format peakllm or compressed-tensors (an hf folder would store "
                            "them dequantized at full size)")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / RUN_FILE).write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")
            _replace_dir(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return {"size_bytes": folder_bytes(out), "bits_per_param": None}

    dictionary = sub1_dictionary(modules) if fmt == "sub1" else None
    packed = {name: packed_module(r, fmt, dictionary) for name, r in modules.items()}
    dense = dense_state(model, set(packed))

    def extra(tmp_dir):
        tokenizer.save_pretrained(tmp_dir)
        (Path(tmp_dir) / RUN_FILE).write_text(json.dumps(run_info, indent=2, sort_keys=True) + "\n")

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    from peakllm.embeddings import outer_modules
    from peakllm.formats.container import bits_per_param

    outer = set(outer_modules(model))
    linears = {n: p for n, p in packed.items() if n not in outer}
    total_params = sum(t.numel() for t in dense.values()) + sum(p.num_params for p in packed.values())
    if fmt in ("peakllm", "sub1"):
        from peakllm.formats.container import save_model_folder

        save_model_folder(out, config=config, dense_tensors=dense, packed_modules=packed,
                          manifest={"method": run_info.get("method"), "run": run_info}, extra_files=extra,
                          overwrite=overwrite)
        sizes = {"size_bytes": folder_bytes(out), "bits_per_param": bits_per_param(linears) if linears else None,
                 "bits_per_param_total": 8 * weight_file_bytes(out) / total_params}
        experts = {n: p for n, p in packed.items() if is_expert(n)}
        if experts:
            sizes["bits_per_param_experts"] = bits_per_param(experts)
        return sizes
    from peakllm.formats import compressed_tensors as ct

    ct.export_compressed_tensors(out, config, dense, packed, extra, overwrite=overwrite, actorder=ct_actorder(run_info))
    return {"size_bytes": folder_bytes(out), "bits_per_param": ct.bits_per_param(linears, ct.model_dtype(config, dense)),
            "bits_per_param_total": 8 * weight_file_bytes(out) / total_params}


def ct_actorder(run_info: dict) -> str | None:
    """What a compressed-tensors config records of GPTQ's column order (only GPTQ orders columns)."""
    return run_info.get("act_order") if run_info.get("method") == "gptq" else None


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weight_file_bytes(path: Path) -> int:
    """The weights' files; a sharded folder's index too (its manifest is what a single file's header holds)."""
    files = list(Path(path).glob("*.safetensors")) + list(Path(path).glob("model.safetensors.index.json"))
    return sum(f.stat().st_size for f in files)
