"""Long-context quality of int8 activations: teacher-forced decode, one token per step, as generation runs.

    python benchmarks/bench_int8_act_quality.py --model OUT/int4 [--tokens 2048] [--windows 2] [--threads 2]

`peakllm eval` runs windows of more than 32 tokens through torch's GEMM (dequantized weights), so it never
sees the int8-activation kernels at long context. Here each window of --tokens wiki eval tokens (the eval
split, BOS first when the tokenizer has one) is fed token by token through the runtime's decode step (the
whole-step engine when it runs, as `generate` does) once with fp32 and once with int8 activations in every
int-k layer; the next-token log-likelihoods give a perplexity per mode, and the argmax agreement between the
two modes is counted position by position. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from peakllm.data import protocol_bos, tokenize_source
from peakllm.models import load_model
from peakllm.runtime.linear import IntKLinear
from peakllm.runtime.model import RuntimeModel


def run_window(rt, tokens: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(summed negative log-likelihood of tokens[1:], argmax at each position) decoding one token a step."""
    nll, top = 0.0, []
    for pos in range(tokens.numel() - 1):
        logits = rt(tokens[pos:pos + 1].view(1, 1), pos)[0, -1].float()
        nll -= float(torch.log_softmax(logits, -1)[tokens[pos + 1]])
        top.append(int(logits.argmax()))
    return nll, torch.tensor(top)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per window (default: %(default)s)")
    ap.add_argument("--windows", type=int, default=2, help="windows, consecutive in the eval split")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    intk = [m for m in model.modules() if isinstance(m, IntKLinear)]
    if not intk:
        raise SystemExit(f"{args.model} has no int-k layers: int8 activations change nothing")
    stream = tokenize_source(tokenizer, "wiki")
    bos = protocol_bos(tokenizer)
    rt = RuntimeModel.from_hf(model, max_seq=args.tokens)
    rt.setup_cache(1, args.tokens)
    out = {"bench": "int8-act-quality", "model": args.model, "tokens": args.tokens, "windows": args.windows,
           "engine": rt._step is not None, "int_k_layers": len(intk)}
    nll = {"f32": 0.0, "int8": 0.0}
    agree = positions = 0
    first_diff = []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for w in range(args.windows):
            tokens = stream[w * args.tokens:(w + 1) * args.tokens].clone()
            if bos is not None:
                tokens[0] = bos
            tops = {}
            for mode in ("f32", "int8"):
                for m in intk:
                    m.set_int8_act(mode == "int8")
                rt._step = rt._build_step(1)  # the engine's descriptors carry the mode
                n, tops[mode] = run_window(rt, tokens)
                nll[mode] += n
            same = tops["f32"] == tops["int8"]
            agree += int(same.sum())
            positions += same.numel()
            first_diff.append(int((~same).nonzero()[0]) if not bool(same.all()) else None)
    count = args.windows * (args.tokens - 1)
    for mode in nll:
        out[f"ppl_{mode}"] = math.exp(nll[mode] / count)
    out["ppl_ratio_int8_over_f32"] = out["ppl_int8"] / out["ppl_f32"]
    out["argmax_agreement"] = agree / positions
    out["first_argmax_difference"] = first_diff
    out["seconds"] = time.perf_counter() - t0
    out["load_average"] = os.getloadavg()[0]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
