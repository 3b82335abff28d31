"""One recovery run: checks -> load student and teacher -> perplexity before -> train -> perplexity after ->
write the adapter (or the merged / fine-tuned model) -> a result dict for --json."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from peakllm import memory
from peakllm.calibrate.preflight import check_disk
from peakllm.data import calibration_segments, tokenizer_key
from peakllm.errors import PeakError
from peakllm.eval import cached_evaluate, evaluate
from peakllm.formats.folder import check_output, staged_dir
from peakllm.formats.gguf.vocab import save_tokenizer
from peakllm.formats.writer import RUN_FILE
from peakllm.models import load_model, resolve
from peakllm.recover import lomo, lora
from peakllm.recover.loop import STATE_FILE, data_parallel, train
from peakllm.recover.spec import RecoverSpec

RECOVER_FILE = "peakllm_recover.json"  # beside an adapter: how it was made and what it measured


def recorded_source(model_spec: str) -> str | None:
    """The model a peakllm output records as its source (a recovered model: its teacher)."""
    _, path = resolve(model_spec)
    file = Path(path) / RUN_FILE if Path(path).is_dir() else None
    if file is None or not file.is_file():
        return None
    try:
        info = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return info.get("teacher") or info.get("model")


def teacher_of(spec: RecoverSpec) -> str:
    teacher = spec.teacher or recorded_source(spec.model)
    if teacher is None:
        raise PeakError(f"{spec.model} does not record the model it was made from: give --teacher")
    resolve(teacher)  # a missing teacher is an error now, not after the student is loaded
    return teacher


def weight_bytes(model_spec: str) -> int:
    """Bytes of a model's weights in fp32 memory, from its files (a GGUF dequantizes to ~8x its size)."""
    kind, path = resolve(model_spec)
    if kind == "gguf":
        return 8 * path.stat().st_size
    files = list(Path(path).glob("*.safetensors"))
    return sum(f.stat().st_size for f in files)


def activation_bytes(spec: RecoverSpec, config) -> int:
    """A generous bound on one step's activations and their gradients, and the logits of the plain path (fp32;
    the chunked loss holds a chunk of them only)."""
    tokens = spec.batch_size * spec.seqlen
    hidden, layers = config.hidden_size, config.num_hidden_layers
    inter = getattr(config, "intermediate_size", 4 * hidden)
    return 4 * tokens * (layers * (12 * hidden + 4 * inter) + 10 * config.vocab_size)


def check_resources(spec: RecoverSpec, teacher: str, config) -> None:
    """Memory and disk for the run, refused before any work when they clearly do not fit."""
    student_b, teacher_b = weight_bytes(spec.model), weight_bytes(teacher)
    extra = {"lora": 0, "lomo": 0, "adamw": 3 * student_b}[spec.method]  # AdamW: gradients and two moments
    need = student_b + teacher_b + extra + activation_bytes(spec, config)
    available = memory.available_bytes()
    if available is not None and need > available:
        raise PeakError(f"the run needs about {memory.gb(need)} of memory (student {memory.gb(student_b)}, teacher "
                        f"{memory.gb(teacher_b)}, optimizer {memory.gb(extra)}, activations at --batch-size "
                        f"{spec.batch_size} x --seqlen {spec.seqlen}); {memory.gb(available)} is available")
    trainable = student_b if spec.method != "lora" else student_b // 50
    out = trainable if (spec.method != "lora" or spec.merge) else student_b // 50
    check_disk(Path(spec.output), out + trainable * (3 if spec.method == "adamw" else 1) + (1 << 20))


def check_models(spec: RecoverSpec, student, tok, teacher, ttok) -> None:
    """What the shapes allow to refuse before training: another vocabulary, a merge or LOMO on packed weights."""
    sv, tv = student.config.vocab_size, teacher.config.vocab_size
    if sv != tv or tokenizer_key(tok) != tokenizer_key(ttok):
        raise PeakError(f"the teacher's vocabulary differs from the student's ({tv} vs {sv} tokens, or another "
                        "tokenizer): distillation compares their logits token by token; give a --teacher of the "
                        "same tokenizer")
    if spec.method != "lora":
        lomo.check_dense_linears(student)
    if spec.merge and lora.has_packed(student):
        raise PeakError("--merge into packed int-k / sparse-packed weights would need them re-solved (GPTQ on W + BA); "
                        "not done here: keep the adapter unmerged, or recover the dense/sparse HF folder")


def evaluate_sets(model, tokenizer, spec: RecoverSpec, label: str) -> dict:
    if spec.eval_tokens == 0:
        return {}
    return {f"ppl_{label}_{d}": evaluate(model, tokenizer, d, seqlen=spec.eval_seqlen, max_tokens=spec.eval_tokens,
                                         progress=spec.progress, bos=spec.bos)["ppl"] for d in spec.eval_sets}


def build(spec: RecoverSpec, student):
    """(model to train, its trainable tensors by name, optimizer, masks of the sparse linears)."""
    masks = lomo.sparse_masks(student) if not lora.has_packed(student) else {}
    if spec.method == "lora":
        model = lora.lora_model(student, rank=spec.rank, lora_alpha=spec.lora_alpha,
                                target_modules=spec.target_modules, seed=spec.seed)
        trainable = lora.adapter_tensors(model)
        return model, trainable, torch.optim.AdamW(trainable.values(), lr=spec.learning_rate, weight_decay=0.0), masks
    lomo.mask_gradients(student, masks)  # before the optimizer's hooks
    optimizer = lomo.full_optimizer(student, spec.method, spec.learning_rate)
    return student, dict(student.named_parameters()), optimizer, masks


def mask_violations(model, masks: dict) -> int:
    """Pruned weights that are no longer exactly zero (must be 0)."""
    return sum(int((model.get_submodule(n).weight.detach()[~m] != 0).sum()) for n, m in masks.items())


def recover(spec: RecoverSpec, *, on_step=None) -> dict:
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    out = check_output(spec.output, spec.overwrite)
    state = spec.checkpoint_dir / STATE_FILE
    if spec.resume and not state.is_file():
        raise PeakError(f"--resume: no checkpoint at {state}")
    if not spec.resume and state.is_file():
        raise PeakError(f"a checkpoint of an earlier run is at {spec.checkpoint_dir}: add --resume to continue it, or "
                        "delete it to start over")
    teacher_spec = teacher_of(spec)
    rank, world = data_parallel()
    if world > 1 and (spec.method == "lomo" or spec.batch_size % world):
        raise PeakError(f"with {world} processes: --batch-size must be a multiple of {world}, and --method lomo "
                        "(lomo-optim's data-parallel path is DeepSpeed ZeRO-3) is not supported; use lora or adamw")
    if rank != 0:  # worker 0 alone evaluates and writes
        spec = replace(spec, eval_tokens=0, progress=False)
    student, tok = load_model(spec.model)
    check_resources(spec, teacher_spec, student.config)
    teacher, ttok = load_model(teacher_spec)
    check_models(spec, student, tok, teacher, ttok)
    segments = calibration_segments(tok, spec.train_samples, spec.seqlen, source=spec.train_dataset, seed=spec.seed,
                                    bos=spec.bos)
    result = {"model": spec.model, "teacher": teacher_spec, "method": spec.method}
    result.update(evaluate_sets(student, tok, spec, "before"))
    if spec.eval_tokens:
        for d in spec.eval_sets:
            result[f"ppl_teacher_{d}"] = cached_evaluate(teacher, ttok, teacher_spec, d, seqlen=spec.eval_seqlen,
                                                         max_tokens=spec.eval_tokens, progress=spec.progress,
                                                         bos=spec.bos)["ppl"]
    model, trainable, optimizer, masks = build(spec, student)
    done = train(model, teacher, segments, spec, optimizer, trainable, on_step=on_step)
    del teacher
    result.update({k: v for k, v in done.items() if k != "losses"})
    result["trainable_params"] = sum(p.numel() for p in trainable.values())
    result["losses"] = [row["loss"] for row in done["losses"]]  # this process's steps (after a resume: the rest)
    if rank != 0:
        return result
    written = write_output(spec, out, model, tok, masks, result)
    result.update(evaluate_sets(written, tok, spec, "after"))
    if masks and (spec.method != "lora" or spec.merge):  # an unmerged adapter leaves the base untouched
        result["sparse_matrices"] = len(masks)
        result["mask_violations"] = mask_violations(written, masks)
    result["peak_rss_bytes"] = memory.peak_rss_bytes()
    result["output"] = str(out)
    (out / RECOVER_FILE).write_text(json.dumps({**spec.run_info(), "result": result}, indent=2) + "\n")
    shutil.rmtree(spec.checkpoint_dir, ignore_errors=True)
    return result


def write_output(spec: RecoverSpec, out: Path, model, tok, masks: dict, result: dict):
    """Write the adapter, the merged model or the fine-tuned model; return the model the output holds."""
    info = json.dumps({**spec.run_info(), "model": spec.model, "teacher": result["teacher"]}, indent=2) + "\n"
    with staged_dir(out, spec.overwrite) as tmp:
        if spec.method == "lora" and not spec.merge:
            model.peft_config["default"].base_model_name_or_path = os.fspath(spec.model)
            model.save_pretrained(tmp)
        else:
            if spec.method == "lora":
                model, result["merge_masked_share"] = lora.merge_masked(model, masks)
            model.save_pretrained(tmp)
            save_tokenizer(tok, tmp)
            (tmp / RUN_FILE).write_text(info)
    return model
