"""Perplexity with the protocol of the GPTQ / SparseGPT papers.

Concatenate the evaluation text, cut it into non-overlapping windows of `seqlen` tokens, drop the
remainder, and report exp(mean NLL) over every predicted token (seqlen − 1 per window). A `max_tokens`
budget keeps only the first windows so that a CPU run stays short. When the tokenizer adds BOS, each
window's first token is BOS (`bos=False` reproduces the old protocol; see peakllm.data).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from peakllm.data import eval_windows, protocol_bos, tokenize_source
from peakllm.errors import PeakError
from peakllm.models import resolve
from peakllm.paths import cache_dir
from peakllm.progress import tqdm


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Summed NLL of tokens 1..T-1 of each window given logits [B, T, V] (computed in fp32)."""
    pred = logits[:, :-1, :].float()
    target = window[:, 1:]
    return F.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="sum")


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, *, batch_size: int = 1, progress: bool = True) -> dict:
    """ppl of `model` over `windows` [n, seqlen]; also tokens/s of the forward passes."""
    if windows.ndim != 2 or windows.shape[0] == 0:
        raise PeakError("perplexity needs a non-empty [n, seqlen] tensor of windows")
    if batch_size < 1:
        raise PeakError(f"batch size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    total_nll = 0.0
    start = time.perf_counter()
    batches = list(torch.split(windows, batch_size))
    bar = tqdm(batches, desc="perplexity", unit="batch", disable=not progress, leave=False)
    for batch in bar:
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits
        total_nll += float(window_nll(logits, batch))
        del logits
    seconds = time.perf_counter() - start
    n_pred = windows.shape[0] * (windows.shape[1] - 1)
    mean_nll = total_nll / n_pred
    tokens = windows.numel()
    return {
        "ppl": math.exp(mean_nll) if mean_nll < 700 else float("inf"),
        "nll": mean_nll,
        "tokens": tokens,
        "seqlen": windows.shape[1],
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else float("inf"),
    }


def evaluate(model, tokenizer, dataset: str = "wiki", *, seqlen: int = 512, max_tokens: int | None = 16384,
             batch_size: int = 1, progress: bool = True, bos: bool = True) -> dict:
    """Perplexity of `model` on a named dataset or text file, with a token budget; "bos" says whether the
    windows started with BOS."""
    tokens = tokenize_source(tokenizer, dataset)
    bos_id = protocol_bos(tokenizer, bos)
    windows = eval_windows(tokens, seqlen, max_tokens, bos_id=bos_id)
    result = perplexity(model, windows, batch_size=batch_size, progress=progress)
    result["dataset"] = dataset
    result["bos"] = bos_id is not None
    return result


def _model_identity(spec: str) -> str:
    """A key that changes when the model's files change: the spec, or the folder and its files' mtimes."""
    from pathlib import Path


    kind, path = resolve(spec)
    files = [path] if path.is_file() else sorted(Path(path).glob("*.safetensors")) + [Path(path) / "config.json"]
    stamp = ",".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.exists())
    return f"{kind}|{Path(path).resolve()}|{stamp}"


def cached_evaluate(model, tokenizer, spec: str, dataset: str = "wiki", *, seqlen: int = 512,
                    max_tokens: int | None = 16384, progress: bool = True, bos: bool = True) -> dict:
    """`evaluate` of an unmodified model loaded from `spec`, remembered in the cache (dense baselines
    are asked for by every prune/quantize run and cost as much as the run's own evaluation)."""
    import hashlib
    import json


    dtype = str(next(model.parameters()).dtype)
    with_bos = protocol_bos(tokenizer, bos) is not None
    # the BOS protocol joins the key only when it changes the windows: no-BOS entries keep their old keys
    parts = [_model_identity(spec), dataset, seqlen, max_tokens, dtype] + (["bos"] if with_bos else [])
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()
    path = cache_dir() / "evals" / f"{key[:24]}.json"
    if path.is_file():
        try:
            return {**json.loads(path.read_text()), "bos": with_bos}
        except (OSError, ValueError):
            pass
    result = evaluate(model, tokenizer, dataset, seqlen=seqlen, max_tokens=max_tokens, progress=progress, bos=bos)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(path)
    return result
