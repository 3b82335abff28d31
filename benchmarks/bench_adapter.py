"""Decode speed with an unmerged LoRA adapter against without it (issue 28: "≥ 0.85× the speed without it").

  python benchmarks/bench_adapter.py [--model FOLDER] [--adapter DIR] [--rounds 3] [--threads 2]
      [--dtypes bf16,fp32] [--out docs/results/adapter.jsonl]

The model is the default model quantized to int4 (`peakllm quantize --model default --method rtn --bits 4
--group-size 64 --format peakllm --output FOLDER`, run first when FOLDER does not exist). Without --adapter, a
rank-16 LoRA adapter on all seven linears of every layer (`peakllm recover`'s defaults: r 16, alpha 32) is made
with PEFT on the packed model exactly as `recover --method lora` sets it up (recover/lora.py `lora_model`), its B
matrices then drawn at random (PEFT starts B at zero, which would leave nothing to compute), and saved in PEFT's
layout: the speed does not depend on what the adapter learned. Each round runs `peakllm bench` once without the
adapter and once with it per --dtypes entry (the adapter's A and B held in bf16 or fp32), each in its own process,
the order reversed every round. One results line per adapter dtype: decode tok/s of both sides per round, the
median of per-round ratios and its spread, the load average at each run, CPU and commit (results_line.py).

On a shared machine whose load swings within a minute, whole processes a minute apart measure the load as much
as the adapter; `--interleaved ROUNDS` runs the sides in one process instead, --new-tokens decode steps each in
turn, so both sides of a round share the machine's state (load recorded at the start and the end).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_line import append  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
QUANTIZE = ["quantize", "--model", "default", "--method", "rtn", "--bits", "4", "--group-size", "64", "--format",
            "peakllm", "--eval-tokens", "0"]
RANK, ALPHA = 16, 32.0
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peakllm(args: list[str], threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "peakllm", *args, "--json"], capture_output=True, text=True, env=env,
                          cwd=REPO)
    if done.returncode != 0:
        raise SystemExit(f"peakllm {' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def make_adapter(model_dir: Path, out: Path, seed: int = 0) -> None:
    """A rank-16 adapter on every linear, set up by recover's own LoRA code, B drawn at random, saved by PEFT."""
    from peakllm.models import load_model
    from peakllm.recover.lora import lora_model

    peft_model = lora_model(load_model(str(model_dir))[0], rank=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                            seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    peft_model.save_pretrained(str(out))


def interleaved(model_dir: Path, adapter: Path, dtypes: list[str], pairs: int, tokens: int, threads: int) -> dict:
    """In one process: the model without the adapter and with it (one RuntimeModel per side, the packed weights
    mapped from the same file), `tokens` decode steps of each side in turn, the order reversed every round, for
    `pairs` rounds: a slow stretch of a shared machine then hits both sides of a round alike. Returns
    {side: [tok/s per round]} and {"layers": linears adapted}."""
    import time

    from peakllm.models import load_model
    from peakllm.runtime.adapter import attach_adapter, read_adapter
    from peakllm.runtime.model import RuntimeModel

    torch.set_num_threads(threads)
    prompt = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    feed = torch.randint(0, 1000, (tokens,), generator=torch.Generator().manual_seed(1))
    sides, models = ["none", *dtypes], {}
    for side in sides:
        hf = load_model(str(model_dir))[0]
        if side != "none":
            layers = attach_adapter(hf, read_adapter(adapter, torch.bfloat16 if side == "bf16" else torch.float32))
        models[side] = RuntimeModel.from_hf(hf, torch.float32, max_seq=prompt.shape[1] + tokens)
        models[side].setup_cache(1)
    tok_s: dict = {s: [] for s in sides}
    with torch.inference_mode():
        for m in models.values():  # once: every round decodes positions P .. P + tokens - 1 again, over the same keys
            m(prompt, 0, last_only=True)
        for r in range(pairs):
            for side in sides if r % 2 == 0 else sides[::-1]:
                m = models[side]
                t0 = time.perf_counter()
                for i in range(tokens):
                    m(feed[i].view(1, 1), prompt.shape[1] + i, last_only=True)
                tok_s[side].append(tokens / (time.perf_counter() - t0))
    return tok_s, {"layers": layers}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(Path.home() / ".cache" / "peakllm" / "bench-adapter" / "smol-int4-g64"))
    ap.add_argument("--adapter", default=None, help="a PEFT LoRA folder (default: a random rank-16 one, see above)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="bf16,fp32", help="the adapter's A and B as the runtime holds them")
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs inside each `peakllm bench` (its median)")
    ap.add_argument("--interleaved", type=int, default=0, metavar="ROUNDS",
                    help="instead of `peakllm bench` processes: one process, --new-tokens decode steps per side in "
                    "turn for ROUNDS rounds (see `interleaved`)")
    ap.add_argument("--out", default="docs/results/adapter.jsonl")
    args = ap.parse_args()
    model = Path(args.model)
    if not model.exists():
        peakllm([*QUANTIZE, "--output", str(model)], args.threads)
    adapter = Path(args.adapter) if args.adapter else model.parent / f"{model.name}-lora-r{RANK}-random"
    if not adapter.exists():
        make_adapter(model, adapter)
    dtypes = args.dtypes.split(",")
    if args.interleaved:
        loads_start = os.getloadavg()[0]
        tok_s, made = interleaved(model, adapter, dtypes, args.interleaved, args.new_tokens, args.threads)
        for dtype in dtypes:
            ratios = [a / b for a, b in zip(tok_s[dtype], tok_s["none"])]
            row = {"bench": "adapter-decode-interleaved", "model": "default int4 (rtn g64, peakllm folder)",
                   "model_folder": str(model), "adapter": "random" if args.adapter is None else str(adapter),
                   "adapter_rank": RANK, "adapter_layers": made["layers"], "adapter_dtype": dtype, "threads": args.threads,
                   "rounds": args.interleaved, "tokens_per_round": args.new_tokens,
                   "act": os.environ.get("PEAKLLM_INTK_ACT", "int8"), "tok_s_without": tok_s["none"],
                   "tok_s_with": tok_s[dtype], "ratios": ratios, "ratio_median": statistics.median(ratios),
                   "ratio_spread": [min(ratios), max(ratios)], "load_rounds": [loads_start, os.getloadavg()[0]]}
            line = append(args.out, row, args.threads)
            print(f"adapter {dtype} (interleaved): {line['ratio_median']:.3f}x ({min(ratios):.3f}-{max(ratios):.3f})",
                  flush=True)
        return 0
    common = ["bench", "--model", str(model), "--threads", str(args.threads), "--prompt-tokens",
              str(args.prompt_tokens), "--new-tokens", str(args.new_tokens), "--repeats", str(args.repeats)]
    sides = ["none", *dtypes]
    tok_s: dict[str, list[float]] = {s: [] for s in sides}
    loads: list[float] = []
    info: dict = {}
    for r in range(args.rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:
            extra = [] if side == "none" else ["--adapter", str(adapter), "--adapter-dtype", side]
            loads.append(os.getloadavg()[0])
            result = peakllm(common + extra, args.threads)
            tok_s[side].append(result["decode_tok_s"])
            if side != "none":
                info[side] = {k: result[k] for k in ("adapter_layers", "adapter_rank", "weight_bytes")}
            else:
                info[side] = {"weight_bytes": result["weight_bytes"]}
            print(f"round {r + 1} {side:5s}: {result['decode_tok_s']:6.1f} tok/s (load {loads[-1]:.1f})", flush=True)
    for dtype in dtypes:
        ratios = [a / b for a, b in zip(tok_s[dtype], tok_s["none"])]
        row = {"bench": "adapter-decode", "model": "default int4 (rtn g64, peakllm folder)", "model_folder": str(model),
               "adapter": "random" if args.adapter is None else str(adapter), "adapter_rank": RANK if args.adapter is None
               else info[dtype]["adapter_rank"], "adapter_layers": info[dtype]["adapter_layers"], "adapter_dtype": dtype,
               "threads": args.threads, "rounds": args.rounds, "prompt_tokens": args.prompt_tokens,
               "new_tokens": args.new_tokens, "repeats": args.repeats, "act": os.environ.get("PEAKLLM_INTK_ACT", "int8"),
               "weight_bytes": info["none"]["weight_bytes"], "weight_bytes_with_adapter": info[dtype]["weight_bytes"],
               "tok_s_without": tok_s["none"], "tok_s_with": tok_s[dtype], "ratios": ratios,
               "ratio_median": statistics.median(ratios), "ratio_spread": [min(ratios), max(ratios)],
               "load_rounds": loads}
        line = append(args.out, row, args.threads)
        print(f"adapter {dtype}: {line['ratio_median']:.3f}x the speed without it ({min(ratios):.3f}-{max(ratios):.3f}), "
              f"load {min(loads):.1f}-{max(loads):.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
