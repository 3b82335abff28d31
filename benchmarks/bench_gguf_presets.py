"""peakllm's preset rules against llama-quantize's: the block type of every tensor, and the tensor bytes.

    python benchmarks/bench_gguf_presets.py --llama-cpp /path/to/llama.cpp --f32 model-f32.gguf \
        [--model default] [--presets Q2_K,Q3_K_S,...] [--imatrix imatrix.gguf] [--results FILE] [--write Q4_0,...]

For each preset, llama-quantize (with --imatrix when given: peakllm's rules are llama-quantize's with an
importance matrix) writes the F32 GGUF of the model in that preset; its tensor types are read back with gguf's
reader and compared, name by name, with the types `quantize --format gguf --type PRESET` resolves for the same
model before any work (GGMLRecipe.prepare, the run's own code path), and the bytes of the tensors' data with
the bytes those types take. --write PRESETS also writes peakllm's file for those presets (RTN, 2 calibration
segments: only the types and sizes are compared) and compares its tensor types and data bytes with
llama-quantize's file. One JSON line per preset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import gguf

from results_line import append

from peakllm.calibrate.gguf_plan import tensor_bytes
from peakllm.calibrate.recipes import GGMLRecipe
from peakllm.formats.gguf.presets import PRESETS, ModelShape, preset_types
from peakllm.formats.gguf.writer import plan_tensors
from peakllm.models import load_model


def file_types(path: Path) -> tuple[dict[str, str], int, str]:
    """GGUF name -> type of every 2-D tensor, the bytes of all tensor data (padded), general.file_type."""
    reader = gguf.GGUFReader(str(path))
    ft = gguf.LlamaFileType(int(reader.fields["general.file_type"].parts[-1][0])).name
    types = {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    data = sum(-(-int(t.n_bytes) // 32) * 32 for t in reader.tensors)
    return types, data, ft


def f32_tensors(path: str) -> tuple[dict, ModelShape]:
    """GGUF name -> (rows, cols) of every tensor of a file, and the hyperparameters the rules read."""
    reader = gguf.GGUFReader(path)
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()

    def value(key, default=0):
        f = reader.fields.get(f"{arch}.{key}")
        return int(f.parts[-1][0]) if f is not None else default

    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    return shapes, ModelShape(value("block_count"), value("attention.head_count"),
                              value("attention.head_count_kv"), value("expert_count"), arch)


def ones_imatrix(path: Path, shapes: dict) -> Path:
    """A legacy-format imatrix (llama.cpp's imatrix-loader) of ones for every matrix: it switches on the rules
    llama-quantize applies with an importance matrix; its values change the codes, never the types."""
    import struct

    import numpy as np

    names = [n for n, s in shapes.items() if len(s) == 2 and n not in ("token_embd.weight", "output.weight")]
    with open(path, "wb") as fh:
        fh.write(struct.pack("<i", len(names)))
        for n in names:
            fh.write(struct.pack("<i", len(n)) + n.encode() + struct.pack("<ii", 1, shapes[n][1]))
            fh.write(np.ones(shapes[n][1], dtype=np.float32).tobytes())
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-cpp", required=True)
    ap.add_argument("--f32", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--imatrix", default=None, help="an imatrix file, or 'ones' (types only: see ones_imatrix)")
    ap.add_argument("--write", default="", help="presets to write with peakllm too")
    ap.add_argument("--results", default=None)
    ap.add_argument("--names-from-f32", action="store_true",
                    help="take the tensors (names, shapes) and hyperparameters from the F32 file itself and compare "
                         "the rule table alone (presets.preset_types), for families peakllm does not write yet")
    args = ap.parse_args()
    quantize = Path(args.llama_cpp) / "build" / "bin" / "llama-quantize"
    if args.names_from_f32:
        model, gguf_name, shapes, shape = None, {}, *f32_tensors(args.f32)
    else:
        model, _tok = load_model(args.model)
        plan = plan_tensors(model, {}, "F16")
        gguf_name = {t.hf_name.removesuffix(".weight"): t.name for t in plan}
        shapes = {t.name: t.shape for t in plan}
    with tempfile.TemporaryDirectory(prefix="bench-gguf-presets-") as tmp:
        if args.imatrix == "ones":
            args.imatrix = str(ones_imatrix(Path(tmp) / "ones.dat", shapes))
        for preset in args.presets.split(","):
            out = Path(tmp) / f"{preset}.gguf"
            cmd = [str(quantize), *(["--imatrix", args.imatrix] if args.imatrix else []), args.f32, str(out), preset]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
                raise SystemExit(f"llama-quantize {preset} failed")
            theirs, their_data, their_ft = file_types(out)
            if model is None:
                ours = preset_types(preset, shapes, shape)
            else:
                recipe = GGMLRecipe("rtn", PRESETS[preset][0], act_order="none", preset=preset)
                recipe.prepare(model)
                ours = {gguf_name[m]: t for m, t in {**recipe.plan.decoder, **recipe.plan.outer}.items()}
            ours.update({n: "F16" for n, s in shapes.items() if len(s) == 2 and n not in ours})
            differ = {n: (ours.get(n), theirs.get(n)) for n in sorted(set(ours) | set(theirs))
                      if ours.get(n) != theirs.get(n)}
            our_data = sum(tensor_bytes(ours.get(n, "F32"), s) for n, s in shapes.items())
            counts = {}
            for t in theirs.values():
                counts[t] = counts.get(t, 0) + 1
            row = {"bench": "gguf-presets", "model": Path(args.f32).name if model is None else args.model, "preset": preset, "imatrix": Path(args.imatrix).name if args.imatrix else None,
                   "tensors": len(theirs), "same_types": not differ, "differences": differ,
                   "llama_quantize_types": counts, "llama_quantize_file_type": their_ft,
                   "peakllm_file_type": f"MOSTLY_{preset}",
                   "llama_quantize_data_bytes": their_data, "peakllm_data_bytes": our_data,
                   "llama_quantize_file_bytes": out.stat().st_size}
            if preset in args.write.split(","):
                row.update(write_peakllm(args, preset, Path(tmp), theirs, their_data))
            print(json.dumps(row), flush=True)
            if args.results:
                append(args.results, row)
            out.unlink()


def write_peakllm(args, preset: str, tmp: Path, theirs: dict, their_data: int) -> dict:
    """peakllm's own file of ``preset`` (RTN, few calibration tokens): its types and data bytes against theirs."""
    out = tmp / f"peakllm-{preset}.gguf"
    cmd = [sys.executable, "-m", "peakllm", "quantize", "--model", args.model, "--format", "gguf", "--type", preset,
           "--method", "rtn", "--calib-samples", "2", "--calib-seqlen", "64", "--eval-tokens", "0", "--output",
           str(out), "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"peakllm quantize {preset} failed: {proc.stderr[-2000:]}")
    types, data, ft = file_types(out)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"peakllm_written_same_types": types == theirs, "peakllm_written_data_bytes": data,
            "peakllm_written_file_type": ft, "peakllm_written_file_bytes": out.stat().st_size,
            "peakllm_written_bits_per_param_total": result["bits_per_param_total"],
            "written_data_bytes_equal": data == their_data}


if __name__ == "__main__":
    main()
