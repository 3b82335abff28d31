"""MoEfication of the default model: wiki perplexity of dense vs MoE for several (experts E, top-k k).

    python benchmarks/bench_moefy.py [--configs 8:2,8:4,8:6,16:4,16:8] [--eval-tokens 8192]
                                     [--calib-samples 32 --calib-seqlen 256] [--threads N]

One calibration pass of the dense model serves every config: the experts and the router depend on E only
(the router predicts each expert's share of the output, not a top-k set), so each E is built once and
each k is a `set_top_k` on it. A single `peakllm moefy` run costs calibration + one build.
kept share = mean share of the dense MLP output norm held by the k routed experts on calibration tokens;
"oracle" picks the k experts with the largest true shares (the best any router could do for this split).
Perplexity: wiki split, seqlen 512, the first --eval-tokens tokens. Prints a Markdown table.

    python benchmarks/bench_moefy.py --ablation 3,15,27 [--calib-samples 12]

compares neuron groupings for E=8 on a few layers instead, on held-out calibration tokens (router fitted on
the first 2/3 of them, scored on the rest): random split, |h| patterns (peakllm's), signed h patterns, and
MoEfication's parameter clustering (rows of W_gate); kept share and the relative error of the routed MLP
output |y - y_k| / |y| at k = 2 and 4.
The default model's weights are Q4_1 already (see docs); the CPU is shared, so seconds move with load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

from peakllm.data import calibration_segments  # noqa: E402
from peakllm.eval import evaluate  # noqa: E402
from peakllm.models import load_model  # noqa: E402
from peakllm.models.moe import active_params_fraction, set_top_k  # noqa: E402
from peakllm.models.moefy import (  # noqa: E402
    balanced_kmeans,
    build_moe,
    collect_activations,
    expert_groups,
    expert_shares,
    fit_router_lstsq,
    kept_share_curve,
)


def parse_configs(text: str) -> dict[int, list[int]]:
    by_experts: dict[int, list[int]] = {}
    for item in text.split(","):
        E, k = (int(v) for v in item.split(":"))
        by_experts.setdefault(E, []).append(k)
    return by_experts


def ablation(model, X, A, layers: list[int], E: int = 8) -> None:
    print("\n| layer | grouping | kept k=2 (router / oracle) | kept k=4 (router / oracle) | rel. error k=2 | k=4 |")
    print("|---:|---|---|---|---:|---:|")
    for l in layers:
        mlp = model.model.layers[l].mlp
        W_down, h, x = mlp.down_proj.weight, A[l].float(), X[l]
        T = h.shape[0]
        fit, test = slice(0, 2 * T // 3), slice(2 * T // 3, T)
        y = h[test] @ W_down.T
        n = h.shape[1]
        groupings = {
            "random": torch.randperm(n, generator=torch.Generator().manual_seed(0)) % E,
            "abs h": balanced_kmeans(h[fit].abs().T, E, seed=l),
            "signed h": balanced_kmeans(h[fit].T, E, seed=l),
            "W_gate rows": balanced_kmeans(mlp.gate_proj.weight, E, seed=l),
        }
        for name, labels in groupings.items():
            groups = expert_groups(labels, E)
            S = expert_shares(h, W_down, groups)
            W, b = fit_router_lstsq(x[fit], S[fit])
            scores = x[test] @ W.T + b
            router, oracle = kept_share_curve(S[test], scores), kept_share_curve(S[test], S[test])
            errors = []
            for k in (2, 4):
                chosen = scores.topk(k, dim=1).indices
                y_k = sum((chosen == e).any(1, keepdim=True) * (h[test][:, g] @ W_down[:, g].T) for e, g in enumerate(groups))
                errors.append(((y - y_k).norm(dim=1) / y.norm(dim=1)).mean().item())
            print(f"| {l} | {name} | {router[1]:.3f} / {oracle[1]:.3f} | {router[3]:.3f} / {oracle[3]:.3f} | "
                  f"{errors[0]:.3f} | {errors[1]:.3f} |", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="8:2,8:4,8:6,16:4,16:8", help="E:k pairs (default: %(default)s)")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--router-hidden", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ablation", default="", help="comma-separated layers: compare groupings there and stop")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model("default")
    if args.ablation:
        segments = calibration_segments(tokenizer, args.calib_samples, args.calib_seqlen)
        X, A = collect_activations(model, segments, max_tokens=4096, progress=False)
        ablation(model, X, A, [int(v) for v in args.ablation.split(",")])
        return
    ppl = lambda m: evaluate(m, tokenizer, "wiki", seqlen=512, max_tokens=args.eval_tokens, progress=False)["ppl"]  # noqa: E731
    dense_ppl = ppl(model)
    print(f"dense wiki ppl {dense_ppl:.3f} ({args.eval_tokens} tokens, seqlen 512)", flush=True)

    start = time.perf_counter()
    segments = calibration_segments(tokenizer, args.calib_samples, args.calib_seqlen)
    X, A = collect_activations(model, segments, max_tokens=4096, progress=False)
    calib_seconds = time.perf_counter() - start
    print(f"calibration: {segments.numel()} tokens, {calib_seconds:.0f} s", flush=True)

    rows = []
    for E, ks in parse_configs(args.configs).items():
        start = time.perf_counter()
        moe = build_moe(model, X, A, experts=E, top_k=ks[0], router_hidden=args.router_hidden, progress=False)
        build_seconds = time.perf_counter() - start
        by_k = moe.moefy_stats["kept_share_by_k"]
        oracle = moe.moefy_stats["oracle_share_by_k"]
        for k in ks:
            set_top_k(moe, k)
            row = dict(E=E, k=k, active=active_params_fraction(moe),
                       kept=sum(c[k - 1] for c in by_k) / len(by_k), oracle=sum(c[k - 1] for c in oracle) / len(oracle),
                       ppl=ppl(moe), build=build_seconds)
            rows.append(row)
            print(row, flush=True)
        del moe

    print(f"\n| E | k | active params | kept share (router / oracle) | wiki ppl | ppl / dense | convert s |")
    print("|---:|---:|---:|---|---:|---:|---:|")
    print(f"| dense | - | 1.000 | 1.000 | {dense_ppl:.2f} | 1.00 | - |")
    for r in rows:
        print(f"| {r['E']} | {r['k']} | {r['active']:.3f} | {r['kept']:.3f} / {r['oracle']:.3f} | {r['ppl']:.2f} | "
              f"{r['ppl'] / dense_ppl:.2f} | {calib_seconds + r['build']:.0f} |")
    print(f"\nconvert s = calibration ({calib_seconds:.0f} s, shared) + build for that E; "
          f"{torch.get_num_threads()} torch threads on a shared machine.")


if __name__ == "__main__":
    main()
