"""`make demo` / `make demo-qmoe`: the main jobs on the embedded default model, as plain `peakllm`
commands (printed before they run), with every measured number logged and tabulated at the end.

  python -m peakllm.cli.demo          dense baseline, generation, SparseGPT 50% pruning, dense vs pruned
  python -m peakllm.cli.demo qmoe     moefy the default model, compress its experts to ternary in the
                                  sub-1-bit format, evaluate and generate from the compressed form
Outputs go to $PEAKLLM_CACHE/demo/.
"""

from __future__ import annotations

import json
import shlex
import shutil
import sys

from peakllm.cli import main as peakllm
from peakllm.paths import cache_dir

EVAL_TOKENS = "4096"


def run(*argv: str) -> None:
    print(f"\n$ peakllm {shlex.join(argv)}", flush=True)
    code = peakllm(list(argv))
    if code != 0:
        raise SystemExit(f"demo step failed (exit {code}): peakllm {shlex.join(argv)}")


def summary(log) -> None:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    print("\nresults (wiki held-out split, seqlen 512, first", EVAL_TOKENS, "tokens)")
    print(f"{'step':<34} {'ppl':>8} {'dense ppl':>10} {'size MB':>9} {'bits/param':>11} {'seconds':>8}")
    for r in rows:
        if "ppl" not in r:
            continue
        step = r["command"] + (f" {r['method']}" if r.get("method") else "") + (
            f" {r.get('sparsity_target', '')}" if r["command"] == "prune" else "") + (
            f" E={r['experts']} k={r['top_k']}" if r["command"] == "moefy" else "") + (
            f" {r['bits']}" if r["command"] == "quantize" else "") + (
            f" {r['model']}" if r["command"] == "eval" else "")
        size = r.get("size_bytes")
        bpp = r.get("bits_per_param_experts") or r.get("bits_per_param")
        print(f"{step[:34]:<34} {r['ppl']:>8.3f} {r.get('dense_ppl') or float('nan'):>10.3f} "
              f"{(size or 0) / 1e6:>9.1f} {bpp or float('nan'):>11.3f} {r.get('seconds', 0):>8.1f}")
    for r in rows:
        if r["command"] == "prune" and r.get("size_bytes") and r.get("dense_size_bytes"):
            speed = r.get("roofline_speedup_vs_bf16")
            print(f"\npruned folder {r['size_bytes'] / 1e6:.1f} MB, the dense input {r['dense_size_bytes'] / 1e6:.1f} MB"
                  + (f"; a decode reads {speed:.2f}x fewer weight bytes than the dense model in bf16" if speed else ""))
    print(f"\nall results: {log} (turn them into a report with: peakllm report {log} --output DIR)")


def main(argv: list[str]) -> int:
    which = argv[0] if argv else "prune"
    out = cache_dir() / "demo"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    log = out / "results.jsonl"
    if which == "prune":
        run("info")
        run("eval", "--max-tokens", EVAL_TOKENS, "--log", str(log))
        run("generate", "--prompt", "The capital of France is", "--max-new-tokens", "24")
        run("prune", "--method", "sparsegpt", "--sparsity", "0.5", "--calib-samples", "16",
            "--eval-tokens", EVAL_TOKENS, "--output", str(out / "sparsegpt-50"), "--log", str(log))
        run("generate", "--model", str(out / "sparsegpt-50"), "--prompt", "The capital of France is",
            "--max-new-tokens", "24")
    elif which == "qmoe":
        moe, qmoe = out / "moe", out / "qmoe-sub1"
        run("moefy", "--experts", "16", "--top-k", "12", "--calib-samples", "16", "--eval-tokens", EVAL_TOKENS,
            "--output", str(moe), "--log", str(log))
        run("quantize", "--model", str(moe), "--method", "gptq", "--bits", "ternary", "--group-size", "-1",
            "--format", "sub1", "--dense-bits", "4", "--calib-samples", "64", "--eval-tokens", EVAL_TOKENS,
            "--output", str(qmoe), "--log", str(log))
        run("info", "--model", str(qmoe))
        run("generate", "--model", str(qmoe), "--prompt", "The capital of France is", "--max-new-tokens", "24")
    else:
        print(__doc__)
        return 2
    summary(log)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
