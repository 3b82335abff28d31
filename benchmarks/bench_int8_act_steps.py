"""Decode-engine step time of one peakllm folder with fp32 vs int8 activations in its int-k layers,
alternating in one process (the machine is shared: the two modes see the same load).

    python benchmarks/bench_int8_act_steps.py --model OUT/int4-e8 [--rounds 15] [--steps 40] [--threads 2]

Each round rebuilds the engine's step for one mode (IntKLinear.set_int8_act on every int-k layer, the
tied lm_head included), decodes --steps tokens after a 16-token prompt and records ms per step; prints
the median and the minimum over rounds of each mode, their ratio, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from peakllm.models import load_model
from peakllm.runtime.linear import IntKLinear
from peakllm.runtime.model import RuntimeModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    intk = [m for m in model.modules() if isinstance(m, IntKLinear)]
    rt = RuntimeModel.from_hf(model)
    rt.setup_cache(1, 16 + args.steps + 1)
    prompt = torch.randint(1, 1000, (1, 16), generator=torch.Generator().manual_seed(0))
    ms: dict[str, list[float]] = {"f32": [], "int8": []}
    loads = []
    with torch.inference_mode():
        for r in range(args.rounds):
            for mode in ("f32", "int8") if r % 2 == 0 else ("int8", "f32"):
                for m in intk:
                    m.set_int8_act(mode == "int8")
                rt._step = rt._build_step(1)  # the engine's descriptors carry the mode
                logits = rt(prompt, 0)[:, -1]
                tok = logits.argmax(-1, keepdim=True)
                t0 = time.perf_counter()
                for pos in range(16, 16 + args.steps):
                    tok = rt(tok, pos)[:, -1].argmax(-1, keepdim=True)
                ms[mode].append((time.perf_counter() - t0) / args.steps * 1e3)
                loads.append(os.getloadavg()[0])
    row = {"bench": "int8-act-steps", "model": args.model, "threads": args.threads, "steps": args.steps,
           "rounds": args.rounds, "int_k_layers": len(intk), "ms_per_step": ms, "load_average": [min(loads), max(loads)]}
    for mode in ms:
        row[f"{mode}_median_ms"] = statistics.median(ms[mode])
        row[f"{mode}_min_ms"] = min(ms[mode])
        print(f"{mode}: median {row[f'{mode}_median_ms']:.2f} ms/step ({1e3 / row[f'{mode}_median_ms']:.1f} tok/s), "
              f"min {row[f'{mode}_min_ms']:.2f} ms ({1e3 / row[f'{mode}_min_ms']:.1f} tok/s)")
    print(f"int8 / f32 speed: median {row['f32_median_ms'] / row['int8_median_ms']:.2f}x, "
          f"min {row['f32_min_ms'] / row['int8_min_ms']:.2f}x; load average {min(loads):.2f}-{max(loads):.2f}")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
