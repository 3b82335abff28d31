"""Packed-weight kernels vs torch dense F.linear, in one process: median time per call, GB/s of weight
bytes read, for decode (batch 1), small batches (8) and prefill (rows > PREFILL_ROWS, bf16).

    python benchmarks/bench_kernels.py [--shapes 576x576,1536x576] [--prefill-rows 256] [--seconds 0.3]
        [--group-size 128] [--intk-only]

Shapes are out x in. Packed layers are filled with random bytes (random codes, positions, masks):
speed does not depend on the values. GB/s counts every packed byte a call reads (codes, scales,
zeros, indices, mask) once; above the machine's read bandwidth means the weights sat in cache.
Each int-k layer also runs with int8 activations ("int8-act" rows, IntKLinear.set_int8_act) where that
path applies. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from peakllm.kernels import ops
from peakllm.runtime.linear import PREFILL_ROWS, BitmaskLinear, IntKLinear, NMLinear

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]


def median_seconds(fn, budget: float) -> float:
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget and len(times) < 2000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_bytes(*shape) -> torch.Tensor:
    return torch.randint(0, 256, shape, dtype=torch.uint8)


def quant_params(out, inn, group_size):
    n_groups = -(-inn // group_size)
    return dict(scales=(torch.rand(out, n_groups) * 0.01).half(), zeros=torch.randint(0, 8, (out, n_groups),
                                                                                           dtype=torch.uint8))


def packed_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in layer.state_dict().values())


def make_layers(out: int, inn: int, group_size: int = 128, intk_only: bool = False) -> dict:
    """name -> (module or callable taking x, bytes of weight data read per call)."""
    layers = {}
    W = torch.randn(out, inn) * 0.02
    Wb = W.bfloat16()
    layers["dense bf16 (torch)"] = (lambda x, W=Wb: F.linear(x.bfloat16(), W), W.numel() * 2)
    layers["dense fp32 (torch)"] = (lambda x, W=W: F.linear(x.float(), W), W.numel() * 4)
    for bits in (8, 4, 3, 2):
        qp = quant_params(out, inn, group_size)
        layer = IntKLinear(inn, out, bits, group_size, random_bytes(out, -(-inn * bits // 8)), **qp)
        layer.set_int8_act(False)
        layers[f"int{bits} g{group_size}"] = (layer, packed_bytes(layer))
        if ops.int8_act_applies(bits, layer.group_starts):
            a8 = IntKLinear(inn, out, bits, group_size, layer.qweight, **qp)
            a8.set_int8_act(True)
            layers[f"int{bits} g{group_size} int8-act"] = (a8, packed_bytes(a8))
    if intk_only:
        return layers
    # 2:4 with random positions: 4 positions a byte
    per_row = inn // 2
    indices = random_bytes(out, per_row // 4)
    nm = NMLinear(inn, out, 2, 4, indices, values=torch.randn(out, per_row).bfloat16())
    layers["2:4 bf16"] = (nm, per_row * out * 2 + indices.numel())
    qp = quant_params(out, inn, group_size)
    nm4 = NMLinear(inn, out, 2, 4, indices, qweight=random_bytes(out, per_row // 2), bits=4, group_size=group_size,
                   **qp)
    layers[f"2:4 + int4 g{group_size}"] = (nm4, packed_bytes(nm4))
    mask = torch.randint(0, 256, (out, -(-inn // 8)), dtype=torch.uint8)  # ~50% kept
    counts = torch.tensor([bin(v).count("1") for v in range(256)])[mask.long()].sum(1)
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
    bm = BitmaskLinear(inn, out, mask, row_offsets, values=torch.randn(int(row_offsets[-1])).bfloat16())
    layers["bitmask 50% bf16"] = (bm, packed_bytes(bm))
    code_bytes = int(((counts * 4 + 7) // 8).sum())
    bm4 = BitmaskLinear(inn, out, mask, row_offsets, qweight=random_bytes(code_bytes), bits=4, group_size=group_size,
                        **quant_params(out, inn, group_size))
    layers[f"bitmask 50% + int4 g{group_size}"] = (bm4, packed_bytes(bm4))
    return layers


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    ap.add_argument("--prefill-rows", type=int, default=256, help="rows of x for the prefill column (0: skip)")
    ap.add_argument("--seconds", type=float, default=0.3, help="time budget per measurement")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--group-size", type=int, default=128, help="int-k group size (default: %(default)s)")
    ap.add_argument("--intk-only", action="store_true", help="only the dense baselines and the int-k layers")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"threads={args.threads}, PREFILL_ROWS={PREFILL_ROWS}, median of calls within {args.seconds}s each, "
          f"int-k group size {args.group_size}\n")
    prefill = args.prefill_rows > PREFILL_ROWS
    head = "| shape (out x in) | weights | MB read | batch 1 us | GB/s | vs bf16 | batch 8 us | GB/s |"
    head += f" prefill {args.prefill_rows} bf16 ms | vs bf16 |" if prefill else ""
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for shape in args.shapes.split(","):
        out, inn = (int(v) for v in shape.lower().split("x"))
        layers = make_layers(out, inn, args.group_size, args.intk_only)
        xs = {b: torch.randn(b, inn) for b in (1, 8)}
        xp = torch.randn(args.prefill_rows, inn).bfloat16()
        base = {}
        for name, (layer, nbytes) in layers.items():
            with torch.inference_mode():
                t1 = median_seconds(lambda: layer(xs[1]), args.seconds)
                t8 = median_seconds(lambda: layer(xs[8]), args.seconds)
                tp = median_seconds(lambda: layer(xp), args.seconds) if prefill else 0.0
            if name.startswith("dense bf16"):
                base = {"t1": t1, "tp": tp}
            row = (f"| {out}x{inn} | {name} | {nbytes / 1e6:.2f} | {t1 * 1e6:.0f} | {nbytes / t1 / 1e9:.1f} | "
                   f"{base.get('t1', t1) / t1:.2f}x | {t8 * 1e6:.0f} | {nbytes / t8 / 1e9:.1f} |")
            if prefill:
                row += f" {tp * 1e3:.2f} | {base.get('tp', tp) / tp:.2f}x |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
