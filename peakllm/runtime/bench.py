"""Decode speed against the memory-bandwidth roofline, measured in one run.

Decoding one token per sequence reads every weight once, so tokens/s can be no higher than
bandwidth / bytes per step. `bench` times the lean runtime (or, for comparison, transformers'
`model.generate`) and reports the fraction of that roofline it reaches, with the bandwidth probed in
the same process right after each timed repeat (the machine is shared, so only same-run ratios mean much).
"""

from __future__ import annotations

import resource
import statistics
import sys
import time

import torch
from torch import nn

from peakllm import memory
from peakllm.errors import PeakError
from peakllm.kernels.dense import probe_method, read_bandwidth_gb_s, read_tensors_gb_s
from peakllm.runtime.embedding import PackedEmbedding
from peakllm.runtime.generate import generate
from peakllm.runtime.model import RuntimeModel

PROBE_MIN_BYTES = 128 << 20  # 4x a 32 MiB last-level cache: reading the weights then measures memory


def _embedding(model: nn.Module):
    """(embedding module or table, lm_head module) of a RuntimeModel or an HF model."""
    if hasattr(model, "packed_embed") and hasattr(model, "lm_head"):  # RuntimeModel
        return (model.embed if model.packed_embed is None else model.packed_embed), model.lm_head
    return model.get_input_embeddings(), model.get_output_embeddings()


def _weights(model: nn.Module):
    """(bytes of one embedding row, [(module, its weight tensors)]), each tensor listed once; an untied
    embedding table is left out (a step reads only its looked-up rows)."""
    embed, head = _embedding(model)
    if isinstance(embed, PackedEmbedding):  # int-k rows; tied when the lm_head is the same linear layer
        table = [embed.linear.qweight, embed.linear.scales, embed.linear.zeros]
        row_bytes = sum(t[0].numel() * t.element_size() for t in table)
        tied = head is embed.linear
    else:
        table = [embed if isinstance(embed, torch.Tensor) else embed.weight]
        row_bytes = table[0].shape[1] * table[0].element_size()
        head_w = None if head is None else getattr(head, "weight", None)
        tied = head_w is not None and head_w.data_ptr() == table[0].data_ptr()
    skip = set() if tied else {t.data_ptr() for t in table}
    seen: set[int] = set()
    groups = []
    for name, module in model.named_modules():
        if "rotary" in name:
            continue
        tensors = [t for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
                   if t is not None and t.data_ptr() not in seen and t.data_ptr() not in skip]
        seen.update(t.data_ptr() for t in tensors)
        if tensors:
            groups.append((module, tensors))
    return row_bytes, groups


def _expert_shares(model: nn.Module, batch: int) -> dict[int, float]:
    """{id(module): share of its bytes a decode step reads} for the modules under MoE experts: a step
    reads only the experts its tokens are routed to. With k of E experts per token that is k/E at batch
    1, and E * (1 - (1 - k/E)^B) / E expected distinct experts at batch B under uniform routing."""
    shares: dict[int, float] = {}
    for block in model.modules():
        gate = getattr(block, "gate", None)  # OLMoE's block keeps E and k on its router
        E = getattr(block, "num_experts", None) or getattr(gate, "num_experts", None)
        k = getattr(block, "top_k", None) or getattr(gate, "top_k", None)
        experts = getattr(block, "experts", None)
        if not (isinstance(E, int) and isinstance(k, int) and isinstance(experts, nn.Module) and 0 < k <= E):
            continue
        share = 1.0 - (1.0 - k / E) ** batch
        for module in experts.modules():
            shares[id(module)] = share
    return shares


def weight_bytes_per_step(model: nn.Module, batch: int = 1) -> int:
    """Bytes of weights one decode step reads: every linear (dense or packed, as stored), the norms,
    the lm_head (the tied embedding counts once, as the head), and `batch` embedding rows; of the
    experts of a MoE block, the share its tokens are routed to (`_expert_shares`).

    Works on a RuntimeModel and on an HF model alike; rotary tables and KV caches are not weights.
    """
    row_bytes, groups = _weights(model)
    shares = _expert_shares(model, batch)
    total = 0.0
    for module, tensors in groups:
        if hasattr(module, "packed_nbytes"):
            # A packed module knows its stored bytes (it may keep helper copies that one step never reads).
            nbytes = int(module.packed_nbytes())
        else:
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
        total += nbytes * shares.get(id(module), 1.0)
    return int(total) + batch * row_bytes


def peak_rss_bytes() -> int:
    """Peak resident memory of this process's address space. On Linux this is VmHWM, not ru_maxrss:
    ru_maxrss survives exec, so a bench started from a large parent process would report the parent's."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # Linux reports KiB, macOS bytes


def _prompt(vocab_size: int, batch: int, prompt_tokens: int) -> torch.Tensor:
    # Token ids do not change the work done; fixed random ids keep runs comparable.
    return torch.randint(0, vocab_size, (batch, prompt_tokens), generator=torch.Generator().manual_seed(0))


def bench_runtime(model, prompt_tokens: int, new_tokens: int, batch: int = 1, repeats: int = 3,
                  after_each=None, before_timed=None) -> dict:
    """Median prefill tok/s, decode tok/s and time to first token of `generate` on a RuntimeModel;
    "decode_runs" lists each repeat's decode tok/s. `after_each()` runs after every timed repeat."""
    prompt = _prompt(model.config.vocab_size, batch, prompt_tokens)
    model.setup_cache(batch, prompt_tokens + new_tokens)
    generate(model, None, prompt, min(new_tokens, 4), stop_at_eos=False)  # warm-up: kernels built, pages touched
    if before_timed is not None:
        before_timed()
    runs = []
    for _ in range(repeats):
        timings: dict = {}
        generate(model, None, prompt, new_tokens, stop_at_eos=False, timings=timings)
        runs.append(timings)
        if after_each is not None:
            after_each()
    prefill_s = statistics.median(r["prefill_s"] for r in runs)
    decode_runs = [batch * r["steps"] / r["decode_s"] for r in runs]
    return {"prefill_tok_s": batch * prompt_tokens / prefill_s, "decode_tok_s": statistics.median(decode_runs),
            "ttft_s": prefill_s, "decode_runs": decode_runs}


@torch.inference_mode()
def bench_hf(hf_model, prompt_tokens: int, new_tokens: int, batch: int = 1, repeats: int = 3,
             after_each=None) -> dict:
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
    ttft = statistics.median(run(1) for _ in range(repeats))
    decode_runs = []
    for _ in range(repeats):
        decode_runs.append(batch * (new_tokens - 1) / max(run(new_tokens) - ttft, 1e-9))
        if after_each is not None:
            after_each()
    return {"prefill_tok_s": batch * prompt_tokens / ttft, "decode_tok_s": statistics.median(decode_runs),
            "ttft_s": ttft, "decode_runs": decode_runs}


def bench(hf_model, *, dtype: torch.dtype = torch.float32, prompt_tokens: int = 128, new_tokens: int = 64,
          batch: int = 1, repeats: int = 3, engine: str = "peakllm", bandwidth_bytes: int = 1 << 30,
          max_memory: int | None = None) -> dict:
    """Benchmark `hf_model` through the lean runtime (engine='peakllm') or transformers ('transformers').

    Returns prefill/decode tok/s (medians), ttft_s, peak_rss_bytes (before any probe buffer is
    allocated), weight_bytes (read per decode step), bandwidth_gb_s (median probe) and
    roofline_fraction = median over repeats of decode steps/s * weight_bytes / that repeat's bandwidth
    (steps/s = decode_tok_s / batch; equal when batch is 1).

    With max_memory (bytes; the lean runtime only) the weights and KV cache are held to that budget
    (runtime/offload.py): no bandwidth probe runs (it would read every weight), and the result has the
    offload plan, the bytes the plan reads from disk per decode step, those the kernel counted
    (/proc/self/io), and for MoE the expert cache's hit rate.
    """
    if prompt_tokens < 1 or new_tokens < 2 or batch < 1 or repeats < 1:
        raise PeakError("need --prompt-tokens >= 1, --new-tokens >= 2, --batch >= 1 and --repeats >= 1")
    limit = getattr(hf_model.config, "max_position_embeddings", None)
    if limit and prompt_tokens + new_tokens > limit:
        raise PeakError(f"prompt + new tokens = {prompt_tokens + new_tokens} exceeds the model's {limit} positions")
    # The machine may be shared: bandwidth is probed right after each timed repeat, by reading the very
    # weight tensors a step streams (no extra memory), and each repeat is set against its own probe.
    probes: list[float] = []
    state: dict = {}

    def probe() -> None:
        if state["tensors"] is not None:
            probes.append(read_tensors_gb_s(state["tensors"]))

    if max_memory is not None and engine != "peakllm":
        raise PeakError("--max-memory runs the lean runtime only (not --hf)")

    mark = {"peak": 0, "reset": False}

    def start_decode_peak() -> None:
        """VmHWM from here on: peak_rss_decode_bytes covers the timed repeats (after the warm-up, the cache
        set up and, under a budget, the streamed layers dropped); the peak before is kept."""
        mark["peak"] = max(mark["peak"], memory.peak_rss_bytes())
        mark["reset"] = memory.reset_peak_rss()

    start_decode_peak()  # the HF baseline: from the loaded model on

    def peaks() -> dict:
        now = memory.peak_rss_bytes()
        return {"peak_rss_bytes": max(mark["peak"], now), "peak_rss_decode_bytes": now if mark["reset"] else None}
    if engine == "transformers":
        model = hf_model.to(dtype)
        state["tensors"] = _probe_tensors(model)
        speed = bench_hf(model, prompt_tokens, new_tokens, batch, repeats, after_each=probe)
    elif engine == "peakllm":
        model = RuntimeModel.from_hf(hf_model, dtype, max_seq=prompt_tokens + new_tokens)
        if max_memory is not None:
            model.set_max_memory(max_memory, whole_process=True)
            return {**_bench_offloaded(model, dtype, prompt_tokens, new_tokens, batch, repeats, start_decode_peak),
                    **peaks()}
        state["tensors"] = _probe_tensors(model)
        speed = bench_runtime(model, prompt_tokens, new_tokens, batch, repeats, after_each=probe,
                              before_timed=start_decode_peak)
    else:
        raise PeakError(f"unknown engine '{engine}' (peakllm or transformers)")
    weight_bytes = weight_bytes_per_step(model, batch)
    rss = peaks()  # before the fallback probe's buffer
    decode_runs = speed.pop("decode_runs")
    method = probe_method() + ", right after each timed repeat"
    if not probes:  # weights that fit in the caches say nothing about memory: read a large buffer instead
        probes = [read_bandwidth_gb_s(bandwidth_bytes)] * len(decode_runs)
        method = f"a {bandwidth_bytes >> 20} MiB buffer read with all threads (the weights fit in the caches)"
    fractions = [tok_s / batch * weight_bytes / (gb_s * 1e9) for tok_s, gb_s in zip(decode_runs, probes)]
    note = {}
    if statistics.median(fractions) > 1.0:
        note["roofline_note"] = ("above 1: decoding read the weights faster than the bandwidth probe did, so the "
                                 "probe was low (a loaded machine, or a reader that keeps fewer lines in flight "
                                 "than the kernels); the fraction overstates how close decoding is to the limit")
    return {
        "engine": engine,
        "dtype": str(dtype).removeprefix("torch."),
        **speed,
        **rss,
        "weight_bytes": weight_bytes,
        "bandwidth_gb_s": statistics.median(probes),
        "bandwidth_method": method,
        "roofline_fraction": statistics.median(fractions),
        **note,
        "threads": torch.get_num_threads(),
        "batch": batch,
    }


def _bench_offloaded(model, dtype, prompt_tokens: int, new_tokens: int, batch: int, repeats: int,
                     before=None) -> dict:
    """bench_runtime under the model's memory budget, with what the offload read per decode step; the
    counts start after the warm-up (each timed repeat's disk reads are listed)."""
    reads: list[int] = []
    mark = {}

    def before_timed() -> None:
        if before is not None:
            before()
        model.offload.reset_stats()
        mark["io"] = memory.io_read_bytes()

    def after_each() -> None:
        now = memory.io_read_bytes()
        if now is not None and mark.get("io") is not None:
            reads.append(now - mark["io"])
        mark["io"] = now

    speed = bench_runtime(model, prompt_tokens, new_tokens, batch, repeats, after_each=after_each,
                          before_timed=before_timed)
    off = model.offload
    steps = off.stats["decode"]["steps"]
    disk = {"disk_read_bytes_per_run": reads}
    if reads and steps:  # /proc/self/io counts prefill too: per step of the whole run
        disk["disk_read_bytes_per_token"] = sum(reads) / (steps + off.stats["prefill"]["steps"])
    return {"engine": "peakllm", "dtype": str(dtype).removeprefix("torch."), **speed,
            "weight_bytes": weight_bytes_per_step(model, batch),
            "offload": off.describe(), **off.summary("decode"), **disk,
            "threads": torch.get_num_threads(), "batch": batch}


def _probe_tensors(model: nn.Module) -> list[torch.Tensor] | None:
    """The model's weight tensors when they are large enough to stream from memory, else None."""
    _embed, groups = _weights(model)
    tensors = [t for _module, ts in groups for t in ts]
    return tensors if sum(t.numel() * t.element_size() for t in tensors) >= PROBE_MIN_BYTES else None
