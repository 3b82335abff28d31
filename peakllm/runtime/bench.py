"""Decode speed against the memory-bandwidth roofline, measured in one run.

Decoding one token per sequence reads every weight once, so tokens/s can be no higher than
bandwidth / bytes per step. `bench` times the lean runtime (or, for comparison, transformers'
`model.generate`) and reports the fraction of that roofline it reaches, with the bandwidth measured
in the same process a moment later (the machine is shared, so only same-run ratios mean much).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch
from torch import nn

from peakllm.errors import PeakError
from peakllm.kernels.dense import read_bandwidth_gb_s


def weight_bytes_per_step(model: nn.Module, batch: int = 1) -> int:
    """Bytes of weights one decode step reads: every linear (dense or packed, as stored), the norms,
    the lm_head (the tied embedding counts once, as the head), and `batch` embedding rows.

    Works on a RuntimeModel and on an HF model alike; rotary tables and KV caches are not weights.
    """
    if hasattr(model, "embed") and isinstance(model.embed, torch.Tensor):
        embed = model.embed
        head = getattr(model.lm_head, "weight", None)
    else:
        embed = model.get_input_embeddings().weight
        out = model.get_output_embeddings()
        head = None if out is None else getattr(out, "weight", None)
    tied = head is not None and head.data_ptr() == embed.data_ptr()
    seen: set[int] = set()
    total = 0
    for name, module in model.named_modules():
        if "rotary" in name:
            continue
        tensors = list(module.parameters(recurse=False)) + [b for b in module.buffers(recurse=False) if b is not None]
        if hasattr(module, "packed_nbytes"):
            # A packed module knows its stored bytes (it may keep helper copies that one step never reads).
            if not any(t.data_ptr() in seen for t in tensors):
                total += int(module.packed_nbytes())
            seen.update(t.data_ptr() for t in tensors)
            continue
        for t in tensors:
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            if t.data_ptr() == embed.data_ptr() and not tied:
                continue  # an untied embedding table is only looked up, added below
            total += t.numel() * t.element_size()
    total += batch * embed.shape[1] * embed.element_size()
    return total


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def _prompt(vocab_size: int, batch: int, prompt_tokens: int) -> torch.Tensor:
    # Token ids do not change the work done; fixed random ids keep runs comparable.
    return torch.randint(0, vocab_size, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0))


def bench_runtime(model, prompt_tokens: int, new_tokens: int, batch: int = 1, repeats: int = 3) -> dict:
    """Median prefill tok/s, decode tok/s and time to first token of `generate` on a RuntimeModel."""
    from peakllm.runtime.generate import generate

    prompt = _prompt(model.config.vocab_size, batch, prompt_tokens)
    model.setup_cache(batch, prompt_tokens + new_tokens)
    generate(model, None, prompt, min(new_tokens, 4), stop_at_eos=False)  # warm-up: kernels built, pages touched
    runs = []
    for _ in range(repeats):
        timings: dict = {}
        generate(model, None, prompt, new_tokens, stop_at_eos=False, timings=timings)
        runs.append(timings)
    prefill_s = statistics.median(r["prefill_s"] for r in runs)
    decode_s = statistics.median(r["decode_s"] / r["steps"] for r in runs)
    return {"prefill_tok_s": batch * prompt_tokens / prefill_s, "decode_tok_s": batch / decode_s,
            "ttft_s": prefill_s}


@torch.inference_mode()
def bench_hf(hf_model, prompt_tokens: int, new_tokens: int, batch: int = 1, repeats: int = 3) -> dict:
    """The same figures for transformers' own `generate` (greedy, exactly new_tokens tokens).

    TTFT is a 1-token generate; decode tok/s = (new_tokens - 1) steps over the extra time of the full run.
    """
    prompt = _prompt(hf_model.config.vocab_size, batch, prompt_tokens)
    mask = torch.ones_like(prompt)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        hf_model.generate(prompt, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          pad_token_id=0)
        return time.perf_counter() - t0

    run(min(new_tokens, 4))  # warm-up
    first = [run(1) for _ in range(repeats)]
    full = [run(new_tokens) for _ in range(repeats)]
    ttft = statistics.median(first)
    decode_s = max(statistics.median(full) - ttft, 1e-9) / (new_tokens - 1)
    return {"prefill_tok_s": batch * prompt_tokens / ttft, "decode_tok_s": batch / decode_s, "ttft_s": ttft}


def bench(hf_model, *, dtype: torch.dtype = torch.float32, prompt_tokens: int = 128, new_tokens: int = 64,
          batch: int = 1, repeats: int = 3, engine: str = "peakllm", bandwidth_bytes: int = 1 << 30) -> dict:
    """Benchmark `hf_model` through the lean runtime (engine='peakllm') or transformers ('transformers').

    Returns prefill/decode tok/s, ttft_s, peak_rss_bytes (before the bandwidth probe allocates its
    buffer), weight_bytes (read per decode step), bandwidth_gb_s and roofline_fraction =
    decode steps/s * weight_bytes / bandwidth (steps/s = decode_tok_s / batch; equal when batch is 1).
    """
    if prompt_tokens < 1 or new_tokens < 2 or batch < 1 or repeats < 1:
        raise PeakError("need --prompt-tokens >= 1, --new-tokens >= 2, --batch >= 1 and --repeats >= 1")
    limit = getattr(hf_model.config, "max_position_embeddings", None)
    if limit and prompt_tokens + new_tokens > limit:
        raise PeakError(f"prompt + new tokens = {prompt_tokens + new_tokens} exceeds the model's {limit} positions")
    if engine == "transformers":
        model = hf_model.to(dtype)
        speed = bench_hf(model, prompt_tokens, new_tokens, batch, repeats)
    elif engine == "peakllm":
        from peakllm.runtime.model import RuntimeModel

        model = RuntimeModel.from_hf(hf_model, dtype, max_seq=prompt_tokens + new_tokens)
        speed = bench_runtime(model, prompt_tokens, new_tokens, batch, repeats)
    else:
        raise PeakError(f"unknown engine '{engine}' (peakllm or transformers)")
    weight_bytes = weight_bytes_per_step(model, batch)
    rss = peak_rss_bytes()
    bandwidth = read_bandwidth_gb_s(bandwidth_bytes)  # far larger than the caches, so it measures memory
    return {
        "engine": engine,
        "dtype": str(dtype).removeprefix("torch."),
        **speed,
        "peak_rss_bytes": rss,
        "weight_bytes": weight_bytes,
        "bandwidth_gb_s": bandwidth,
        "roofline_fraction": speed["decode_tok_s"] / batch * weight_bytes / (bandwidth * 1e9),
        "threads": torch.get_num_threads(),
        "batch": batch,
    }
