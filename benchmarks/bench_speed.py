"""Decode / prefill speed of the default model dense and packed, all measured in one run.

  python benchmarks/bench_speed.py [--workdir DIR] [--new-tokens 64] [--prompt-tokens 128] [--repeats 3]

Builds the packed folders first (speed does not depend on how the codes were chosen, so the data-free
RTN and magnitude are used, and SparseGPT with a tiny calibration set for 2:4 + int4), then runs
`peakllm bench --json` on each in a fresh process, one after another, and prints a Markdown table with
ratios to peakllm's dense fp32 row and to transformers' generate on dense fp32.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from peakllm.cli import main as peakllm

FOLDERS = {  # name -> peakllm command that writes it
    "int8 (row)": ["quantize", "--method", "rtn", "--bits", "8", "--group-size", "-1"],
    "int4 g128": ["quantize", "--method", "rtn", "--bits", "4", "--group-size", "128"],
    "int3 g128": ["quantize", "--method", "rtn", "--bits", "3", "--group-size", "128"],
    "int2 g64": ["quantize", "--method", "rtn", "--bits", "2", "--group-size", "64"],
    "2:4 sparse": ["prune", "--method", "magnitude", "--pattern", "2:4", "--format", "peakllm"],
    "2:4 + int4 g128": ["prune", "--method", "sparsegpt", "--pattern", "2:4", "--bits", "4", "--group-size", "128",
                        "--format", "peakllm", "--calib-samples", "2", "--calib-seqlen", "128"],
    "50% unstructured": ["prune", "--method", "magnitude", "--sparsity", "0.5", "--format", "peakllm"],
}


def bench(model: str, *extra: str, args) -> dict:
    cmd = [sys.executable, "-m", "peakllm", "bench", "--model", model, "--json", "--new-tokens", str(args.new_tokens),
           "--prompt-tokens", str(args.prompt_tokens), "--repeats", str(args.repeats), *extra]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip()[-500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="out/speed")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    for name, cmd in FOLDERS.items():
        folder = work / name.replace(" ", "_").replace(":", "-").replace("%", "pct").replace("+", "plus")
        if not folder.exists():
            code = peakllm([*cmd, "--output", str(folder), "--eval-tokens", "0", "--json"])
            if code:
                raise SystemExit(f"building {name} failed")
        FOLDERS[name] = str(folder)
    rows = [("transformers generate, dense fp32", bench("default", "--hf", args=args)),
            ("transformers generate, dense bf16", bench("default", "--hf", "--dtype", "bf16", args=args)),
            ("peakllm dense fp32", bench("default", args=args)),
            ("peakllm dense bf16", bench("default", "--dtype", "bf16", args=args))]
    rows += [(f"peakllm {name}", bench(folder, args=args)) for name, folder in FOLDERS.items()]
    base = rows[2][1]["decode_tok_s"]
    hf = rows[0][1]["decode_tok_s"]
    print("| model | decode tok/s | × peakllm fp32 | × HF generate fp32 | prefill tok/s | TTFT s | weight MB/token "
          "| roofline | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        print(f"| {name} | {r['decode_tok_s']:.1f} | {r['decode_tok_s'] / base:.2f} | {r['decode_tok_s'] / hf:.2f} | "
              f"{r['prefill_tok_s']:.0f} | {r['ttft_s']:.3f} | {r['weight_bytes'] / 1e6:.0f} | "
              f"{r['roofline_fraction']:.2f} | {r['peak_rss_bytes'] / 1e6:.0f} |")
    print(f"\nbandwidth measured in the peakllm dense fp32 run: {rows[2][1].get('bandwidth_gb_s', float('nan')):.1f} GB/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
