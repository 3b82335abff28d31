"""End-to-end decode of a ternary MoE through the decode engine's LUT kind against the fp32 MoE and the old paths.

    peakllm moefy --experts 8 --top-k 2 --output moe8
    peakllm quantize --model moe8 --method gptq --bits ternary --format peakllm --output moe8-tern
    peakllm quantize --model moe8 --method gptq --bits ternary --format sub1 --output moe8-sub1   # optional
    python benchmarks/bench_lut_moe.py --fp32 moe8 --ternary moe8-tern [--sub1 moe8-sub1] --rounds 5 \\
        --threads 2,1 --log docs/results/lut-moe.jsonl

Sides, each one `peakllm bench --json` subprocess a round: the fp32 MoE, the ternary folder with the LUT kernel
($PEAKLLM_LUT=on: TernaryLinear in the engine), the same folder with $PEAKLLM_LUT=off (the path before the LUT
kernel: ternary matrices dequantized to fp32 on load) and, if given, the sub-1-bit folder (its experts through
the sub1 kernel). Rounds alternate the sides and reverse their order every other round; /proc/loadavg is read
before and after every run. Per-round ratios ternary-lut / side give the median (min-max) and the ratio of
medians. Before timing, the ternary folder is decoded greedily through the engine and op by op (the same LUT
kernel), with int8 and with exact tables (greedy_check): where their tokens first differ goes into the line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import peakllm  # noqa: E402,F401  (before torch: OMP_WAIT_POLICY)
import torch  # noqa: E402

from results_line import append as append_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def bench(model: str, lut: str, threads: int, prompt: int, new: int, repeats: int) -> dict:
    """One `peakllm bench --json` run in a fresh process with $PEAKLLM_LUT = lut."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PEAKLLM_LUT": lut, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "peakllm", "bench", "--model", model, "--threads", str(threads), "--prompt-tokens",
           str(prompt), "--new-tokens", str(new), "--repeats", str(repeats), "--json"]
    load0 = loadavg()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr.strip()[-1500:]}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"tok_s": out["decode_tok_s"], "weight_bytes": out["weight_bytes"], "load": [load0, loadavg()]}


def greedy_tokens(folder: str, act: str, engine: bool, prompt_tokens: int, steps: int) -> tuple[list, torch.Tensor]:
    """Greedy tokens and each step's logits of `folder` with int-k / ternary activations `act` (int8: int8
    tables; f32: exact fp32 tables), through the decode engine or op by op."""
    from peakllm.models import load_model
    from peakllm.runtime.model import RuntimeModel

    os.environ["PEAKLLM_INTK_ACT"] = act  # read when the packed modules are built
    hf, _ = load_model(folder)
    prompt = torch.randint(1, hf.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    rt = RuntimeModel.from_hf(hf)
    rt.use_step_engine = engine
    rt.setup_cache(1, prompt_tokens + steps + 1)
    with torch.no_grad():
        logits, tokens = [rt(prompt, 0)[:, -1]], []
        for t in range(steps):
            tokens.append(int(logits[-1].argmax(-1)))
            logits.append(rt(torch.tensor([[tokens[-1]]]), prompt_tokens + t)[:, -1])
    return tokens, torch.cat(logits).float()


def greedy_check(folder: str, prompt_tokens: int, steps: int) -> dict:
    """Engine against op by op, greedy, with int8 and with exact tables: the steps their tokens agree (from the
    first), and the largest logit difference over the steps before the first disagreement; and the op path's
    int8 tables against its exact ones (how far the kernel's own rounding moves this model's tokens)."""
    out, ops = {"greedy_steps": steps}, {}
    for act in ("int8", "f32"):
        (te, le), (to, lo) = (greedy_tokens(folder, act, e, prompt_tokens, steps) for e in (True, False))
        agree = next((i for i, (a, b) in enumerate(zip(te, to)) if a != b), steps)
        ops[act] = to
        out[f"engine_vs_op_{act}"] = {"agree_steps": agree, "max_logit_diff": round(float(
            (le[:agree + 1] - lo[:agree + 1]).abs().max()), 5), "logit_scale": round(float(lo.abs().max()), 2)}
    out["op_int8_vs_f32_agree_steps"] = next((i for i, (a, b) in enumerate(zip(ops["int8"], ops["f32"])) if a != b),
                                             steps)
    os.environ.pop("PEAKLLM_INTK_ACT")
    return out


def run(args, threads: int) -> dict:
    sides = {"fp32": (args.fp32, "on"), "ternary-lut": (args.ternary, "on"), "ternary-lut-off": (args.ternary, "off")}
    if args.sub1:
        sides["sub1"] = (args.sub1, "on")
    names = list(sides)
    runs = {k: [] for k in names}
    for r in range(args.rounds):
        for k in (names if r % 2 == 0 else names[::-1]):
            runs[k].append(bench(*sides[k], threads, args.prompt_tokens, args.new_tokens, args.repeats))
            print(f"threads {threads} round {r} {k}: {runs[k][-1]['tok_s']:.1f} tok/s, load {runs[k][-1]['load']}",
                  flush=True)
    tok = {k: [x["tok_s"] for x in v] for k, v in runs.items()}
    med = {k: statistics.median(v) for k, v in tok.items()}
    ours = "ternary-lut"
    return {"bench": "lut-moe-decode", "threads": threads, "rounds": args.rounds, "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens, "repeats": args.repeats,
            "models": {k: {"folder": Path(m).name, "lut": lut} for k, (m, lut) in sides.items()},
            "tok_s_rounds": {k: [round(x, 2) for x in v] for k, v in tok.items()},
            "weight_bytes": {k: v[0]["weight_bytes"] for k, v in runs.items()},
            "ratio_rounds": {k: [round(a / b, 3) for a, b in zip(tok[ours], tok[k])] for k in names if k != ours},
            "ratio_of_medians": {k: round(med[ours] / med[k], 3) for k in names if k != ours},
            "load_rounds": {k: [x["load"] for x in v] for k, v in runs.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fp32", required=True, help="the moefied fp32 folder")
    ap.add_argument("--ternary", required=True, help="the same model quantized --bits ternary --format peakllm")
    ap.add_argument("--sub1", help="the same model quantized --bits ternary --format sub1 (optional side)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", default="2,1", help="comma-separated thread counts, one results line each")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--greedy-steps", type=int, default=32)
    ap.add_argument("--log", help="append one JSON line per thread count to this file")
    args = ap.parse_args()
    torch.set_num_threads(2)
    check = greedy_check(args.ternary, args.prompt_tokens, args.greedy_steps)
    print("greedy check:", check, flush=True)
    for threads in (int(t) for t in args.threads.split(",")):
        t0 = time.perf_counter()
        row = {**run(args, threads), **check, "seconds": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        if args.log:
            append_result(args.log, row, threads=threads)


if __name__ == "__main__":
    main()
