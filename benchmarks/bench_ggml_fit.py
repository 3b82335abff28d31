"""Fitting llama.cpp block types' parameters: the compiled kernel (kernels/ggml_fit.cpp) against its torch
reference (solvers/ggml_fit.fit_params_reference), per type, on one matrix.

    python benchmarks/bench_ggml_fit.py [--rows 1024] [--cols 11008] [--types Q4_K,Q6_K,...] [--rounds 3]
                                        [--threads 2] [--no-importance] [--out docs/results/ggml-fit.jsonl]

The matrix is random normal with every 7th column 4x (outliers), the importance vector (imatrix) uniform in
[0, 1) as GPTQ and imatrix runs pass one. Each round times both sides once, the order swapped every round;
ns per weight per round, the speed-up as the median of per-round ratios (reference / kernel), and whether
the two gave the same parameters bit for bit. One results line per type.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import partial
from pathlib import Path

# As every peakllm command runs (peakllm/__init__.py), but set before torch loads its OpenMP runtime, which reads
# it once: spinning threads on a shared machine make the reference's many small parallel ops many times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from results_line import append

from peakllm.formats.gguf.blocks import BLOCK_TYPES
from peakllm.kernels.ggml_fit import fit_function
from peakllm.solvers.ggml_fit import fit_params, fit_params_reference

Q4_K_M_TYPES = "Q4_K,Q6_K,Q5_0,Q8_0"  # what the default model's Q4_K_M file holds


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(a[k].shape == b[k].shape and torch.equal(
        a[k].view(torch.int16) if a[k].dtype == torch.float16 else a[k],
        b[k].view(torch.int16) if b[k].dtype == torch.float16 else b[k]) for k in a)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=11008)
    ap.add_argument("--types", default=Q4_K_M_TYPES, help="comma-separated, or 'all'")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-importance", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "docs/results/ggml-fit.jsonl"))
    args = ap.parse_args()
    types = list(BLOCK_TYPES) if args.types == "all" else args.types.split(",")
    for name in types:
        if name not in BLOCK_TYPES or args.cols % BLOCK_TYPES[name].block:
            sys.exit(f"{name}: not a block type, or {args.cols} columns are not whole blocks of it")
    if fit_function() is None:
        sys.exit("the ggml_fit kernel cannot be built here: nothing to compare")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    W = torch.randn(args.rows, args.cols, generator=g)
    W[:, ::7] *= 4
    imp = None if args.no_importance else torch.rand(args.cols, generator=g)
    n = W.numel()
    for name in types:
        t = BLOCK_TYPES[name]
        fit_params(W[:4], t, imp)  # build and load the kernel outside the timing
        ref_ns, kern_ns, loads, identical = [], [], [], True
        for r in range(args.rounds):
            sides = [("ref", partial(fit_params_reference, W, t, imp)), ("kernel", partial(fit_params, W, t, imp))]
            out = {}
            for side, fn in sides if r % 2 == 0 else sides[::-1]:
                out[side], seconds = timed(fn)
                (ref_ns if side == "ref" else kern_ns).append(seconds * 1e9 / n)
            identical &= same(out["ref"], out["kernel"])
            loads.append(round(os.getloadavg()[0], 2))
            print(f"{name} round {r}: reference {ref_ns[-1]:.0f} ns/w, kernel {kern_ns[-1]:.1f} ns/w", flush=True)
        row = {"bench": "ggml-fit", "type": name, "rows": args.rows, "cols": args.cols,
               "importance": imp is not None, "rounds": args.rounds, "threads": args.threads,
               "reference_ns_per_weight": [round(x, 1) for x in ref_ns],
               "kernel_ns_per_weight": [round(x, 2) for x in kern_ns],
               "speedup_rounds": [round(a / b, 2) for a, b in zip(ref_ns, kern_ns)],
               "identical": identical, "loadavg_per_round": loads}
        append(args.out, row, args.threads)


if __name__ == "__main__":
    main()
