"""Decode speed of peakllm folders against llama.cpp GGUF files of the same model: interleaved, same threads.

  python benchmarks/bench_decode_vs_llamacpp.py --llama-bench /work/peers/llama.cpp/build/bin/llama-bench \\
      --pair "int4 g32 sym + 8-bit embedding=OUT/int4-e8:GGUFDIR/q4_0.gguf" --pair ... --rounds 3 --log FILE \\
      [--peakllm-args "NAME=--act f32"]

Each round runs every peakllm folder (`peakllm bench --json`, fresh process) and every GGUF (`llama-bench
-p 0 -n N -r 1 -t T -o json`) once, alternating, so both sides see the same machine state; the table shows
the median tok/s of each side over the rounds, their ratio, and the weight bytes each reads per token
(peakllm: as `bench` counts them; llama.cpp: its file size, which it reads once per token but for the
embedding rows). --peakllm-args NAME=ARGS adds arguments to that pair's `peakllm bench` (e.g. --act f32,
so one folder can run as two pairs side by side). Decode is timed from a 16-token prompt on the peakllm side and from an empty context on
llama.cpp's (-p 0); both are dominated by reading the weights at these lengths.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from results_line import append as append_result  # benchmarks/results_line.py: commit, machine, command


def peakllm_tok_s(folder: str, args, extra: list[str], tree: str | None = None) -> dict:
    """One `peakllm bench --json` in a fresh process; `tree`: run the peakllm of that checkout (PYTHONPATH, from
    a neutral working directory so that no other checkout's package comes first)."""
    cmd = [sys.executable, "-m", "peakllm", "bench", "--model", folder, "--json", "--new-tokens", str(args.new_tokens),
           "--prompt-tokens", "16", "--repeats", "1", "--threads", str(args.threads), *extra]
    env = None if tree is None else {**os.environ, "PYTHONPATH": str(Path(tree).resolve())}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=None if tree is None else tempfile.gettempdir())
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip()[-800:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def llama_tok_s(gguf: str, args) -> float:
    cmd = [args.llama_bench, "-m", gguf, "-p", "0", "-n", str(args.new_tokens), "-r", "1", "-t", str(args.threads),
           "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip()[-800:]}")
    rows = json.loads(out.stdout)
    return float(next(r for r in rows if r.get("n_gen"))["avg_ts"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-bench", required=True)
    ap.add_argument("--pair", action="append", required=True, metavar="NAME=PEAKLLM_DIR:GGUF")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--log", default=None)
    ap.add_argument("--peakllm-args", action="append", default=[], metavar="NAME=ARGS",
                    help="extra arguments for one pair's `peakllm bench`, e.g. 'f32=--act f32'")
    args = ap.parse_args()
    extra = {}
    for spec in args.peakllm_args:
        name, _, rest = spec.partition("=")
        extra[name] = rest.split()
    if not Path(args.llama_bench).is_file():
        raise SystemExit(f"llama-bench not found at {args.llama_bench}")
    pairs = []
    for spec in args.pair:
        name, _, rest = spec.partition("=")
        folder, _, gguf = rest.rpartition(":")
        for p in (folder, gguf):
            if p != "default" and not Path(p).exists():
                raise SystemExit(f"{p} does not exist")
        pairs.append((name, folder, gguf))
    ours: dict[str, list] = {n: [] for n, _, _ in pairs}
    theirs: dict[str, list] = {n: [] for n, _, _ in pairs}
    loads = []
    for r in range(args.rounds):
        for name, folder, gguf in pairs:
            loads.append(os.getloadavg()[0])
            ours[name].append(peakllm_tok_s(folder, args, extra.get(name, [])))
            theirs[name].append(llama_tok_s(gguf, args))
            print(f"round {r}: {name}: peakllm {ours[name][-1]['decode_tok_s']:.3g} tok/s, "
                  f"llama.cpp {theirs[name][-1]:.3g} tok/s (load {loads[-1]:.2f})", file=sys.stderr, flush=True)
    lines = ["| pair | peakllm tok/s | llama.cpp tok/s | ratio | peakllm weight MB/token | GGUF MB | "
             "peakllm roofline fraction |", "|---|---|---|---|---|---|---|"]
    for name, folder, gguf in pairs:
        mine = statistics.median(o["decode_tok_s"] for o in ours[name])
        other = statistics.median(theirs[name])
        # the ratio metric of docs/results: the median of per-round ratios (same round, same machine state)
        ratios = [o["decode_tok_s"] / t for o, t in zip(ours[name], theirs[name])]
        row = {"bench": "decode-vs-llamacpp", "pair": name, "peakllm": folder, "peakllm_args": extra.get(name, []),
               "gguf": gguf, "rounds": args.rounds,
               "threads": args.threads, "new_tokens": args.new_tokens, "peakllm_tok_s": [o["decode_tok_s"] for o in ours[name]],
               "llamacpp_tok_s": theirs[name], "ratio_rounds": ratios, "ratio_median": statistics.median(ratios),
               "peakllm_weight_bytes": ours[name][0]["weight_bytes"], "gguf_bytes": Path(gguf).stat().st_size,
               "roofline_fraction": statistics.median(o["roofline_fraction"] for o in ours[name]),
               "bandwidth_gb_s": statistics.median(o["bandwidth_gb_s"] for o in ours[name]),
               "load_average": [min(loads), max(loads)],
               **{f"peakllm_{k}": [o.get(k) for o in ours[name]] for k in ("load_s", "peak_rss_bytes",
                                                                          "peak_rss_decode_bytes", "base_rss_bytes")}}
        if args.log:
            append_result(args.log, row, threads=args.threads)
        lines.append(f"| {name} | {mine:.3g} | {other:.3g} | {row['ratio_median']:.2f} | {row['peakllm_weight_bytes'] / 1e6:.1f} | "
                     f"{row['gguf_bytes'] / 1e6:.1f} | {row['roofline_fraction']:.2f} |")
    print("\n".join(lines))
    print(f"load average during the runs: {min(loads):.2f}-{max(loads):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
