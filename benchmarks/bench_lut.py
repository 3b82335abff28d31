"""The lookup-table kernel (kernels/lut.cpp) against the int-k 2-bit kernel and the sub-1-bit kernel.

    python benchmarks/bench_lut.py --rounds 5 --log docs/results/lut-kernel.jsonl

Cases: the expert matrices of the default model moefied to 16 experts (gate_up 192x576, down 576x96),
OLMoE-1B-7B's expert shapes (up/gate 1024x2048, down 2048x1024) and a 1B-model 2-bit matrix (2048x8192),
as [out, in]; random codes (ternary: i.i.d., P(0) = 0.92, symmetric per-row scales, as the sub1 roofline rows;
2-bit: uniform codes, groups of 64 or 128). Each kernel cycles through enough copies of its matrix to
exceed the last-level cache twice, so the weights come from memory as in a decode step.

Each round runs every kernel once (a pass over its copies), the order reversed every other round; per-round
ratios old / lut give the median (min-max) and the ratio of medians. GB/s are each kernel's own bytes read
per call (packed weights and their scales) over the median time; the roofline fraction divides by the
read-bandwidth probe (kernels/dense.py) measured before and after.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from peakllm.formats.sub1 import PackedSub1  # noqa: E402
from peakllm.formats.sub1_code import Sub1Dictionary  # noqa: E402
from peakllm.kernels import lut as L  # noqa: E402
from peakllm.kernels import ops, reference, sub1  # noqa: E402
from peakllm.kernels.dense import read_bandwidth_gb_s  # noqa: E402

from results_line import append as append_result  # noqa: E402

CASES = [  # (name, out, in, kind, group_size, batch)
    ("moefy16 gate_up", 192, 576, "ternary", -1, 1), ("moefy16 down", 576, 96, "ternary", -1, 1),
    ("moefy16 gate_up", 192, 576, "int2", 64, 1), ("moefy16 down", 576, 96, "int2", 32, 1),
    ("olmoe up", 1024, 2048, "ternary", -1, 1), ("olmoe down", 2048, 1024, "ternary", -1, 1),
    ("olmoe up", 1024, 2048, "int2", 128, 1), ("olmoe down", 2048, 1024, "int2", 128, 1),
    ("1B int2", 2048, 8192, "int2", 128, 1), ("1B ternary", 2048, 8192, "ternary", -1, 1),
    ("olmoe up", 1024, 2048, "int2", 128, 8), ("olmoe up", 1024, 2048, "ternary", -1, 8),
    ("1B int2", 2048, 8192, "int2", 128, 8),
]
CACHE_BYTES = 2 * 32 << 20  # twice the 32 MiB L3 of the machine the results were measured on


def tensors_nbytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def make_case(out: int, inn: int, kind: str, gs: int, seed: int):
    """{kernel: (callable of x and copy index, bytes a call reads, copies)} for one matrix."""
    g = torch.Generator().manual_seed(seed)
    ng = 1 if gs == -1 else -(-inn // gs)
    if kind == "ternary":
        u = torch.rand(out, inn, generator=g)
        codes = torch.ones(out, inn, dtype=torch.uint8)
        codes[u < 0.04] = 0
        codes[u > 0.96] = 2
        scale = (torch.rand(out, ng, generator=g) * 0.05 + 0.01).half()
        zeros = torch.ones(out, ng, dtype=torch.uint8)  # ternary sym = 2-bit affine with zero 1
        lw = L.pack_ternary(codes, scale, scale, gs)
    else:
        codes = torch.randint(0, 4, (out, inn), dtype=torch.uint8, generator=g)
        scale = (torch.rand(out, ng, generator=g) * 0.05 + 0.01).half()
        zeros = torch.randint(0, 4, (out, ng), dtype=torch.uint8, generator=g)
        lw = L.pack_intk2(codes, scale, zeros, gs)
    qweight = reference.pack_bitstream(codes, 2)
    starts, _ = ops.intk_groups(inn, gs)
    intk_bytes = tensors_nbytes(qweight, scale) + (0 if kind == "ternary" else zeros.numel())
    n = max(1, CACHE_BYTES // lw.nbytes)
    luts = [dataclasses.replace(lw, qlut=lw.qlut.clone(), s1=lw.s1.clone(),
                                p2=None if lw.p2 is None else lw.p2.clone()) for _ in range(n)]
    lut_fns = [L.bind_lut(w) for w in luts]
    m = max(1, CACHE_BYTES // intk_bytes)
    qs = [(qweight.clone(), scale.clone(), zeros.clone()) for _ in range(m)]
    a8 = [ops.bind_intk(q, s, z, 2, starts, None, True) for q, s, z in qs]
    f32 = [ops.bind_intk(q, s, z, 2, starts, None, False) for q, s, z in qs]
    kernels = {"lut": (lambda x, i: lut_fns[i % n](x), lw.nbytes, n),
               "intk2-a8": (lambda x, i: a8[i % m](x), intk_bytes, m),
               "intk2-f32": (lambda x, i: f32[i % m](x), intk_bytes, m)}
    if kind == "ternary":
        packed = PackedSub1.encode(codes, scale, scale, gs, Sub1Dictionary.fit(codes, 8))
        k = max(1, CACHE_BYTES // packed.nbytes)
        copies = [dataclasses.replace(packed, stream=packed.stream.clone(), block_offsets=packed.block_offsets.clone())
                  for _ in range(k)]
        operands = [sub1.operands(p) for p in copies]
        kernels["sub1"] = (lambda x, i: sub1.sub1_matmul(x, copies[i % k], operands[i % k]), packed.nbytes, k)
    return kernels, codes, scale, zeros, lw


def time_pass(fn, x, copies: int, min_seconds: float = 0.05, clock=time.perf_counter) -> float:
    """Seconds a call, over passes through every copy until min_seconds have gone (by `clock`)."""
    calls, t0 = 0, clock()
    while True:
        for i in range(copies):
            fn(x, i)
        calls += copies
        elapsed = clock() - t0
        if elapsed >= min_seconds:
            return elapsed / calls


def run_case(name, out, inn, kind, gs, batch, rounds: int, threads: int, log: str | None):
    kernels, codes, scale, zeros, lw = make_case(out, inn, kind, gs, seed=out + inn)
    x = torch.randn(batch, inn)
    exact = x @ reference.dequantize_intk(reference.pack_bitstream(codes, 2), scale, zeros, 2, inn, gs).T
    got = kernels["lut"][0](x, 0)
    assert (got - exact).pow(2).mean().sqrt() < 0.02 * exact.pow(2).mean().sqrt(), name
    probe0 = read_bandwidth_gb_s(256 << 20)
    load0 = os.getloadavg()[0]
    names = list(kernels)
    for k in names:  # warm-up: page faults, first touches
        time_pass(kernels[k][0], x, kernels[k][2], 0.01)
    times = {k: [] for k in names}
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            fn, _, copies = kernels[k]
            times[k].append(time_pass(fn, x, copies))
    # one thread, CPU time of this thread: time other processes take from a shared machine does not count
    torch.set_num_threads(1)
    cpu = {k: [] for k in names}
    for r in range(rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            fn, _, copies = kernels[k]
            cpu[k].append(time_pass(fn, x, copies, 0.05, time.thread_time))
    torch.set_num_threads(threads)
    probe1 = read_bandwidth_gb_s(256 << 20)
    probe = statistics.median([probe0, probe1])
    med = {k: statistics.median(v) for k, v in times.items()}
    row = {"bench": "lut-kernel", "case": name, "shape": [out, inn], "kind": kind, "group_size": gs, "batch": batch,
           "threads": threads, "rounds": rounds, "kblock": lw.kblock,
           "us_rounds": {k: [round(t * 1e6, 2) for t in v] for k, v in times.items()},
           "bytes": {k: kernels[k][1] for k in names}, "copies": {k: kernels[k][2] for k in names},
           "gb_s": {k: round(kernels[k][1] / med[k] / 1e9, 2) for k in names},
           "probe_gb_s": [round(probe0, 2), round(probe1, 2)],
           "roofline_fraction": {k: round(kernels[k][1] / med[k] / 1e9 / probe, 3) for k in names},
           "speedup_rounds": {k: [round(a / b, 3) for a, b in zip(times[k], times["lut"])] for k in names if k != "lut"},
           "speedup_of_medians": {k: round(med[k] / med["lut"], 3) for k in names if k != "lut"},
           "cpu_us_1thread_rounds": {k: [round(t * 1e6, 2) for t in v] for k, v in cpu.items()},
           "gb_s_from_cpu": {k: round(threads * kernels[k][1] / statistics.median(cpu[k]) / 1e9, 2) for k in names},
           "roofline_fraction_from_cpu": {k: round(threads * kernels[k][1] / statistics.median(cpu[k]) / 1e9 / probe, 3)
                                          for k in names},
           "cpu_speedup_rounds": {k: [round(a / b, 3) for a, b in zip(cpu[k], cpu["lut"])] for k in names if k != "lut"},
           "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    if log:
        row = append_result(log, row, threads=threads)
    sr = row["cpu_speedup_rounds"]
    cm = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"| {name} {out}x{inn} | {kind} g{gs} | {batch} | " + " | ".join(
        f"{k} wall {med[k] * 1e6:.1f}us {row['roofline_fraction'][k]:.2f}, cpu {cm[k] * 1e6:.1f}us "
        f"{row['roofline_fraction_from_cpu'][k]:.2f}" for k in names)
        + " | " + ", ".join(f"x{k} {statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})" for k, v in sr.items())
        + f" | {row['load_avg']} |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="run the cases whose name contains this")
    ap.add_argument("--log", default=None, help="append results lines to this jsonl")
    args = ap.parse_args()
    if args.rounds < 3:
        raise SystemExit("--rounds must be at least 3")
    torch.set_num_threads(args.threads)
    for case in CASES:
        if args.only in case[0]:
            run_case(*case, rounds=args.rounds, threads=args.threads, log=args.log)


if __name__ == "__main__":
    main()
