"""Sparse weights at run time: the batch-1 matvec against the bandwidth roofline, and whole models (file size,
decode tok/s) against the dense bf16 model, as peakllm runs both.

    python benchmarks/bench_sparse.py kernels [--shapes 576x576,1536x576,576x1536,2048x8192] [--rounds 3]
    python benchmarks/bench_sparse.py models [--dense default] --sparse name=DIR[,name=DIR] [--rounds 3]
    python benchmarks/bench_sparse.py steps [--dense default] --sparse name=DIR[,...] [--threads 1] [--rounds 5]
    python benchmarks/bench_sparse.py record --result name=OUT.json:"peakllm prune ..." --output FILE.jsonl

kernels: for each shape, layers of each layout (dense bf16 as the decode engine runs it, bitmask 50% and 2:4
with bf16 values, bitmask 50% with fp32 values: the old default) filled with random values and masks (speed
does not depend on them), as many copies as fill WORKING_SET bytes so that a sweep reads memory, not the cache.
The copies run through the decode engine's per-linear path (kernels/decode.cpp `lin_sweep_f32`: one
parallel region, a barrier after each linear, as in a decode step). Each round times every layout once, the
order reversed every other round, and probes the read bandwidth in the same round; the roofline fraction is
bytes read per call / seconds per call / that bandwidth. One results line per shape and layout.

models: `peakllm bench` of each folder in alternating rounds (order swapped each round), the dense folder
(run in bf16: `--dtype bfloat16`) against each sparse folder; per-round ratios of decode tok/s, their median
and spread, the ratio of the medians, file sizes and the loads. On an AVX2-only machine torch's bf16 is slow,
so the dense baseline is peakllm's own dense bf16 path (its compiled kernel and decode engine), not torch's.

steps: the same decode engine in one process, every model once a round (order swapped each round), timed by
wall clock and by CPU time; on a machine whose other tenants keep both cores busy, a 2-thread step mostly
waits for a descheduled thread at a barrier, and a 1-thread step's CPU time still measures its work.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from peakllm.kernels import decode  # noqa: E402
from peakllm.kernels.dense import read_bandwidth_gb_s  # noqa: E402
from peakllm.runtime.linear import BitmaskLinear, DenseLinear, NMLinear  # noqa: E402

from results_line import append as append_result  # noqa: E402 - benchmarks/results_line.py

SHAPES = [(576, 576), (1536, 576), (576, 1536), (2048, 8192)]
WORKING_SET = 256 << 20  # 8x a 32 MiB last-level cache
POPCOUNT = torch.tensor([bin(v).count("1") for v in range(256)])


def _bitmask(out: int, inn: int, dtype) -> BitmaskLinear:
    mask = torch.randint(0, 256, (out, -(-inn // 8)), dtype=torch.uint8)  # each column kept with p = 1/2
    if inn % 8:
        mask[:, -1] &= (1 << (inn % 8)) - 1
    row_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), POPCOUNT[mask.long()].sum(1).cumsum(0)])
    return BitmaskLinear(inn, out, mask, row_offsets, values=torch.randn(int(row_offsets[-1])).to(dtype))


def _nm24(out: int, inn: int, dtype) -> NMLinear:
    # ascending position pairs of a group of 4: (0,1) (0,2) (0,3) (1,2) (1,3) (2,3), two groups a byte
    pairs = torch.tensor([a | b << 2 for a in range(4) for b in range(a + 1, 4)], dtype=torch.uint8)
    groups = pairs[torch.randint(0, 6, (out, inn // 8, 2))]
    indices = (groups[..., 0] | groups[..., 1] << 4).contiguous()
    return NMLinear(inn, out, 2, 4, indices, values=torch.randn(out, inn // 2).to(dtype))


LAYOUTS = {
    "dense bf16": lambda o, i: DenseLinear((torch.randn(o, i) * 0.02).bfloat16()),
    "bitmask 50% bf16": lambda o, i: _bitmask(o, i, torch.bfloat16),
    "2:4 bf16": lambda o, i: _nm24(o, i, torch.bfloat16),
    "bitmask 50% fp32 (old)": lambda o, i: _bitmask(o, i, torch.float32),
}


def _nbytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in layer.buffers() if t is not None)


def _sweeper(name: str, out: int, inn: int):
    """(seconds per matvec of a pass over WORKING_SET bytes of copies, bytes a matvec reads)."""
    first = LAYOUTS[name](out, inn)
    copies = max(1, math.ceil(WORKING_SET / _nbytes(first)))
    layers = [first] + [LAYOUTS[name](out, inn) for _ in range(copies - 1)]
    keep: list = []
    lins = [layer.decode_lin(keep) for layer in layers]
    x = torch.randn(inn)

    def run(reps: int) -> float:
        t0 = time.perf_counter()
        decode.lin_sweep(lins, x, reps, torch.get_num_threads())
        return (time.perf_counter() - t0) / (reps * len(lins))

    run(1)  # warm-up: page faults, thread start
    return run, _nbytes(first), (layers, keep)


def kernels(args) -> None:
    threads = torch.get_num_threads()
    shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    for out, inn in shapes:
        sweeps = {name: _sweeper(name, out, inn) for name in LAYOUTS}
        times: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        bw, loads = [], []
        for r in range(args.rounds):
            order = list(LAYOUTS) if r % 2 == 0 else list(reversed(LAYOUTS))
            for name in order:
                times[name].append(sweeps[name][0](args.reps))
            bw.append(read_bandwidth_gb_s(WORKING_SET, repeats=3))
            loads.append(os.getloadavg()[0])
        bandwidth = statistics.median(bw)
        dense_t = statistics.median(times["dense bf16"])
        for name in LAYOUTS:
            t, nbytes = statistics.median(times[name]), sweeps[name][1]
            row = {"bench": "sparse-kernel", "shape": f"{out}x{inn}", "layout": name, "bytes": nbytes,
                   "bits_per_param": 8 * nbytes / (out * inn), "us_per_matvec": t * 1e6,
                   "us_rounds": [round(v * 1e6, 2) for v in times[name]], "gb_s": nbytes / t / 1e9,
                   "bandwidth_gb_s": bandwidth, "bandwidth_rounds": [round(v, 2) for v in bw],
                   "roofline_fraction": nbytes / t / 1e9 / bandwidth, "speedup_vs_dense_bf16": dense_t / t,
                   "working_set_bytes": WORKING_SET, "rounds": args.rounds, "load_rounds": loads}
            print(f"{out}x{inn:<6} {name:<24} {row['bits_per_param']:6.2f} b/p {row['us_per_matvec']:9.1f} us "
                  f"{row['gb_s']:6.1f} GB/s  roofline {row['roofline_fraction']:.2f}  x{row['speedup_vs_dense_bf16']:.2f}"
                  f" vs dense bf16  (bw {bandwidth:.1f} GB/s)", flush=True)
            if args.output:
                append_result(args.output, row, threads)
        del sweeps


def _bench_once(model: str, dtype: str, args) -> dict:
    cmd = [sys.executable, "-m", "peakllm", "bench", "--model", model, "--dtype", dtype, "--json",
           "--threads", str(args.threads), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens",
           str(args.new_tokens), "--repeats", str(args.repeats)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def _folder_bytes(path: str) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def _bf16_bytes(spec: str) -> int:
    """Bytes of the model's weight file stored in bf16: 2 bytes for every element of every stored tensor."""
    from safetensors import safe_open

    from peakllm.models import resolve

    _kind, path = resolve(spec)
    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            total += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    return 2 * total


def models(args) -> None:
    sides = {"dense": (args.dense, "bfloat16")}
    for item in args.sparse.split(","):
        name, _, folder = item.partition("=")
        sides[name] = (folder, "float32")
    for name, (folder, _dtype) in sides.items():
        if name != "dense" and not Path(folder).is_dir():
            raise SystemExit(f"{name}: {folder} is not a folder")
    runs: dict[str, list[dict]] = {name: [] for name in sides}
    loads = []
    for r in range(args.rounds):
        order = list(sides) if r % 2 == 0 else list(reversed(sides))
        for name in order:
            loads.append(os.getloadavg()[0])
            runs[name].append(_bench_once(*sides[name], args))
            print(f"round {r} {name}: {runs[name][-1]['decode_tok_s']:.1f} tok/s", flush=True)
    dense_size = _bf16_bytes(args.dense)
    for name in sides:
        if name == "dense":
            continue
        tok = [x["decode_tok_s"] for x in runs[name]]
        base = [x["decode_tok_s"] for x in runs["dense"]]
        ratios = [a / b for a, b in zip(tok, base)]
        size = _folder_bytes(sides[name][0])
        row = {"bench": "sparse-model", "model": name, "folder": sides[name][0], "dense_folder": args.dense,
               "baseline": "peakllm bench --dtype bfloat16 on the dense folder (peakllm's dense bf16 kernel)",
               "weight_file_bytes": size, "dense_bf16_weight_file_bytes": dense_size, "size_ratio": size / dense_size,
               "decode_tok_s_rounds": tok, "dense_decode_tok_s_rounds": base, "ratio_rounds": ratios,
               "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
               "ratio_of_medians": statistics.median(tok) / statistics.median(base),
               "roofline_fraction_rounds": [x.get("roofline_fraction") for x in runs[name]],
               "dense_roofline_fraction_rounds": [x.get("roofline_fraction") for x in runs["dense"]],
               "rounds": args.rounds, "threads": args.threads, "load_rounds": loads}
        print(f"{name}: size {size / 1e6:.1f} MB = {row['size_ratio']:.3f}x dense bf16 ({dense_size / 1e6:.1f} MB); "
              f"decode x{row['ratio_median']:.2f} (per-round {', '.join(f'{v:.2f}' for v in ratios)}; "
              f"ratio of medians {row['ratio_of_medians']:.2f})", flush=True)
        if args.output:
            append_result(args.output, row, args.threads)


def _stepper(spec: str, dtype: torch.dtype, context: int):
    """A RuntimeModel of `spec` in `dtype` with its decode engine built; a function timing n decode steps."""
    from peakllm.models import load_model
    from peakllm.runtime.model import RuntimeModel

    hf, _tok = load_model(spec)
    model = RuntimeModel.from_hf(hf, dtype=dtype)
    del hf
    model.setup_cache(1, context)
    if model._step is None:
        raise SystemExit(f"{spec}: the decode engine was not built (a layer took the op-by-op path)")
    prompt = torch.tensor([[1, 2, 3, 4]])

    def run(n: int) -> tuple[float, float]:
        model.forward(prompt, 0)
        tok = torch.tensor([[5]])
        w0, c0 = time.perf_counter(), time.process_time()
        for pos in range(4, 4 + n):
            model.forward(tok, pos, last_only=True)
        return (time.perf_counter() - w0) / n, (time.process_time() - c0) / n

    run(4)  # warm-up
    return run


def steps(args) -> None:
    """Decode steps in one process (the engine `peakllm bench` and `generate` use), every model once a round in
    alternating order, timed by wall clock and by this process's CPU time: with one thread the CPU time is the
    work of a step whatever the machine's other tenants do (with more, spin-waits at barriers count too)."""
    torch.set_num_threads(args.threads)
    sides = {"dense": (args.dense, torch.bfloat16)}
    for item in args.sparse.split(","):
        name, _, folder = item.partition("=")
        sides[name] = (folder, torch.float32)
    runners = {name: _stepper(spec, dtype, args.new_tokens + 8) for name, (spec, dtype) in sides.items()}
    wall: dict[str, list[float]] = {n: [] for n in sides}
    cpu: dict[str, list[float]] = {n: [] for n in sides}
    loads = []
    for r in range(args.rounds):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            loads.append(os.getloadavg()[0])
            w, c = runners[name](args.new_tokens)
            wall[name].append(w)
            cpu[name].append(c)
            print(f"round {r} {name}: {1 / w:.1f} tok/s wall, {c * 1e3:.1f} ms CPU a token", flush=True)
    for name in sides:
        if name == "dense":
            continue
        wr = [d / s for d, s in zip(wall["dense"], wall[name])]
        cr = [d / s for d, s in zip(cpu["dense"], cpu[name])]
        row = {"bench": "sparse-steps", "model": name, "folder": sides[name][0], "dense": args.dense,
               "baseline": "the dense model in bf16 through peakllm's decode engine (its dense bf16 kernel)",
               "threads": args.threads, "new_tokens": args.new_tokens, "rounds": args.rounds,
               "tok_s_rounds": [1 / v for v in wall[name]], "dense_tok_s_rounds": [1 / v for v in wall["dense"]],
               "cpu_ms_rounds": [v * 1e3 for v in cpu[name]], "dense_cpu_ms_rounds": [v * 1e3 for v in cpu["dense"]],
               "wall_ratio_rounds": wr, "wall_ratio_median": statistics.median(wr), "wall_ratio_min": min(wr),
               "wall_ratio_max": max(wr),
               "wall_ratio_of_medians": statistics.median(wall["dense"]) / statistics.median(wall[name]),
               "cpu_ratio_rounds": cr, "cpu_ratio_median": statistics.median(cr), "cpu_ratio_min": min(cr),
               "cpu_ratio_max": max(cr),
               "cpu_ratio_of_medians": statistics.median(cpu["dense"]) / statistics.median(cpu[name]),
               "load_rounds": loads}
        print(f"{name}: decode x{row['wall_ratio_median']:.2f} wall (rounds {', '.join(f'{v:.2f}' for v in wr)}), "
              f"x{row['cpu_ratio_median']:.2f} CPU time (rounds {', '.join(f'{v:.2f}' for v in cr)})", flush=True)
        if args.output:
            append_result(args.output, row, args.threads)


def record(args) -> None:
    """Append `peakllm prune --json` outputs as results lines, each with the command that produced it and
    the bf16 dense file's size (the commands are long runs, made once; this stamps what they printed)."""
    dense_size = _bf16_bytes(args.dense)
    for item in args.result:
        name, _, rest = item.partition("=")
        path, _, command = rest.partition(":")
        out = json.loads(Path(path).read_text())
        row = {"bench": "sparse-prune", "name": name, "prune_command": command, **out,
               "weight_file_bytes": _folder_bytes(out["output"]), "dense_bf16_weight_file_bytes": dense_size,
               "size_ratio": _folder_bytes(out["output"]) / dense_size}
        print(f"{name}: {row['weight_file_bytes'] / 1e6:.1f} MB = {row['size_ratio']:.3f}x bf16, ppl {out.get('ppl')}")
        append_result(args.output, row, out.get("threads"))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernels")
    k.add_argument("--shapes", default=",".join(f"{o}x{i}" for o, i in SHAPES))
    k.add_argument("--rounds", type=int, default=3)
    k.add_argument("--reps", type=int, default=3, help="sweeps over the copies per timing (default: %(default)s)")
    k.add_argument("--threads", type=int, default=2)
    k.add_argument("--output", default=None, help="append results lines here (e.g. docs/results/sparse.jsonl)")
    m = sub.add_parser("models")
    m.add_argument("--dense", default="default", help="the dense model (run with --dtype bfloat16; its size: every "
                   "stored tensor in bf16) (default: %(default)s)")
    m.add_argument("--sparse", required=True, help="name=folder[,name=folder]: packed sparse folders")
    m.add_argument("--rounds", type=int, default=3)
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--prompt-tokens", type=int, default=16)
    m.add_argument("--new-tokens", type=int, default=64)
    m.add_argument("--repeats", type=int, default=3)
    m.add_argument("--output", default=None)
    st = sub.add_parser("steps")
    st.add_argument("--dense", default="default")
    st.add_argument("--sparse", required=True)
    st.add_argument("--rounds", type=int, default=5)
    st.add_argument("--threads", type=int, default=1)
    st.add_argument("--new-tokens", type=int, default=32)
    st.add_argument("--output", default=None)
    rc = sub.add_parser("record")
    rc.add_argument("--dense", default="default")
    rc.add_argument("--result", action="append", required=True,
                    help="name=prune-output.json:the command that wrote it (repeatable)")
    rc.add_argument("--output", required=True)
    args = ap.parse_args(argv)
    if args.what == "kernels":
        torch.set_num_threads(args.threads)
        torch.manual_seed(0)
        kernels(args)
    elif args.what == "record":
        record(args)
    elif args.what == "models":
        models(args)
    else:
        steps(args)


if __name__ == "__main__":
    main()
