"""Sub-1-bit format: symbol statistics of real ternarised weights, and matvec speed against dense torch.

    python benchmarks/bench_sub1.py stats            # zero fractions, run lengths, bits/param (real model)
    python benchmarks/bench_sub1.py speed            # median matvec time, Markdown table (real model)
    python benchmarks/bench_sub1.py speed --random 0.92   # same on synthetic i.i.d. ternary codes
    python benchmarks/bench_sub1.py batch            # batches 1..32, one thread, random codes
    python benchmarks/bench_sub1.py roofline         # batch 1 GB/s vs the bandwidth probe, fused vs gather
    python benchmarks/bench_sub1.py e2e --models moe=DIR,sub1=DIR2,gather=gather:DIR2 --rounds 5   # decode tok/s

Weights are the default model's MLP matrices (SmolLM2-135M, already Q4_1 in its GGUF). There are no
MoE weights on PyPI, so "expert-sized" means the slices an E=8 split of the dense MLP would give each
expert: up/gate 1536/8 x 576 and down 576 x 1536/8. Ternarisations:
  minmax  per-row grid {-m/2.., 0, ..m/2} from max|w| (QMoE's RTN grid before GPTQ): threshold max|w|/2
  rtn     peakllm.solvers rtn on Grid(kind="ternary", sym=True): the least-squares ternary fit per row
  mean0.7 threshold 0.7 * mean|w| per row
Timings are medians of interleaved runs (every method once per round), so load from other processes on
the shared machine hits all methods alike; absolute numbers move with that load, ratios much less.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from peakllm.formats.sub1 import PackedSub1  # noqa: E402
from peakllm.formats.sub1_code import Sub1Dictionary  # noqa: E402
from peakllm.kernels import sub1 as K  # noqa: E402

from results_line import append as append_result  # benchmarks/results_line.py: commit, machine, command

E = 8


def ternarise(W: torch.Tensor, how: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8, symmetric per-row fp16 scale [out, 1])."""
    a = W.abs()
    if how == "rtn":
        from peakllm.solvers.grids import Grid
        from peakllm.solvers.rtn import rtn

        q = rtn(W, Grid(kind="ternary", group_size=-1, sym=True))
        return q.codes, q.params["scale_pos"].half()
    if how == "minmax":
        scale = a.amax(1, keepdim=True)
        threshold = scale / 2
    elif how.startswith("mean"):
        threshold = float(how[4:]) * a.mean(1, keepdim=True)
        scale = 2 * threshold
    else:
        raise SystemExit(f"unknown ternarisation {how}")
    codes = torch.ones(W.shape, dtype=torch.uint8)
    codes[W > threshold] = 2
    codes[W < -threshold] = 0
    return codes, scale.half()


def mlp_weights() -> dict[str, torch.Tensor]:
    from peakllm.models import load_model

    model, _ = load_model("default")
    return {n: p.detach().float() for n, p in model.named_parameters() if ".mlp." in n}


def entropy(p0: float, pp: float) -> float:
    return -sum(p * math.log2(p) for p in (p0, pp, 1 - p0 - pp) if p > 0)


def stats(weights: dict, schemes: list[str], encode_every: int) -> None:
    print("| ternarisation | P(0) | P(+) | row P(0) min / median / max | mean zero run (geometric) | "
          "P(run >= 20) (geometric) | H iid bits | stored bits/param, 8-bit | stored bits/param, 16-bit |")
    print("|---|---|---|---|---|---|---|---|---|")
    names = sorted(weights)
    for how in schemes:
        tern = {n: ternarise(weights[n], how) for n in names}
        codes = {n: c for n, (c, _) in tern.items()}
        total = sum(c.numel() for c in codes.values())
        p0 = sum(int((c == 1).sum()) for c in codes.values()) / total
        pp = sum(int((c == 2).sum()) for c in codes.values()) / total
        row_p0 = torch.cat([(c == 1).float().mean(1) for c in codes.values()])
        gaps = []
        for c in codes.values():
            idx = torch.nonzero((c != 1).flatten()).flatten()
            gaps.append(idx[1:] - idx[:-1] - 1)  # runs across row ends too; rows are 576 or 1536 long
        gaps = torch.cat(gaps).float()
        sample = names[::encode_every]
        bits = {}
        for sym_bits in (8, 16):
            d = Sub1Dictionary.fit([codes[n] for n in names], sym_bits)  # one dictionary for the model
            packed = [PackedSub1.encode(codes[n], tern[n][1], tern[n][1], -1, d) for n in sample]
            bits[sym_bits] = sum(8 * p.nbytes for p in packed) / sum(p.num_params for p in packed)
        print(f"| {how} | {p0:.3f} | {pp:.3f} | {row_p0.min():.3f} / {row_p0.median():.3f} / {row_p0.max():.3f} | "
              f"{gaps.mean():.2f} ({p0 / (1 - p0):.2f}) | {(gaps >= 20).float().mean():.4f} ({p0 ** 20:.4f}) | "
              f"{entropy(p0, pp):.3f} | {bits[8]:.3f} | {bits[16]:.3f} |", flush=True)
    print(f"\n(bits/param: stream + block offsets + fp16 per-row scale, measured on every {encode_every}th of "
          f"{len(names)} MLP matrices; the dictionary is fitted once on all of them and costs no stored bytes)")


def timeit_interleaved(fns: dict, rounds: int, warmup: int = 20) -> dict:
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) * 1e6 for k, v in times.items()}


def cpu_time_us(fns: dict, reps: int = 20, rounds: int = 15) -> dict:
    """Median CPU time of this thread per call (single-threaded callers only): time spent descheduled
    by other processes on the shared machine does not count, so this is the kernel's own cost."""
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            t = time.thread_time_ns()
            for _ in range(reps):
                f()
            out[k].append((time.thread_time_ns() - t) / reps / 1e3)
    return {k: statistics.median(v) for k, v in out.items()}


def speed(weights: dict | None, p_zero: float, how: str, rounds: int) -> None:
    if weights is not None:
        up = weights["model.layers.10.mlp.up_proj.weight"]
        down = weights["model.layers.10.mlp.down_proj.weight"]
        mats = {f"expert up {1536 // E}x576": up[: 1536 // E], f"expert down 576x{1536 // E}": down[:, : 1536 // E],
                "full up 1536x576": up, "full down 576x1536": down}
        mats = {k: ternarise(v.contiguous(), how) for k, v in mats.items()}
    else:
        g = torch.Generator().manual_seed(0)
        mats = {}
        for name, (rows, cols) in {f"expert up {1536 // E}x576": (1536 // E, 576),
                                   f"expert down 576x{1536 // E}": (576, 1536 // E),
                                   "full up 1536x576": (1536, 576), "full down 576x1536": (576, 1536)}.items():
            u = torch.rand(rows, cols, generator=g)
            codes = torch.ones(rows, cols, dtype=torch.uint8)
            codes[u < (1 - p_zero) / 2] = 0
            codes[u > 1 - (1 - p_zero) / 2] = 2
            mats[name] = (codes, (torch.rand(rows, 1, generator=g) * 0.05 + 0.01).half())
    threads = torch.get_num_threads()
    print(f"threads: {threads}, kernel compiled: {K.available()}, load average: {os.getloadavg()[0]:.1f}, weights: "
          f"{'default model, ' + how if weights is not None else f'random i.i.d., P(0)={p_zero}'}\n")
    print(f"Median us per matvec over interleaved rounds: wall-clock with {threads} threads, wall-clock with 1 "
          "thread, and CPU time of the calling thread with 1 thread (torch.set_num_threads(1)); each cell is "
          "sub1 8-bit / sub1 16-bit / torch fp32 / torch bf16.\n")
    print(f"| matrix | P(0) | bits/param 8-bit / 16-bit | wall {threads} threads | wall 1 thread | CPU 1 thread | "
          "CPU 8-bit / bf16 | CPU 16-bit / bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (codes, scale) in mats.items():
        rows, cols = codes.shape
        W = (scale.float() * (codes.float() - 1)).contiguous()
        Wb = W.bfloat16()
        x = torch.randn(1, cols)
        xb = x.bfloat16()
        bits, packs = {}, {}
        for sym_bits in (8, 16):
            packed = PackedSub1.encode(codes, scale, scale, -1, Sub1Dictionary.fit(codes, sym_bits))
            packs[sym_bits] = (packed, K.operands(packed))
            bits[sym_bits] = packed.bits_per_param
            assert torch.allclose(K.sub1_matmul(x, packed), F.linear(x, W), rtol=1e-4, atol=1e-4)

        def fns(n_threads):
            out = {b: (lambda p=p, o=o: K.sub1_matmul(x, p, o, n_threads)) for b, (p, o) in packs.items()}
            return {**out, "fp32": lambda: F.linear(x, W), "bf16": lambda: F.linear(xb, Wb)}

        t = timeit_interleaved(fns(threads), rounds)
        torch.set_num_threads(1)
        t1 = timeit_interleaved(fns(1), rounds)
        c = cpu_time_us(fns(1))
        torch.set_num_threads(threads)

        def cell(d):
            return " / ".join(f"{d[k]:.1f}" for k in (8, 16, "fp32", "bf16"))

        print(f"| {name} | {(codes == 1).float().mean():.3f} | {bits[8]:.3f} / {bits[16]:.3f} | {cell(t)} | "
              f"{cell(t1)} | {cell(c)} | {c[8] / c['bf16']:.2f} | {c[16] / c['bf16']:.2f} |", flush=True)


def batches(p_zero: float) -> None:
    """Small-batch matmul, one thread, CPU time: one decode serves the whole batch."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    print(f"random i.i.d. codes, P(0)={p_zero}, 8-bit dictionary, one thread, median CPU-time us per call, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print("| matrix | batch | sub1 | torch fp32 | torch bf16 |")
    print("|---|---|---|---|---|")
    for rows, cols in ((1536 // E, 576), (1536, 576)):
        u = torch.rand(rows, cols, generator=g)
        codes = torch.ones(rows, cols, dtype=torch.uint8)
        codes[u < (1 - p_zero) / 2] = 0
        codes[u > 1 - (1 - p_zero) / 2] = 2
        scale = torch.full((rows, 1), 0.01).half()
        W = scale.float() * (codes.float() - 1)
        Wb = W.bfloat16()
        packed = PackedSub1.encode(codes, scale, scale, -1)
        ops = K.operands(packed)
        for batch in (1, 4, 8, 16, 32):
            x = torch.randn(batch, cols, generator=g)
            xb = x.bfloat16()
            c = cpu_time_us({"sub1": lambda: K.sub1_matmul(x, packed, ops, 1), "fp32": lambda: F.linear(x, W),
                             "bf16": lambda: F.linear(xb, Wb)}, reps=10, rounds=9)
            print(f"| {rows}x{cols} | {batch} | {c['sub1']:.1f} | {c['fp32']:.1f} | {c['bf16']:.1f} |", flush=True)


def roofline(shapes: list, p_zero: float, sym_bits: list, rounds: int, jsonl: str | None) -> None:
    """Batch-1 matvec of random i.i.d. ternary codes: the fused path (default) and the gather path
    (`operands(fused=False)`, the kernel before it) side by side, interleaved round by round, as packed
    bytes / time against the read-bandwidth probe measured between the matrices (median of the probes)."""
    import json

    from peakllm.kernels.dense import read_bandwidth_gb_s

    threads = torch.get_num_threads()
    probes = [read_bandwidth_gb_s()]
    rows_out = []
    print(f"threads {threads}, P(0) = {p_zero}, random i.i.d. codes, symmetric per-row scales; "
          f"load average {os.getloadavg()[0]:.1f} at the start\n")
    for rows, cols in shapes:
        g = torch.Generator().manual_seed(rows + cols)
        u = torch.rand(rows, cols, generator=g)
        codes = torch.ones(rows, cols, dtype=torch.uint8)
        codes[u < (1 - p_zero) / 2] = 0
        codes[u > 1 - (1 - p_zero) / 2] = 2
        scale = (torch.rand(rows, 1, generator=g) * 0.05 + 0.01).half()
        W = (scale.float() * (codes.float() - 1)).contiguous()
        x = torch.randn(1, cols, generator=g)
        for bits in sym_bits:
            packed = PackedSub1.encode(codes, scale, scale, -1, Sub1Dictionary.fit(codes, bits))
            new, old = K.operands(packed), K.operands(packed, fused=False)
            assert torch.allclose(K.sub1_matmul(x, packed, new), F.linear(x, W), rtol=1e-4, atol=1e-4)
            reps = max(15, min(rounds, int(3e8 / (rows * cols))))
            fns = {"fused": lambda: K.sub1_matmul(x, packed, new, threads),
                   "gather": lambda: K.sub1_matmul(x, packed, old, threads),
                   "fp32": lambda: F.linear(x, W)}
            load0 = os.getloadavg()[0]
            wall = timeit_interleaved(fns, reps, warmup=3)
            torch.set_num_threads(1)
            cpu = cpu_time_us({k: (lambda k=k: (K.sub1_matmul(x, packed, new if k == "fused" else old, 1)))
                               for k in ("fused", "gather")}, reps=max(1, reps // 30), rounds=9)
            torch.set_num_threads(threads)
            probes.append(read_bandwidth_gb_s())
            probe = statistics.median(probes)
            gbs = {k: packed.nbytes / (wall[k] * 1e3) for k in ("fused", "gather")}
            # what `threads` threads give when none is descheduled: blocks are independent, so one
            # thread's CPU time per call over `threads` (the 2-thread wall clock of a shared machine
            # mostly measures other processes' time slices)
            gbs_cpu = {k: threads * packed.nbytes / (cpu[k] * 1e3) for k in ("fused", "gather")}
            rec = {"bench": "sub1-roofline", "shape": [rows, cols], "p_zero": p_zero, "sym_bits": bits,
                   "bits_per_param": packed.bits_per_param, "packed_bytes": packed.nbytes,
                   "symbols": packed.n_symbols, "threads": threads,
                   "wall_us": {k: round(v, 1) for k, v in wall.items()},
                   "cpu_us_1thread": {k: round(v, 1) for k, v in cpu.items()},
                   "kernel_gb_s": {k: round(v, 3) for k, v in gbs.items()},
                   "probe_gb_s": round(probe, 2), "probes_gb_s": [round(p, 2) for p in probes],
                   "roofline_fraction": {k: round(v / probe, 3) for k, v in gbs.items()},
                   "kernel_gb_s_from_cpu": {k: round(v, 3) for k, v in gbs_cpu.items()},
                   "roofline_fraction_from_cpu": {k: round(v / probe, 3) for k, v in gbs_cpu.items()},
                   "fp32_gb_s": round(4 * rows * cols / (wall["fp32"] * 1e3), 2),
                   "speedup_wall": round(wall["gather"] / wall["fused"], 2),
                   "speedup_cpu_1thread": round(cpu["gather"] / cpu["fused"], 2),
                   "ns_per_symbol_1thread": {k: round(cpu[k] * 1e3 / packed.n_symbols, 2) for k in cpu},
                   "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)],
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # machine: results_line
            rows_out.append(rec)
            if jsonl:
                rec = append_result(jsonl, rec, threads=threads)
            print(json.dumps(rec), flush=True)
    print(f"\n| matrix | sym bits | bits/param | 1-thread CPU us gather / fused | ns per symbol gather / fused | "
          f"speed-up CPU / wall | GB/s ({threads} x 1-thread CPU) gather / fused | roofline (same) gather / "
          f"fused | wall {threads} threads us, GB/s, roofline: fused | probe GB/s | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows_out:
        c, ns, gc, fc = r["cpu_us_1thread"], r["ns_per_symbol_1thread"], r["kernel_gb_s_from_cpu"], \
            r["roofline_fraction_from_cpu"]
        print(f"| {r['shape'][0]}x{r['shape'][1]} | {r['sym_bits']} | {r['bits_per_param']:.3f} | "
              f"{c['gather']:.1f} / {c['fused']:.1f} | {ns['gather']:.2f} / {ns['fused']:.2f} | "
              f"{r['speedup_cpu_1thread']:.2f} / {r['speedup_wall']:.2f} | {gc['gather']:.2f} / {gc['fused']:.2f} | "
              f"{fc['gather']:.3f} / {fc['fused']:.3f} | {r['wall_us']['fused']:.1f}, "
              f"{r['kernel_gb_s']['fused']:.2f}, {r['roofline_fraction']['fused']:.3f} | "
              f"{r['probe_gb_s']:.1f} | {r['load_avg'][0]:.1f}-{r['load_avg'][1]:.1f} |")


def e2e(models: list, rounds: int, prompt_tokens: int, new_tokens: int, jsonl: str | None) -> None:
    """Batch-1 decode tok/s of several model folders in one process, round-robin (one generate each per
    round). NAME=DIR loads DIR; NAME=gather:DIR loads it with PEAKLLM_SUB1_GATHER set, so its sub-1-bit
    layers keep the gather kernel (the one before the fused path)."""
    import json

    from peakllm.models import load_model
    from peakllm.runtime.bench import bench_runtime, weight_bytes_per_step
    from peakllm.runtime.model import RuntimeModel

    loaded = {}
    for spec in models:
        name, path = spec.split("=", 1)
        gather = path.startswith("gather:")
        if gather:
            os.environ["PEAKLLM_SUB1_GATHER"] = "1"
        hf, _ = load_model(path.removeprefix("gather:"))
        loaded[name] = RuntimeModel.from_hf(hf, torch.float32, max_seq=prompt_tokens + new_tokens)
        os.environ.pop("PEAKLLM_SUB1_GATHER", None)
    tok_s = {k: [] for k in loaded}
    load0 = os.getloadavg()[0]
    for _ in range(rounds):
        for name, model in loaded.items():
            tok_s[name].append(bench_runtime(model, prompt_tokens, new_tokens, repeats=1)["decode_tok_s"])
    first = next(iter(loaded))
    rec = {"bench": "sub1-e2e", "threads": torch.get_num_threads(), "rounds": rounds, "prompt_tokens": prompt_tokens,
           "new_tokens": new_tokens, "models": models, "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)],
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "decode_tok_s": {k: round(statistics.median(v), 2) for k, v in tok_s.items()},
           "decode_runs": {k: [round(t, 2) for t in v] for k, v in tok_s.items()},
           "weight_mb_per_token": {k: round(weight_bytes_per_step(m, 1) / 1e6, 1) for k, m in loaded.items()},
           f"ratio_to_{first}_per_round": {k: [round(a / b, 2) for a, b in zip(v, tok_s[first])]
                                             for k, v in tok_s.items()}}
    print(json.dumps(rec))
    if jsonl:
        append_result(jsonl, rec, threads=rec["threads"])
    print(f"\n| model | decode tok/s (median of {rounds}) | x {first} (median of per-round ratios) | weight MB/token |")
    print("|---|---|---|---|")
    for k, v in tok_s.items():
        ratio = statistics.median(a / b for a, b in zip(v, tok_s[first]))
        print(f"| {k} | {statistics.median(v):.1f} | {ratio:.2f} | {rec['weight_mb_per_token'][k]} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=["stats", "speed", "batch", "roofline", "e2e"])
    ap.add_argument("--models", default=None, help="e2e: NAME=DIR[,NAME=gather:DIR...], the first is the baseline")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None, help="torch / kernel threads (default: all cores)")
    ap.add_argument("--shapes", default="576x1536,1536x576,4096x14336", help="roofline: rows x cols list")
    ap.add_argument("--sym-bits", default="8,16", help="roofline: symbol widths")
    ap.add_argument("--jsonl", default=None, help="roofline: append one JSON record per matrix here")
    ap.add_argument("--schemes", default="minmax,rtn,mean0.7", help="ternarisations for stats")
    ap.add_argument("--how", default="minmax", help="ternarisation for speed")
    ap.add_argument("--random", type=float, default=None, metavar="P0", help="speed on random codes, no model")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--encode-every", type=int, default=6)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.mode == "stats":
        stats(mlp_weights(), args.schemes.split(","), args.encode_every)
    elif args.mode == "e2e":
        e2e(args.models.split(","), args.rounds, args.prompt_tokens, args.new_tokens, args.jsonl)
    elif args.mode == "roofline":
        shapes = [tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",")]
        roofline(shapes, args.random or 0.92, [int(b) for b in args.sym_bits.split(",")], args.rounds, args.jsonl)
    elif args.mode == "batch":
        batches(args.random or 0.92)
    else:
        speed(None if args.random is not None else mlp_weights(), args.random or 0.0, args.how, args.rounds)


if __name__ == "__main__":
    main()
