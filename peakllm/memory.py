"""Memory budgets: parse sizes, read what the machine has, predict a streamed run's peak from shapes alone.

The prediction is made before anything is loaded, from the config's shapes (on the meta skeleton): the
process as it stands (Python, torch, transformers) plus the largest of the run's phases. Each phase is a
sum of named terms, so a refusal can say what does not fit and what would.
"""

from __future__ import annotations

import os
import re

from peakllm.errors import PeakError

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_size(text: str) -> int:
    """'4GB', '512MiB', '3.5g', '1000000' -> bytes (binary units: 1 GB = 2^30 bytes)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise PeakError(f"cannot read the size {text!r}: give e.g. 4GB, 512MB or a number of bytes")
    value = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if value <= 0:
        raise PeakError(f"a memory size must be positive, got {text!r}")
    return value


def _status(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def available_bytes() -> int | None:
    return _status("MemAvailable", "/proc/meminfo")


def rss_bytes() -> int:
    return _status("VmRSS") or 0


def peak_rss_bytes() -> int:
    """VmHWM: the peak resident set of this process so far."""
    return _status("VmHWM") or 0


MMAP_THRESHOLD_ENV = "PEAKLLM_MMAP_THRESHOLD"


BUDGET_MMAP_THRESHOLD = 1 << 20


def mmap_threshold(budget: bool) -> int:
    """The malloc mmap threshold a streamed run fixes (0: leave glibc's moving one): $PEAKLLM_MMAP_THRESHOLD
    (bytes; 0 = leave it) when set, else 1 MiB under an explicit --max-memory, else 0. Why under a budget:
    glibc raises the threshold to 32 MiB after the first large free, and the solver's 1-32 MiB temporaries
    then fragment the heap within a layer. On a 2-layer OLMoE-shape run (random weights, 5GB budget) the
    resident set climbed 3.4 -> 4.4 GB while layer 0's 192 experts were solved, and stayed at 3.2-3.3 GB
    with the threshold fixed; the cost is an mmap and its page faults per large temporary (2048 x 2048
    GPTQ solve 1.8 -> 2.1 s, README)."""
    text = os.environ.get(MMAP_THRESHOLD_ENV, "").strip()
    if text:
        try:
            return max(0, int(text))
        except ValueError:
            raise PeakError(f"${MMAP_THRESHOLD_ENV} must be a number of bytes, got {text!r}") from None
    return BUDGET_MMAP_THRESHOLD if budget else 0


def release_free_heap(setup: bool = False, budget: bool = False) -> None:
    """Give freed heap memory back to the OS (glibc's malloc_trim): a streamed run's many 1-32 MiB
    temporaries otherwise stay in the heap and the resident set grows layer after layer. With setup=True,
    also fix malloc's mmap threshold at `mmap_threshold(budget)` when that is not 0."""
    import ctypes
    import ctypes.util

    threshold = mmap_threshold(budget) if setup else 0
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if threshold > 0:
            libc.mallopt(-3, threshold)  # M_MMAP_THRESHOLD
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to do


def reset_peak_rss() -> bool:
    """Start VmHWM again from the current resident set (Linux: 5 > /proc/self/clear_refs); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def io_read_bytes() -> int | None:
    """Bytes this process has caused to be read from storage (/proc/self/io read_bytes; page cache hits not counted)."""
    try:
        with open("/proc/self/io") as fh:
            for line in fh:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def gb(n: float) -> str:
    return f"{n / (1 << 30):.2f} GB"


def size_text(n: float) -> str:
    """A size in GiB, or MiB below one GiB."""
    return f"{n / (1 << 30):.2f} GiB" if abs(n) >= 1 << 30 else f"{n / (1 << 20):.2f} MiB"


def layer_terms(layer, *, batch_tokens: int, seqlen: int, batch: int, hessian: bool, source_bytes: int) -> dict:
    """Bytes one decoder layer needs at its worst moment (from its meta shapes): its fp32 weights, plus the
    largest of reading it, collecting a group's statistics while the layer runs, and solving its biggest
    matrix (the statistics' H, the solver's copy of H and two more in x in factors, copies of W)."""
    import torch.nn as nn

    from peakllm.calibrate_moe import fused_experts

    params = sum(p.numel() for p in layer.parameters())
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    by_width: dict[int, int] = {}
    for m in linears:
        by_width[m.in_features] = by_width.get(m.in_features, 0) + 1
    inter = max((m.out_features for m in linears), default=0)
    widest = max((m.in_features for m in linears), default=0)
    cfg = getattr(getattr(layer, "self_attn", None), "config", None)
    n_heads = getattr(cfg, "num_attention_heads", 1) if cfg is not None else 1
    forward = 4 * batch_tokens * (3 * inter + 4 * widest) + 4 * batch * n_heads * seqlen * seqlen
    stats = 4 * max((min(n, 3) * w * w for w, n in by_width.items()), default=0) if hessian else 0
    solve = max((4 * (4 * m.in_features ** 2 + 3 * m.in_features * m.out_features) for m in linears), default=0)
    for experts in fused_experts(layer).values():
        E, two_i, H = experts.gate_up_proj.shape
        I = experts.down_proj.shape[2]
        if hessian:  # one H per expert plus the pooled one, for the wider of the two parts
            stats = max(stats, 4 * (E + 1) * max(H * H, I * I))
        solve = max(solve, 4 * (3 * max(H, I) ** 2 + 3 * two_i * H))
    if not hessian:
        solve = max((4 * 3 * m.in_features * m.out_features for m in linears), default=0)
    moments = {"layer as read from disk": {"layer as read from disk": source_bytes * params},
               "statistics": {"statistics (Hessians)": stats, "forward intermediates": forward},
               "solve": {"statistics (Hessians)": stats, "solver workspace": solve}}
    worst = max(moments.values(), key=lambda t: sum(t.values()))
    return {"layer weights fp32": 4 * params, **worst}


def predict(streamed, *, calib_tokens: int, calib_seqlen: int, batch_size: int, hessian: bool, eval_tokens: int,
            offload_bytes: int | None) -> dict:
    """The peak of a streamed compression, phase by phase; acts held in RAM are capped at offload_bytes."""
    cfg = streamed.model.config
    hidden = cfg.hidden_size
    vocab = cfg.vocab_size
    acts = 4 * calib_tokens * hidden
    in_ram = acts if offload_bytes is None else min(acts, offload_bytes)
    eval_acts = 2 * 4 * eval_tokens * hidden
    src = streamed.source_dtype.itemsize
    common = {"calibration activations (in RAM, current + next layer)": 2 * in_ram,
              "evaluation activations (dense + compressed)": eval_acts}
    phases = {"capture (embedding in fp32)": {**common, "embedding fp32": 4 * vocab * hidden}}
    worst_layer, worst = None, -1
    for i, layer in enumerate(streamed.layers):
        terms = layer_terms(layer, batch_tokens=batch_size * calib_seqlen, seqlen=calib_seqlen, batch=batch_size,
                            hessian=hessian, source_bytes=src)
        if sum(terms.values()) > worst:
            worst_layer, worst = terms, sum(terms.values())
    phases["largest decoder layer"] = {**common, **worst_layer}
    tied = getattr(cfg, "tie_word_embeddings", False)
    outer = sum(p.numel() for _, mod in streamed.outer_modules() for p in mod.parameters(recurse=False)
                if not (tied and mod is streamed.model.get_output_embeddings()))
    phases["the rest (embedding, norm, lm_head in fp32) written last"] = {**common, "embedding and head fp32": 4 * outer}
    if eval_tokens:
        phases["evaluation head (norm + lm_head fp32, logits)"] = {
            "evaluation activations (dense + compressed)": eval_acts, "lm_head fp32": 4 * vocab * hidden,
            "logits": 3 * 4 * 512 * vocab}
    base = rss_bytes()
    name, terms = max(phases.items(), key=lambda kv: sum(kv[1].values()))
    return {"predicted_peak_bytes": base + sum(terms.values()), "baseline_bytes": base, "peak_phase": name,
            "terms": terms, "activation_bytes": acts, "activations_in_ram_bytes": in_ram}


def describe(prediction: dict) -> str:
    lines = [f"  process so far: {gb(prediction['baseline_bytes'])}"]
    lines += [f"  {k}: {gb(v)}" for k, v in sorted(prediction["terms"].items(), key=lambda kv: -kv[1]) if v]
    return "\n".join(lines)
