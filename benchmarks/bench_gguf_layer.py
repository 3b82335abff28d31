"""Layer-wise error on llama.cpp's block grids: llama.cpp's reference quantizer against our fit, imatrix-style
weighting and GPTQ, on real layers of a model.

    python benchmarks/bench_gguf_layer.py [--model default] [--layers 0,15,29] [--types Q4_0,Q4_K,...]
                                          [--calib-samples 32] [--calib-seqlen 512] [--threads 2]

For every linear of the chosen decoder layers, H = X^T X / n from the dense model's inputs to it on the
calibration segments; every solution is scored by the layer-wise objective tr((W - Q) H (W - Q)^T), reported
relative to tr(W H W^T) and summed over the matrices a type applies to (K-quants only where rows are a
multiple of 256). Rows: "ref" is gguf-py's quantizer, bit-exact with llama.cpp's reference (non-imatrix)
quantize_row_*_ref (legacy types only: gguf-py has no K-quant quantizer); "rtn" our fit of the type's
parameters without importance; "rtn_imatrix" the fit weighted by diag(H), as llama.cpp's imatrix weighs it
(ours, not llama.cpp's code); "gptq" GPTQ on that grid. One JSON line per type.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time

import gguf
import numpy as np
import torch

from peakllm.data import calibration_segments
from peakllm.formats.gguf.blocks import BLOCK_TYPES
from peakllm.models import load_model
from peakllm.solvers.ggml import gptq_ggml, rtn_ggml

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def hessians(model, segments: torch.Tensor, layers: list[int]) -> dict[str, torch.Tensor]:
    """H = X^T X / n of the inputs to every linear of ``layers``, over all calibration tokens."""
    acc, count, hooks = {}, {}, []
    for li in layers:
        for name in LINEARS:
            full = f"model.layers.{li}.{name}"
            module = model.get_submodule(full)

            def hook(mod, inputs, output, full=full):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                acc[full] = acc.get(full, 0) + x.T @ x
                count[full] = count.get(full, 0) + x.shape[0]

            hooks.append(module.register_forward_hook(hook))
    with torch.no_grad():
        for row in segments:
            model(input_ids=row.unsqueeze(0))
    for h in hooks:
        h.remove()
    return {k: (acc[k] / count[k]).float() for k in acc}


def layer_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    E = (W - Q).double()
    return float(torch.einsum("ij,jk,ik->", E, H.double(), E))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", default="0,15,29")
    ap.add_argument("--types", default=",".join(BLOCK_TYPES))
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    model.eval()
    layers = [int(x) for x in args.layers.split(",")]
    t0 = time.perf_counter()
    segments = calibration_segments(tokenizer, args.calib_samples, args.calib_seqlen)
    Hs = hessians(model, segments, layers)
    params = dict(model.named_parameters())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    for name in args.types.split(","):
        t = BLOCK_TYPES[name]
        total = {"ref": 0.0, "rtn": 0.0, "rtn_imatrix": 0.0, "gptq": 0.0}
        base = 0.0
        matrices = 0
        t1 = time.perf_counter()
        for full, H in Hs.items():
            W = params[f"{full}.weight"].detach().float()
            if W.shape[1] % t.block:
                continue
            matrices += 1
            base += layer_error(W, torch.zeros_like(W), H)
            if name in ("Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"):
                ref = gguf.quants.dequantize(gguf.quants.quantize(W.numpy(), t.ggml), t.ggml)
                total["ref"] += layer_error(W, torch.from_numpy(np.ascontiguousarray(ref)), H)
            else:
                total["ref"] = None
            total["rtn"] += layer_error(W, rtn_ggml(W, name).dequantize(), H)
            total["rtn_imatrix"] += layer_error(W, rtn_ggml(W, name, torch.diagonal(H)).dequantize(), H)
            total["gptq"] += layer_error(W, gptq_ggml(W, H, name)[0].dequantize(), H)
        if not matrices:
            continue
        out = {"bench": "gguf-layer-error", "model": args.model, "type": name, "layers": layers,
               "matrices": matrices, "calib_tokens": args.calib_samples * args.calib_seqlen,
               "relative_error": {k: (None if v is None else v / base) for k, v in total.items()},
               "seconds": round(time.perf_counter() - t1, 1), "commit": commit, "machine": os.uname().nodename,
               "load_average": os.getloadavg()[0],
               "command": "python benchmarks/bench_gguf_layer.py " + " ".join(
                   f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items())}
        print(json.dumps(out), flush=True)
    print(json.dumps({"bench": "gguf-layer-error", "total_seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
