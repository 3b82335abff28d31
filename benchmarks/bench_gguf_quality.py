"""peakllm's GGUF against llama-quantize's at the same block types: whole-file size and perplexity by both evaluators.

For each llama-quantize type (--types), llama.cpp's own pipeline (convert_hf_to_gguf to F32, llama-imatrix over
peakllm's seed-0 calibration text, llama-quantize --imatrix) and `peakllm quantize --format gguf --type T`
(GPTQ onto the same block type, calibration seeds --seeds) write one .gguf each of the default model. Every file
is evaluated by `peakllm eval` (the first --eval-tokens tokens of the held-out wiki split, windows of 512) and by
llama.cpp's `llama-perplexity` on the same tokens decoded to text (its own protocol: BOS per chunk, the second
half of each 512 window scored). One results line per file, appended to --results.

peakllm's --type takes llama-quantize's preset names with the same per-tensor rules (formats/gguf/presets.py),
so both files hold the same type in every tensor; the file sizes are measured, not assumed equal. Rows too
narrow for a K-quant fall back in both tools (SmolLM2's 576-wide rows: Q4_K -> Q5_0, Q3_K -> Q4_0).

  HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/bench_gguf_quality.py --types Q4_0,Q3_K_S --seeds 0

Needs a built llama.cpp tree (--llama-cpp, with build/bin) and a venv with sentencepiece for its converter
(--convert-venv); see benchmarks/bench_peers.py, whose helpers this script reuses.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

from bench_peers import N_PARAMS, REPO, Bench, last_json, loadavg, run



class GGUFQuality(Bench):
    def __init__(self, args):
        args.llmc_venv = args.convert_venv  # bench_peers runs the converter with that venv's python
        super().__init__(args)

    def venv_python(self) -> Path:
        py = Path(self.args.convert_venv) / "bin" / "python"
        proc = run([py, "-c", "import sentencepiece, gguf, transformers"], env=self.env) if py.is_file() else None
        if proc is None:
            raise SystemExit(f"bench_gguf_quality: {py} is missing: a venv with sentencepiece, gguf and transformers "
                             "runs llama.cpp's convert_hf_to_gguf.py (pass --convert-venv)")
        return py

    def convert(self) -> tuple[Path, str]:
        """The F32 GGUF llama.cpp's own pipeline starts from: --f32 when given (converted elsewhere), else
        convert_hf_to_gguf.py run here (bench_peers)."""
        if not self.args.f32:
            return super().convert()
        import hashlib

        path = Path(self.args.f32)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return path, f"given --f32 {path} (sha256 {digest})"

    def imatrix(self) -> Path:
        f32, _ = self.convert()
        path = self.out / "gguf" / f"{self.tag}imatrix-calib16x512-seed0.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file():
            text, _ = self.calib_text(0)
            n_llama = self.llama_token_count(f32, text)
            ctx = min(512, n_llama // 16) if n_llama else 512
            run([self.llama_bin("llama-imatrix"), "-m", f32, "-f", text, "-o", path, "-c", str(ctx), "-b", str(ctx),
                 "--chunks", "16", "-t", "2"], log=self.out / "logs" / "imatrix.log", env=self.env)
        return path

    def wiki_text(self) -> Path:
        from peakllm.data import tokenize_source
        from peakllm.models import load_tokenizer

        path = self.out / "calib" / f"{self.tag}wiki-eval-first{self.args.eval_tokens}.txt"
        if not path.is_file():
            tok = load_tokenizer(self.model)
            ids = tokenize_source(tok, "wiki")[: self.args.eval_tokens]
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(tok.decode(ids), encoding="utf-8")
        return path

    def params(self) -> int:
        """The model's parameters: every tensor of the F32 GGUF (a tied embedding stored once)."""
        if self.model == "default":
            return N_PARAMS
        if not hasattr(self, "n_params"):
            import gguf

            f32, _ = self.convert()
            self.n_params = sum(int(t.n_elements) for t in gguf.GGUFReader(str(f32)).tensors)
        return self.n_params

    def llama_ppl(self, model: Path) -> tuple[float | None, str]:
        # --no-repack: this llama.cpp (0c1e570) dies on its repacked Q4_0 path on AMX Xeons (SIGILL/SIGSEGV, its
        # own files included); the plain layout computes the same model
        cmd = [self.llama_bin("llama-perplexity"), "-m", model, "-f", self.wiki_text(), "-c", "512", "-b", "512",
               "-t", "2", "--no-repack"]
        stdout, _ = run(cmd, log=self.out / "logs" / f"ppl-{model.stem}.log", env=self.env)
        text = (self.out / "logs" / f"ppl-{model.stem}.log").read_text() + stdout
        found = re.findall(r"Final estimate: PPL = ([0-9.]+)", text)
        return (float(found[-1]) if found else None), shlex.join(map(str, cmd))

    def row(self, tool: str, preset: str, seed, path: Path, command: str, seconds) -> dict:
        ev, eval_cmd = self.peakllm_eval(path, path.stem)
        llama, llama_cmd = self.llama_ppl(path)
        return {"bench": "gguf-quality", "model": self.model, "tool": tool, "preset": preset, "seed": seed,
                "file_bytes": path.stat().st_size, "params": self.params(),
                "bits_per_param_total": 8 * path.stat().st_size / self.params(), "ppl_peakllm_eval": ev["ppl"],
                "eval_tokens": ev["tokens"], "ppl_llama_perplexity": llama, "tensor_types": self.tensor_types(path),
                "seconds": seconds, "command": command, "eval_command": eval_cmd, "llama_perplexity_command": llama_cmd,
                "loadavg": loadavg()}

    def llama_file(self, preset: str) -> None:
        f32, convert_note = self.convert()
        dst = self.out / "gguf" / f"{self.tag}llamacpp-{preset}-imat.gguf"
        cmd = [self.llama_bin("llama-quantize"), "--imatrix", self.imatrix(), f32, dst, preset, "2"]
        _, seconds = run(cmd, log=self.out / "logs" / f"quantize-{dst.stem}.log", env=self.env)
        row = self.row("llama.cpp " + self.llama_version(), f"{preset} + imatrix", 0, dst, shlex.join(map(str, cmd)),
                       seconds)
        row["f32_source"] = convert_note
        self.emit(row)

    def peakllm_file(self, preset: str, seed: int) -> None:
        qtype = preset  # peakllm's presets are llama-quantize's (before them: the preset's base type)
        method = self.args.method
        sink = self.args.sink_weight
        dst = self.out / "gguf" / f"{self.tag}peakllm-{qtype}-{method}-damp{self.args.damp}-sink{sink}-seed{seed}.gguf"
        cmd = self.peakllm + ["quantize", "--model", self.model, "--format", "gguf", "--type", qtype,
                              "--method", method, "--seed", str(seed),
                              *(["--damp", str(self.args.damp)] if method == "gptq" else []),
                              *(["--sink-weight", str(sink)] if sink is not None else []),
                              "--calib-samples", "16", "--calib-seqlen", "512", "--eval-tokens", "0",
                              "--output", str(dst), "--overwrite", "--json"]
        stdout, _ = run(cmd, log=self.out / "logs" / f"{dst.stem}.log", env=self.env)
        res = last_json(stdout)
        label = f"GPTQ damp {self.args.damp}" if method == "gptq" else "RTN, imatrix-weighted grid"
        label += f", sink weight {res.get('sink_weight', 1.0)}"
        row = self.row("peakllm", f"{label}, preset {preset}", seed, dst,
                       shlex.join(["peakllm"] + cmd[3:]), res["seconds"])
        row["result"] = res
        self.emit(row)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="peakllm's model name: default or gemma-3-270m (its F32 "
                   "GGUF via --f32, e.g. `llama-quantize --allow-requantize gemma.gguf gemma-f32.gguf F32`)")
    p.add_argument("--types", default="Q4_0,Q3_K_S", help="llama-quantize types (default: %(default)s)")
    p.add_argument("--seeds", default="0", help="peakllm calibration seeds (default: %(default)s)")
    p.add_argument("--method", choices=("gptq", "rtn"), default="gptq", help="peakllm's solver (default: %(default)s)")
    p.add_argument("--damp", type=float, default=0.01, help="GPTQ's Hessian damping (default: %(default)s)")
    p.add_argument("--sink-weight", type=float, default=None,
                   help="peakllm's --sink-weight (default: peakllm's own default for --format gguf)")
    p.add_argument("--only", default="llama,peakllm", help="which tools' files to make (default: %(default)s)")
    p.add_argument("--llama-cpp", default="/work/peers/llama.cpp", help="llama.cpp source tree with build/bin")
    p.add_argument("--convert-venv", default="/work/peers/venv", help="venv whose python runs convert_hf_to_gguf.py")
    p.add_argument("--out", default="/work/peers/out", help="folder for models and logs (outside the repo)")
    p.add_argument("--results", default=str(REPO / "docs" / "results" / "gguf-quality.jsonl"))
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--f32", default=None, help="an F32 GGUF of the default model made by convert_hf_to_gguf.py "
                   "elsewhere (e.g. in a venv with another transformers); default: convert here")
    args = p.parse_args(argv)
    bench = GGUFQuality(args)
    for name in ("llama-quantize", "llama-imatrix", "llama-perplexity"):
        bench.llama_bin(name)  # every tool checked before any work
    if not args.f32:
        if args.model != "default":
            raise SystemExit("bench_gguf_quality: --model other than default needs --f32 (its F32 GGUF)")
        bench.venv_python()
    tools = {s.strip() for s in args.only.split(",")}
    for preset in [t.strip() for t in args.types.split(",") if t.strip()]:
        if "llama" in tools:
            bench.llama_file(preset)
        if "peakllm" in tools:
            for seed in [int(s) for s in args.seeds.split(",") if s.strip()]:
                bench.peakllm_file(preset, seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
