"""Speculative decoding against plain decoding, greedy, in one process (issue 29, item 3).

  python benchmarks/bench_speculate.py [--model default] [--draft NAME=DIR ...] [--k 4 --k 8] [--rounds 3]
      [--threads 2] [--new-tokens 128] [--out docs/results/speculate.jsonl]

For each text (a wiki article's continuation; Python source, code being repetitive) and each drafter (prompt
lookup, and every --draft folder), each round decodes the same prompt plainly and speculatively, the order
swapped every round; both must give the same tokens (the run stops otherwise). One results line per (text,
drafter, k): decode tok/s of each side per round (the tokens after the first over the time after the prompt's
forward, which both sides share), the median of per-round ratios and its spread, the same ratio end to end
(prompt included), the acceptance rate (drafts kept / drafts proposed), tokens per verification pass, load
average and CPU (results_line.py).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_line import append  # noqa: E402

from peakllm.data import wiki_split  # noqa: E402
from peakllm.models import load_model  # noqa: E402
from peakllm.runtime.generate import check_draft, generate  # noqa: E402
from peakllm.runtime.model import RuntimeModel  # noqa: E402


def texts(tokenizer, prompt_tokens: int) -> dict[str, torch.Tensor]:
    """Prompt ids: the opening of a held-out wiki article, and of a Python file of the standard library."""
    import json.encoder

    wiki = max(wiki_split("eval")[:8], key=len)
    code = Path(json.encoder.__file__).read_text()
    out = {}
    for name, text in (("wiki", wiki), ("code", code)):
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0, :prompt_tokens]
        out[name] = ids
    return out


def timed(model, tokenizer, prompt, n, **kw):
    """(ids, decode tok/s: the tokens after the first over the time after the prompt's forward, end-to-end
    tok/s: every new token over the whole call, timings)."""
    timings: dict = {}
    t0 = time.perf_counter()
    out = generate(model, tokenizer, prompt, n, stop_at_eos=False, timings=timings, **kw)
    total = time.perf_counter() - t0
    return out, (out.shape[1] - 1) / timings["decode_s"], out.shape[1] / total, timings


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--draft", action="append", default=[], metavar="NAME=DIR")
    ap.add_argument("--k", type=int, action="append", default=None)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--texts", default="wiki,code")
    ap.add_argument("--no-prompt-lookup", action="store_true", help="only the --draft folders")
    ap.add_argument("--draft-threads", type=int, default=None,
                    help="the draft model's engine threads (default: --threads, as the target)")
    ap.add_argument("--out", default="docs/results/speculate.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = args.k or [4]
    hf, tokenizer = load_model(args.model)
    max_seq = args.prompt_tokens + args.new_tokens
    target = RuntimeModel.from_hf(hf, max_seq=max_seq)
    drafters: dict[str, RuntimeModel | None] = {} if args.no_prompt_lookup else {"prompt-lookup": None}
    for spec in args.draft:
        name, _, folder = spec.partition("=")
        dm = load_model(folder)[0]
        check_draft(hf, dm)
        drafters[name] = RuntimeModel.from_hf(dm, max_seq=max_seq)
    prompts = {k: v for k, v in texts(tokenizer, args.prompt_tokens).items() if k in args.texts.split(",")}
    for text_name, prompt in prompts.items():
        for drafter, draft in drafters.items():
            for k in ks:
                plain_tps, spec_tps, ratios, acc, e2e = [], [], [], [], []
                for r in range(args.rounds):
                    sides = ("plain", "spec") if r % 2 == 0 else ("spec", "plain")
                    res = {}
                    for side in sides:
                        kw = {} if side == "plain" else {"speculate": k, "draft": draft,
                                                          "draft_threads": args.draft_threads}
                        res[side] = timed(target, tokenizer, prompt, args.new_tokens, **kw)
                    if not torch.equal(res["plain"][0], res["spec"][0]):
                        raise SystemExit(f"{text_name} / {drafter} / k={k}: speculative output differs from plain")
                    plain_tps.append(res["plain"][1])
                    spec_tps.append(res["spec"][1])
                    ratios.append(res["spec"][1] / res["plain"][1])
                    e2e.append(res["spec"][2] / res["plain"][2])
                    acc.append(res["spec"][3])
                t = acc[-1]
                row = {"bench": "speculate", "model": args.model, "text": text_name, "drafter": drafter,
                       "draft_folder": dict(s.partition("=")[::2] for s in args.draft).get(drafter), "k": k,
                       "draft_threads": None if draft is None else (args.draft_threads or args.threads),
                       "threads": args.threads, "rounds": args.rounds, "prompt_tokens": int(prompt.numel()),
                       "new_tokens": args.new_tokens, "plain_tok_s": plain_tps, "spec_tok_s": spec_tps,
                       "ratios": ratios, "ratio_median": statistics.median(ratios),
                       "ratio_spread": [min(ratios), max(ratios)], "end_to_end_ratios": e2e,
                       "end_to_end_ratio_median": statistics.median(e2e),
                       "acceptance_rate": t["accepted"] / t["drafted"] if t["drafted"] else 0.0,
                       "drafted": t["drafted"], "accepted": t["accepted"], "verify_steps": t["steps"],
                       "tokens_per_step": (args.new_tokens - 1) / t["steps"], "output_identical": True,
                       "load_average": list(os.getloadavg())}
                line = append(args.out, row, args.threads)
                print(f"{text_name:5s} {drafter:14s} k={k}: plain {statistics.median(plain_tps):6.1f} tok/s, "
                      f"spec {statistics.median(spec_tps):6.1f} tok/s, ratio {line['ratio_median']:.2f} "
                      f"({min(ratios):.2f}-{max(ratios):.2f}), acceptance {line['acceptance_rate']:.2f}, "
                      f"{line['tokens_per_step']:.2f} tokens/pass, load {os.getloadavg()[0]:.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
