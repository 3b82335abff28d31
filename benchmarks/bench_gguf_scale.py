"""A big-model-shaped GGUF written by a streamed run under a memory budget, then run by llama-bench against
llama-quantize's file of the same types made from the same weights.

  python benchmarks/bench_gguf_scale.py --synth DIR [--layers N] [--type Q4_K] [--method rtn]
      [--max-memory 4GB] [--embed-bits keep] [--calib-samples 4 --calib-seqlen 256] [--workdir DIR]
      [--peers /work/peers] [--rounds 3] [--log docs/results/gguf-scale.jsonl]

--synth: a folder `peakllm synth` wrote (RANDOM WEIGHTS: the rows say nothing about quality). --layers N keeps
its first N decoder layers (hard links to the shards, a config and index for N layers): peak memory is one
layer's plus the outer matrices' whatever the depth, and time grows by the layer, so a shallow model of the
full width measures both when the whole depth takes too long on this machine (the row says which).

1. `peakllm quantize --format gguf --stream on --max-memory B` in its own process under /usr/bin/time -v: the
   run's own peak RSS (VmHWM), its prediction, time's maximum resident set, seconds (per layer).
2. With llama.cpp built under --peers (READY there): the same folder converted by convert_hf_to_gguf.py
   --outtype f16, then llama-quantize --pure to the same type (embedding and output in peakllm's types), so
   both files hold the same tensor types; llama-bench -t 2 (prompt and generation) on the two files in turn,
   the order swapped each round, >= 3 rounds; per-round ratios peakllm / llama.cpp, their median and spread.
A preset --type (Q4_K_M, ...) is given to both tools as is: each applies the preset's per-tensor rules (peakllm's
are llama-quantize's, formats/gguf/presets.py), no --pure and no --embed-type. With --reuse, a llama.cpp file kept
by the reused run is benchmarked again without being made again (for a rerun of llama-bench on a quieter machine).
The f16 intermediate is deleted at once (13.5 GB for a 7B model); the GGUFs are deleted unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from results_line import append as append_result  # benchmarks/results_line.py: commit, machine, command

from peakllm.formats.gguf.presets import PRESETS

REPO = Path(__file__).resolve().parent.parent


def shallow_copy(src: Path, layers: int, dst: Path) -> Path:
    """``src`` with only its first ``layers`` decoder layers: hard-linked shards, rewritten config and index."""
    config = json.loads((src / "config.json").read_text())
    if layers >= config["num_hidden_layers"]:
        return src
    index = json.loads((src / "model.safetensors.index.json").read_text())
    keep = {n: f for n, f in index["weight_map"].items()
            if not n.startswith("model.layers.") or int(n.split(".")[2]) < layers}
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            if f.name in set(keep.values()):
                os.link(f, dst / f.name)
        elif f.is_file() and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, dst / f.name)
    config["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": index.get("metadata", {}),
                                                                  "weight_map": keep}, indent=2))
    return dst


def run_peakllm(args, model: Path, out: Path) -> dict:
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "peakllm", "quantize", "--model", str(model), "--format",
           "gguf", "--type", args.type, "--method", args.method, "--stream", "on", "--max-memory", args.max_memory,
           "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen), "--eval-tokens", "0",
           "--output", str(out), "--overwrite", "--json"]
    if args.embed_bits == "keep":
        cmd += ["--embed-bits", "keep"]
    elif args.type not in PRESETS:  # a preset's own rules choose the embedding's and output's types
        cmd += ["--embed-type", args.embed_type]
    print("$", " ".join(cmd), flush=True)
    p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO),
                                                                   "HF_HUB_OFFLINE": "1"})
    if p.returncode != 0:
        raise SystemExit(f"peakllm failed: {p.stderr[-1500:]}")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr)
    result["time_v_max_rss_bytes"] = int(m.group(1)) * 1024 if m else None
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", p.stderr)
    result["time_v_wall"] = m.group(1) if m else None
    return result


def llama_quantize(args, peers: Path, model: Path, out: Path) -> str:
    """convert_hf_to_gguf.py --outtype f16, then llama-quantize --pure to --type; the f16 file deleted."""
    f16 = out.with_name(out.stem + ".f16.gguf")
    # the converter's transformers predates the class name transformers 5 saves ("TokenizersBackend"): a linked
    # copy of the folder names the fast tokenizer class instead; weights and vocabulary are the same files
    src = out.parent / f"{model.name}-for-converter"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    for f in model.iterdir():
        if f.name == "tokenizer_config.json":
            cfg = json.loads(f.read_text())
            if cfg.get("tokenizer_class") == "TokenizersBackend":
                cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
            (src / f.name).write_text(json.dumps(cfg))
        elif f.is_file():
            os.link(f, src / f.name)
    conv = [str(peers / "venv/bin/python"), str(peers / "llama.cpp/convert_hf_to_gguf.py"), str(src), "--outtype",
            "f16", "--outfile", str(f16)]
    print("$", " ".join(conv), flush=True)
    p = subprocess.run(conv, capture_output=True, text=True)
    shutil.rmtree(src)
    if p.returncode != 0:
        raise SystemExit(f"convert_hf_to_gguf.py failed: {p.stderr[-1500:]}")
    outer = "f16" if args.embed_bits == "keep" else args.embed_type.lower()
    if args.type in PRESETS:  # llama-quantize's own rules for the preset, as peakllm's --type applies them
        q = [str(peers / "build/bin/llama-quantize"), str(f16), str(out), args.type, "2"]
    else:
        q = [str(peers / "build/bin/llama-quantize"), "--pure", "--output-tensor-type", outer,
             "--token-embedding-type", outer, str(f16), str(out), args.type, "2"]
    print("$", " ".join(q), flush=True)
    p = subprocess.run(q, capture_output=True, text=True)
    f16.unlink()
    if p.returncode != 0:
        raise SystemExit(f"llama-quantize failed: {p.stderr[-1500:]}")
    return " ".join(q)


def bench_once(peers: Path, path: Path, args) -> dict:
    cmd = [str(peers / "build/bin/llama-bench"), "-m", str(path), "-t", "2", "-p", str(args.pp), "-n", str(args.tg),
           "-r", "1", "--repack", str(args.repack), "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=True)
    rows = json.loads(p.stdout)
    return {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}


def llama_bench(args, peers: Path, ours: Path, theirs: Path) -> dict:
    runs = {"peakllm": [], "llama.cpp": []}
    loads = []
    for r in range(args.rounds):
        order = [("peakllm", ours), ("llama.cpp", theirs)]
        for name, path in (order if r % 2 == 0 else order[::-1]):
            runs[name].append(bench_once(peers, path, args))
        loads.append(round(os.getloadavg()[0], 2))
        print(f"round {r}: {runs['peakllm'][-1]} vs {runs['llama.cpp'][-1]} load {loads[-1]}", flush=True)
    out = {"rounds": args.rounds, "threads": 2, "repack": args.repack, "pp_tokens": args.pp, "tg_tokens": args.tg, "loadavg_per_round": loads}
    for kind in [k for k in ("pp", "tg") if k in runs["peakllm"][0]]:  # --pp 0: generation only
        a = [x[kind] for x in runs["peakllm"]]
        b = [x[kind] for x in runs["llama.cpp"]]
        ratios = [x / y for x, y in zip(a, b)]
        out[kind] = {"peakllm_tok_s": a, "llamacpp_tok_s": b, "ratio_rounds": ratios,
                     "ratio_median": statistics.median(ratios), "ratio_spread": [min(ratios), max(ratios)]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synth", required=True, type=Path)
    ap.add_argument("--layers", type=int, default=0, help="keep the first N decoder layers (0: all)")
    ap.add_argument("--type", default="Q4_K")
    ap.add_argument("--method", default="rtn", choices=("rtn", "gptq"))
    ap.add_argument("--embed-bits", default=None, choices=("keep",))
    ap.add_argument("--embed-type", default="Q6_K")
    ap.add_argument("--max-memory", default="4GB")
    ap.add_argument("--calib-samples", type=int, default=4)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--workdir", type=Path, default=Path("/work/scale27"))
    ap.add_argument("--peers", type=Path, default=Path("/work/peers"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pp", type=int, default=64, help="prompt tokens; 0: no prompt test (see the docs: llama-bench "
                    "at 0c1e570 crashed in prompt processing on both files of the 1-layer 7B-width model)")
    ap.add_argument("--tg", type=int, default=16)
    ap.add_argument("--repack", type=int, choices=(0, 1), default=1,
                    help="llama-bench --repack: 1 (its default) repacks block types for the CPU's kernels; at 0c1e570 "
                    "its prompt processing crashed on this machine's AVX-512 path for both files; 0 runs it")
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a results file whose last line is this benchmark's peakllm part, its GGUF kept (--keep): "
                    "only the llama.cpp part runs; that line's stamp goes under peakllm_run")
    ap.add_argument("--log", default=str(REPO / "docs/results/gguf-scale.jsonl"))
    args = ap.parse_args()
    synth = json.loads((args.synth / "PEAKLLM_SYNTH.json").read_text())
    total_layers = json.loads((args.synth / "config.json").read_text())["num_hidden_layers"]
    layers = args.layers or total_layers
    model = shallow_copy(args.synth, layers, args.workdir / f"{args.synth.name}-{layers}L")
    ours = args.workdir / f"peakllm-{args.type}-{layers}L.gguf"
    if args.reuse is not None:
        row = json.loads(args.reuse.read_text().strip().splitlines()[-1])
        row["peakllm_run"] = {k: row.pop(k) for k in ("command_line", "commit", "dirty", "machine", "date") if k in row}
        row.pop("llama_bench", None)
        return finish(args, row, model, ours)
    load_before = os.getloadavg()
    result = run_peakllm(args, model, ours)
    row = {"shape": synth.get("shape"), "random_weights": True, "layers": layers, "layers_of_shape": total_layers,
           "type": args.type, "method": args.method,
           "embed": "F16" if args.embed_bits == "keep" else "preset" if args.type in PRESETS else args.embed_type,
           "max_memory": args.max_memory, "calib_tokens": result["calib_tokens"], "params": result["params"],
           **{k: result[k] for k in ("peak_rss_bytes", "predicted_peak_rss_bytes", "predicted_peak_phase",
                                     "time_v_max_rss_bytes", "time_v_wall", "seconds", "seconds_per_layer",
                                     "size_bytes", "bits_per_param_total", "gguf_tensor_types", "time_breakdown")},
           "loadavg_before": [round(x, 2) for x in load_before]}
    return finish(args, row, model, ours)


def finish(args, row: dict, model: Path, ours: Path) -> int:
    """The llama.cpp part (when its build is READY), then the results line; the big files deleted."""
    layers = row["layers"]
    if (args.peers / "READY").exists():
        theirs = args.workdir / f"llamacpp-{args.type}-{layers}L.gguf"
        if args.reuse is not None and theirs.is_file():  # kept (--keep) by the run being reused
            row["llama_quantize"] = row.get("llama_quantize") or f"kept {theirs}"
        else:
            row["llama_quantize"] = llama_quantize(args, args.peers, model, theirs)
        row["llama_bench"] = llama_bench(args, args.peers, ours, theirs)
        if not args.keep:
            theirs.unlink()
    else:
        row["llama_bench"] = None
    if not args.keep:
        ours.unlink()
    if model != args.synth:
        shutil.rmtree(model)
    print(json.dumps(append_result(args.log, row, threads=2), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
