"""Does the cheap per-type loss that --target-bits allocates by rank GGUF types as GPTQ's real loss does?

    python benchmarks/bench_gguf_allocation.py [--model default] [--layers 0,15,29] [--rows 128]
                                               [--calib-samples 32] [--calib-seqlen 512] [--threads 1]

For every linear of the chosen decoder layers (H = X^T X / n of the dense model's inputs, bench_gguf_layer's
hessians), the layer-wise loss tr((W - Q) H (W - Q)^T) at every block type the width takes, three ways: "rtn",
the proxy quantize --format gguf --target-bits measures (round to nearest on the imatrix-weighted grid fit, on
--rows evenly spaced rows scaled to all rows); "gptq_rows", GPTQ on the same rows; "gptq", GPTQ on the whole
matrix (the truth). Printed: Spearman's rank correlation of each estimate with "gptq" over all (matrix, type)
pairs and the share of type pairs within a matrix ordered alike; then, at a few budgets over these matrices,
the allocation chosen from each estimate (solvers/allocate.allocate) scored by its GPTQ loss, against the
allocation chosen from GPTQ's own losses. One JSON line; --results appends it to a results file.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch

from bench_gguf_layer import hessians
from results_line import append

from peakllm.calibrate.gguf_plan import tensor_bytes
from peakllm.data import calibration_segments
from peakllm.formats.gguf.blocks import BLOCK_TYPES
from peakllm.models import load_model
from peakllm.solvers.allocate import allocate, type_losses


def ranks(x: list[float]) -> list[float]:
    order = sorted(range(len(x)), key=lambda i: x[i])
    r = [0.0] * len(x)
    for rank, i in enumerate(order):
        r[i] = float(rank)
    return r


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = torch.tensor(ranks(a)), torch.tensor(ranks(b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", default="0,15,29")
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default=None, help="append the JSON line to this file")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    layers = [int(x) for x in args.layers.split(",")]
    Hs = hessians(model, calibration_segments(tokenizer, args.calib_samples, args.calib_seqlen), layers)
    params = dict(model.named_parameters())
    losses = {"rtn": {}, "gptq_rows": {}, "gptq": {}}
    shapes = {}
    for full, H in Hs.items():
        W = params[f"{full}.weight"].detach().float()
        types = [t for t in BLOCK_TYPES if W.shape[1] % BLOCK_TYPES[t].block == 0]
        shapes[full] = tuple(W.shape)
        losses["rtn"][full] = type_losses(W, H, types, max_rows=args.rows)
        losses["gptq_rows"][full] = type_losses(W, H, types, max_rows=args.rows, solver="gptq")
        losses["gptq"][full] = type_losses(W, H, types, solver="gptq")
        print(full, {t: (round(losses["rtn"][full][t], 4), round(losses["gptq"][full][t], 4)) for t in types},
              flush=True)
    truth = losses["gptq"]
    out = {"bench": "gguf-allocation-proxy", "model": args.model, "layers": layers, "rows": args.rows,
           "matrices": len(Hs), "calib_tokens": args.calib_samples * args.calib_seqlen}
    pairs = [(m, t) for m in truth for t in truth[m]]
    for est in ("rtn", "gptq_rows"):
        e = losses[est]
        out[f"spearman_{est}"] = spearman([e[m][t] for m, t in pairs], [truth[m][t] for m, t in pairs])
        same = total = 0
        for m in truth:
            for a, b in itertools.combinations(truth[m], 2):
                total += 1
                same += (e[m][a] < e[m][b]) == (truth[m][a] < truth[m][b])
        out[f"type_order_agreement_{est}"] = same / total
    params_total = sum(r * c for r, c in shapes.values())
    out["allocations"] = []
    for bits in (4.5, 5.0, 5.5, 6.5):
        budget = int(bits * params_total / 8)
        row = {"bits_per_param": bits}
        for est in ("gptq", "rtn", "gptq_rows"):
            options = {m: [(t, tensor_bytes(t, shapes[m]), losses[est][m][t]) for t in truth[m]] for m in truth}
            pick = allocate(options, budget)
            row[f"gptq_loss_{est}_choice"] = sum(truth[m][t] for m, t in pick.items())
        out["allocations"].append(row)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out), flush=True)
    if args.results:
        append(args.results, out, threads=args.threads)


if __name__ == "__main__":
    main()
