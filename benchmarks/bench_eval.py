"""Dense perplexity of a model at several seqlens and dtypes, and peakllm's eval speed against a plain
transformers loop on the same windows, measured in one process.

  python benchmarks/bench_eval.py [--model default] [--dataset wiki] [--max-tokens 16384] [--repeats 3]

The plain loop is what a user would write first: `model(input_ids, labels=input_ids)` under
`torch.no_grad()` with the model's default settings (KV cache on), one window at a time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from peakllm.data import eval_windows, protocol_bos, tokenize_source
from peakllm.eval import perplexity
from peakllm.models import load_model


def plain_transformers(model, windows) -> tuple[float, float]:
    total, start = 0.0, time.perf_counter()
    with torch.no_grad():
        for w in windows:
            out = model(input_ids=w[None], labels=w[None])
            total += float(out.loss) * (w.numel() - 1)
    seconds = time.perf_counter() - start
    return float(torch.tensor(total / (windows.shape[0] * (windows.shape[1] - 1))).exp()), seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--dataset", default="wiki")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("| dtype | seqlen | tokens | ppl | peakllm tok/s (median) | plain transformers tok/s (median) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        model, tokenizer = load_model(args.model, dtype=dtype)
        tokens = tokenize_source(tokenizer, args.dataset)
        for seqlen in (512, 2048):
            windows = eval_windows(tokens, seqlen, args.max_tokens, bos_id=protocol_bos(tokenizer))
            ours, plain = [], []
            for _ in range(args.repeats):
                r = perplexity(model, windows, progress=False)
                ours.append(r["tokens_per_second"])
                p_ppl, p_sec = plain_transformers(model, windows)
                plain.append(windows.numel() / p_sec)
            assert abs(p_ppl / r["ppl"] - 1) < 1e-3, (p_ppl, r["ppl"])  # same protocol, same number
            o, p = statistics.median(ours), statistics.median(plain)
            print(f"| {str(dtype).split('.')[-1]} | {seqlen} | {r['tokens']} | {r['ppl']:.3f} | {o:.0f} | {p:.0f} | "
                  f"{o / p:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
