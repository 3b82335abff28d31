"""The int-k kernel library of a git revision against the working tree's, alternated call by call in one process.

    python benchmarks/bench_intk_builds.py --rev 2e328b7 --shapes 11008x4096,4096x4096 --group-size 128 \\
        [--bits 4] [--batch 1] [--threads 1] [--calls 40] [--act int8|f32] [--matrices 40]

Both trees' kernels/intk.cpp (with their headers) are compiled as the JIT build does (kernels/build.py
CXX_FLAGS) into a temporary folder; every call of one build is followed by a call of the other on the same
random packed matrix, so both see the same machine state. Reports the median seconds per call (CPU time of
this thread at --threads 1, wall time otherwise), GB/s of packed bytes, the speed-up, and whether the two
outputs are bit-equal. --matrices N gives each shape N copies of its matrix in distinct memory, called in
turn, so a working set far larger than the last-level cache is read from memory as in decoding a big model
(one matrix of these shapes fits a 32 MB L3).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from peakllm.kernels import build, ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_kernels_intk_int8act import random_intk  # noqa: E402


def compile_tree(src_dir: Path, out: Path) -> dict:
    subprocess.run(["g++", *build.CXX_FLAGS, str(src_dir / "intk.cpp"), "-o", str(out)], check=True)
    return ops.bind(ctypes.CDLL(str(out)), "intk")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rev", required=True, help="git revision of the baseline kernels")
    ap.add_argument("--shapes", default="11008x4096,4096x4096", help="OUTxIN list")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--calls", type=int, default=40)
    ap.add_argument("--act", choices=("int8", "f32"), default="int8")
    ap.add_argument("--matrices", type=int, default=1, help="copies of each shape's matrix, called in turn")
    args = ap.parse_args()
    repo = Path(__file__).resolve().parents[1]
    kdir = repo / "peakllm" / "kernels"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "base").mkdir()
        names = [p.name for p in kdir.iterdir() if p.suffix in (".h", ".cpp")]
        for name in names:
            shown = subprocess.run(["git", "-C", str(repo), "show", f"{args.rev}:peakllm/kernels/{name}"],
                                   capture_output=True)
            if shown.returncode == 0:
                (tmp / "base" / name).write_bytes(shown.stdout)
        libs = {"base": compile_tree(tmp / "base", tmp / "base.so"), "tree": compile_tree(kdir, tmp / "tree.so")}
        fn_name = "intk_gemm_a8" if args.act == "int8" else "intk_gemm"
        timer = time.thread_time if args.threads == 1 else time.perf_counter
        print(f"rev {args.rev} vs working tree, int{args.bits} g{args.group_size}, {args.act} activations, "
              f"batch {args.batch}, {args.threads} thread(s), {args.matrices} matrices a shape, "
              f"load {os.getloadavg()[0]:.2f}")
        for shape in args.shapes.split(","):
            out, inn = (int(v) for v in shape.split("x"))
            _, qweight, scales, zeros, _ = random_intk(out, inn, args.bits, args.group_size, False, seed=1)
            copies = [(qweight, scales, zeros)] + [(qweight.clone(), scales.clone(), zeros.clone())
                                                   for _ in range(args.matrices - 1)]
            starts, _ = ops.intk_groups(inn, args.group_size)
            x = torch.randn(args.batch, inn)
            y = {k: torch.empty(args.batch, out) for k in libs}
            t = {k: [] for k in libs}
            for i in range(args.calls):
                for j, (k, fns) in enumerate(libs.items()):
                    # the two builds read copies half the set apart: neither finds the other's just-read one in cache
                    qweight, scales, zeros = copies[(i + j * (len(copies) // 2)) % len(copies)]
                    t0 = timer()
                    rc = fns[fn_name](ops.ptr(x), 0, None, args.batch, inn, ops.ptr(qweight), ops.ptr(scales),
                                      ops.ptr(zeros), ops.ptr(starts), starts.numel() - 1, out, args.bits,
                                      ops.ptr(y[k]), args.threads)
                    t[k].append(timer() - t0)
                    assert rc == 0
            med = {k: statistics.median(v) for k, v in t.items()}
            nbytes = qweight.numel() * qweight.element_size() + scales.numel() * 2 + zeros.numel()
            print(f"{shape}: base {med['base'] * 1e6:.0f} us ({nbytes / med['base'] / 1e9:.1f} GB/s), tree "
                  f"{med['tree'] * 1e6:.0f} us ({nbytes / med['tree'] / 1e9:.1f} GB/s), speed-up "
                  f"{med['base'] / med['tree']:.2f}, bit-equal {torch.equal(y['base'], y['tree'])}")


if __name__ == "__main__":
    main()
