"""Peer tools against peakllm on the same tokens: llm-compressor GPTQ and llama.cpp K-quants with an imatrix.

Every perplexity here is peakllm's own evaluator (`peakllm eval --max-tokens N --json`: the first N tokens of
the held-out wiki split, windows of 512, exp(mean NLL) over all predicted tokens), so rows compare directly
with `peakllm quantize --eval-tokens N`. Calibration is peakllm's `calibration_segments(tok, 16, 512,
source="calib", seed=s)`, the tokens `peakllm quantize --calib-samples 16 --calib-seqlen 512 --seed s` uses.

Parts (--only, comma-separated; default: all):
  llmc     llm-compressor GPTQ W4 g64 symmetric (its GPTQModifier defaults otherwise), seeds --seeds, run in
           the llm-compressor venv; output a compressed-tensors folder, evaluated with `peakllm eval`
  gguf     convert the default HF folder to an F32 GGUF, llama-imatrix over the seed-0 calibration text,
           llama-quantize to K-quants/Q8_0/Q4_0 with the imatrix (Q4_0/Q8_0 also without), `peakllm eval`
           of every GGUF, and a llama-perplexity cross-check on F32 and Q4_K_M
  speed    llama-bench decode speed (-p 0 -n 128 -t 2 -r 3) of the F32, Q8_0 and Q4_0 (no imatrix) GGUFs
  peakllm  peakllm's own GPTQ W4 g64 sym baseline, seed 0

Each measurement becomes one JSON line appended to --results (and printed on stdout). Big artifacts go to
--out (outside the repo). Run it under `nice -n 5` on a shared machine:

  HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/bench_peers.py                     # everything
  HF_HUB_OFFLINE=1 nice -n 5 python benchmarks/bench_peers.py --only speed        # llama-bench rows only
  python benchmarks/bench_peers.py --llama-cpp /path/llama.cpp --llmc-venv /path/venv --only llmc --seeds 0

The llama.cpp tree must have been built (cmake -B build, targets llama-quantize llama-imatrix
llama-perplexity llama-bench); the venv must have llmcompressor installed. Internal: `_llmc-worker` is the
part that runs inside the venv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from results_line import append as append_result  # benchmarks/results_line.py: commit, machine, command

N_PARAMS = 134_515_008  # SmolLM2-135M-Instruct, tied embedding counted once
REPO = Path(__file__).resolve().parents[1]
IMATRIX_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "Q4_0")
PLAIN_TYPES = ("Q4_0", "Q8_0")  # without imatrix, for the speed rows
SPEED_TYPES = ("Q4_0", "Q8_0", "F32")
LLAMA_BINS = ("llama-quantize", "llama-imatrix", "llama-perplexity", "llama-bench")


class Missing(SystemExit):
    pass


def die(msg: str) -> None:
    raise Missing(f"bench_peers: {msg}")


def safetensors_breakdown(folder: Path) -> dict:
    """Bytes per kind of tensor in a folder's *.safetensors (header sizes): where the file's bits go."""
    import struct

    out: dict = {}
    for f in sorted(folder.rglob("*.safetensors")):
        with open(f, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
        out["header_bytes"] = out.get("header_bytes", 0) + 8 + n
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            if "embed_tokens" in name or "lm_head" in name:
                kind = f"embedding/lm_head ({meta['dtype']})"
            elif "norm" in name:
                kind = f"norms ({meta['dtype']})"
            else:
                kind = "linear layers (codes, scales, zero points, shapes)"
            out[kind] = out.get(kind, 0) + end - begin
    return out


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run(cmd: list[str], *, log: Path | None = None, env: dict | None = None, cwd: Path | None = None,
        timeout: float | None = None) -> tuple[str, float]:
    """Run `cmd`, return (stdout, seconds); stderr (and stdout) also go to `log`; fail loudly."""
    print(f"$ {shlex.join(map(str, cmd))}", file=sys.stderr, flush=True)
    start = time.perf_counter()
    try:
        proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)
    except subprocess.TimeoutExpired:
        die(f"command ran past {timeout:.0f} s (busy machine?): {shlex.join(map(str, cmd))}")
    seconds = time.perf_counter() - start
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {shlex.join(map(str, cmd))}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        die(f"command failed (rc {proc.returncode}): {shlex.join(map(str, cmd))}\n{tail}")
    return proc.stdout, seconds


def last_json(stdout: str) -> dict:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    die(f"no JSON object in output:\n{stdout[-2000:]}")


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.results = Path(args.results)
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.peakllm = [sys.executable, "-m", "peakllm"]
        self.model = getattr(args, "model", "default")  # peakllm's name of the model; its files are tagged by it
        self.tag = "" if self.model == "default" else f"{self.model}-"

    # --- bookkeeping ---------------------------------------------------------------------------------
    def emit(self, row: dict) -> None:
        row = {"time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **row}
        self.results.parent.mkdir(parents=True, exist_ok=True)
        print(json.dumps(append_result(self.results, row, threads=getattr(self.args, "threads", None))), flush=True)

    def peakllm_eval(self, model: Path, tag: str) -> tuple[dict, str]:
        cmd = self.peakllm + ["eval", "--model", str(model), "--max-tokens", str(self.args.eval_tokens), "--json"]
        stdout, _ = run(cmd, log=self.out / "logs" / f"eval-{tag}.log", env=self.env)
        return last_json(stdout), shlex.join(["peakllm"] + cmd[3:])

    def segments_file(self, seed: int) -> Path:
        """peakllm's calibration tokens for `seed` as int64 .npy, written by this (main) environment."""
        import numpy as np

        from peakllm.data import calibration_segments
        from peakllm.models import load_tokenizer

        path = self.out / "calib" / f"{self.tag}calib-16x512-seed{seed}.npy"
        if not path.is_file():
            tok = load_tokenizer(self.model)
            seg = calibration_segments(tok, 16, 512, source="calib", seed=seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, seg.numpy().astype(np.int64))
        return path

    # --- tools ---------------------------------------------------------------------------------------
    def llama_bin(self, name: str) -> Path:
        path = Path(self.args.llama_cpp) / "build" / "bin" / name
        if not path.is_file():
            die(f"llama.cpp binary {path} is missing: build it with `cmake -S {self.args.llama_cpp} -B "
                f"{self.args.llama_cpp}/build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF && cmake "
                f"--build {self.args.llama_cpp}/build -j2 --target {' '.join(LLAMA_BINS)}` or pass --llama-cpp")
        return path

    def llama_version(self) -> str:
        proc = subprocess.run([str(self.llama_bin("llama-bench")), "--version"], capture_output=True, text=True)
        text = (proc.stdout + proc.stderr).strip().splitlines()
        version = next((line.strip() for line in text if line.startswith("version:")), "unknown")
        note = Path(self.args.llama_cpp) / "PEER_VERSION"
        if note.is_file():
            version += f" ({note.read_text().strip()})"
        return version

    def venv_python(self) -> Path:
        py = Path(self.args.llmc_venv) / "bin" / "python"
        if not py.is_file():
            die(f"llm-compressor venv {self.args.llmc_venv} is missing (no bin/python): create it with `python -m venv "
                f"--system-site-packages {self.args.llmc_venv}` and `pip install llmcompressor==0.14.* -c constraints.txt` "
                "(constraints pinning the installed torch), or pass --llmc-venv")
        proc = subprocess.run([str(py), "-c", "import llmcompressor; print(llmcompressor.__version__)"],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            die(f"llmcompressor does not import in {py}: {proc.stderr.strip().splitlines()[-1:]}")
        return py

    # --- llm-compressor ------------------------------------------------------------------------------
    def part_llmc(self) -> None:
        from peakllm.models import default_model_dir

        py = self.venv_python()
        model_dir = default_model_dir()
        for seed in self.args.seeds:
            seg = self.segments_file(seed)
            folder = self.out / f"llmc-gptq-w4g64-sym-seed{seed}"
            cmd = [py, Path(__file__).resolve(), "_llmc-worker", "--model", model_dir, "--segments", seg,
                   "--output", folder, "--group-size", "64"]
            stdout, wall = run(cmd, log=self.out / "logs" / f"llmc-seed{seed}.log", env=self.env)
            info = last_json(stdout)
            ev, eval_cmd = self.peakllm_eval(folder, f"llmc-seed{seed}")
            weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            folder_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            self.emit({
                "tool": "llm-compressor", "version": info["versions"], "scheme": "GPTQ W4 g64 sym (W4A16-style)",
                "seed": seed, "ppl": ev["ppl"], "eval_tokens": ev["tokens"],
                "file_bytes": weights, "bits_per_param_total": weights * 8 / N_PARAMS,
                "folder_bytes": folder_bytes, "seconds": info["oneshot_seconds"], "wall_seconds_with_load_save": wall,
                "loadavg": info["loadavg"], "loadavg_end": loadavg(),
                "command": shlex.join(map(str, cmd)).replace(str(Path(__file__).resolve()), "benchmarks/bench_peers.py"),
                "eval_command": eval_cmd, "recipe": info["recipe"], "quantization_config": info["quantization_config"],
                "weight_observer": info["weight_observer"], "output": str(folder),
                "bytes_breakdown": safetensors_breakdown(folder),
                "calib_tokens_sha": info["calib_sha"],
            })

    # --- llama.cpp -----------------------------------------------------------------------------------
    def gguf_path(self, qtype: str, imatrix: bool = True) -> Path:
        if qtype == "F32":
            return self.out / "gguf" / "smollm2-135m-F32.gguf"
        return self.out / "gguf" / f"smollm2-135m-{qtype}{'-imat' if imatrix else ''}.gguf"

    def convert(self) -> tuple[Path, str]:
        from peakllm.models import default_model_dir

        f32 = self.gguf_path("F32")
        tree = Path(self.args.llama_cpp)
        # convert_hf_to_gguf imports sentencepiece, which the main environment lacks (and must not be changed):
        # it runs with the llm-compressor venv's python (sentencepiece installed there) and the tree's gguf-py
        cmd = [self.venv_python(), tree / "convert_hf_to_gguf.py", default_model_dir(), "--outtype", "f32",
               "--outfile", f32]
        if not f32.is_file():
            f32.parent.mkdir(parents=True, exist_ok=True)
            env = {**self.env, "PYTHONPATH": str(tree / "gguf-py")}
            run(cmd, log=self.out / "logs" / "convert.log", env=env)
        return f32, "PYTHONPATH=" + shlex.quote(str(tree / "gguf-py")) + " " + shlex.join(map(str, cmd))

    def calib_text(self, seed: int = 0) -> tuple[Path, dict]:
        """Decode the calibration segments to one text file; report how exactly it re-tokenizes."""
        import numpy as np

        from peakllm.models import load_tokenizer

        tok = load_tokenizer(self.model)
        seg = np.load(self.segments_file(seed))
        texts = [tok.decode(row.tolist()) for row in seg]
        text = "".join(texts)
        path = self.out / "calib" / f"{self.tag}calib-16x512-seed{seed}.txt"
        path.write_text(text, encoding="utf-8")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        flat = seg.reshape(-1).tolist()
        check = {"segments_roundtrip_exact": sum(tok(t, add_special_tokens=False)["input_ids"] == r.tolist()
                                                 for t, r in zip(texts, seg)),
                 "concat_retokenized_len": len(ids), "original_len": len(flat),
                 "positions_differing": sum(a != b for a, b in zip(ids, flat)) + abs(len(ids) - len(flat))}
        return path, check

    def tensor_types(self, path: Path) -> dict:
        """{type: {"tensors": n, "params": n, "names": [pattern, ...]}} read from the GGUF itself."""
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        out: dict = {}
        for t in reader.tensors:
            name = re.sub(r"blk\.\d+\.", "blk.N.", t.name)
            typ = t.tensor_type.name
            entry = out.setdefault(typ, {"tensors": 0, "params": 0, "names": {}})
            entry["tensors"] += 1
            entry["params"] += int(t.n_elements)
            entry["names"][name] = entry["names"].get(name, 0) + 1
        for entry in out.values():
            entry["names"] = [f"{n} x{c}" if c > 1 else n for n, c in sorted(entry["names"].items())]
        return out

    def part_gguf(self) -> None:
        version = self.llama_version()
        f32, convert_cmd = self.convert()
        text, check = self.calib_text(0)
        # llama-imatrix re-tokenizes the text with llama.cpp's tokenizer and uses only whole chunks of -c tokens.
        # llama.cpp merges a few whitespace runs that HF splits ("\n\n " -> one token), so the 8192 calibration
        # tokens come back as slightly fewer (8187 for seed 0) and -c 512 would drop the 16th chunk. Count them
        # (llama-tokenize) and use the largest context that still gives 16 chunks.
        n_llama = self.llama_token_count(f32, text)
        ctx = min(512, n_llama // 16) if n_llama else 512
        check["llama_cpp_tokens"] = n_llama
        imatrix = self.out / "gguf" / "imatrix-calib16x512-seed0.gguf"
        imat_cmd = [self.llama_bin("llama-imatrix"), "-m", f32, "-f", text, "-o", imatrix, "-c", str(ctx), "-b", str(ctx),
                    "--chunks", "16", "-t", "2"]
        la = loadavg()
        _, imat_s = run(imat_cmd, log=self.out / "logs" / "imatrix.log", env=self.env)
        imat_log = (self.out / "logs" / "imatrix.log").read_text()
        chunks = re.findall(r"computing over (\d+) chunks", imat_log)
        self.emit({"tool": "llama.cpp", "version": version, "scheme": "imatrix", "seed": 0, "ppl": None,
                   "seconds": imat_s, "loadavg": la, "command": shlex.join(map(str, imat_cmd)),
                   "convert_command": convert_cmd, "calib_text_check": check,
                   "imatrix_chunks": int(chunks[0]) if chunks else None, "file_bytes": imatrix.stat().st_size})

        ev, eval_cmd = self.peakllm_eval(f32, "F32")
        row = self.gguf_row(version, "F32 (convert_hf_to_gguf --outtype f32)", f32, ev, eval_cmd, 0.0, la,
                            convert_cmd, None)
        row["gguf_tokenizer_same_eval_tokens"] = self.same_eval_tokens(f32)
        self.emit(row)
        jobs = [(q, True) for q in IMATRIX_TYPES] + [(q, False) for q in PLAIN_TYPES]
        for qtype, use_imat in jobs:
            dst = self.gguf_path(qtype, use_imat)
            cmd = [self.llama_bin("llama-quantize")] + (["--imatrix", imatrix] if use_imat else []) + [f32, dst, qtype, "2"]
            la = loadavg()
            _, qs = run(cmd, log=self.out / "logs" / f"quantize-{dst.stem}.log", env=self.env)
            qlog = (self.out / "logs" / f"quantize-{dst.stem}.log").read_text()
            fallbacks = sorted(set(re.findall(r"warning: (\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for "
                                              r"type\s+(\S+)\)\s*(?:\(WARNING[^)]*\)\s*)?-> falling back to\s+(\S+)", qlog)))
            fb = {}
            for name, ncols, blk, want, got in fallbacks:
                key = f"{want}->{got} (ncols {ncols} % {blk})"
                fb.setdefault(key, []).append(re.sub(r"blk\.\d+\.", "blk.N.", name))
            fb = {k: sorted(set(v)) for k, v in fb.items()}
            ev, eval_cmd = self.peakllm_eval(dst, dst.stem)
            self.emit(self.gguf_row(version, f"{qtype}{' + imatrix' if use_imat else ''}", dst, ev, eval_cmd, qs, la,
                                    shlex.join(map(str, cmd)), fb))
        self.cross_check(version)

    def llama_token_count(self, gguf: Path, text: Path) -> int | None:
        """How many tokens llama.cpp's own tokenizer makes of `text` (None without the llama-tokenize binary)."""
        tool = Path(self.args.llama_cpp) / "build" / "bin" / "llama-tokenize"
        if not tool.is_file():
            return None
        stdout, _ = run([tool, "-m", gguf, "-f", text, "--ids", "--log-disable"], env=self.env)
        line = stdout.strip().splitlines()[-1]
        return len(json.loads(line))

    def same_eval_tokens(self, gguf: Path) -> bool:
        """Does the tokenizer transformers builds from the GGUF give the default tokenizer's eval tokens?"""
        from transformers import AutoTokenizer

        from peakllm.data import tokenize_source
        from peakllm.models import load_tokenizer

        ref = tokenize_source(load_tokenizer("default"), "wiki")[: self.args.eval_tokens]
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        got = tokenize_source(tok, "wiki")[: self.args.eval_tokens]
        return bool(ref.shape == got.shape and (ref == got).all())

    def gguf_row(self, version, scheme, path, ev, eval_cmd, seconds, la, cmd, fallbacks) -> dict:
        size = path.stat().st_size
        return {"tool": "llama.cpp", "version": version, "scheme": scheme, "seed": 0 if "imatrix" in scheme else None,
                "ppl": ev["ppl"], "eval_tokens": ev["tokens"], "file_bytes": size, "bits_per_param_total": size * 8 / N_PARAMS,
                "seconds": seconds, "loadavg": la, "command": cmd, "eval_command": eval_cmd,
                "tensor_types": self.tensor_types(path), "fallbacks": fallbacks, "output": str(path)}

    def cross_check(self, version: str) -> None:
        """llama-perplexity on the first eval tokens decoded to text (its own protocol: BOS per chunk, scores the
        second half of each 512 window), on F32 and Q4_K_M: compare the ratio, not the absolute value."""
        from peakllm.data import tokenize_source
        from peakllm.models import load_tokenizer

        tok = load_tokenizer("default")
        ids = tokenize_source(tok, "wiki")[: self.args.eval_tokens]
        text = self.out / "calib" / f"wiki-eval-first{self.args.eval_tokens}.txt"
        text.write_text(tok.decode(ids.tolist()), encoding="utf-8")
        for qtype in ("F32", "Q4_K_M"):
            path = self.gguf_path(qtype)
            cmd = [self.llama_bin("llama-perplexity"), "-m", path, "-f", text, "-c", "512", "-b", "512", "-t", "2"]
            la = loadavg()
            stdout, secs = run(cmd, log=self.out / "logs" / f"perplexity-{qtype}.log", env=self.env)
            log = (self.out / "logs" / f"perplexity-{qtype}.log").read_text()
            m = re.search(r"Final estimate: PPL = ([\d.]+) \+/- ([\d.]+)", log)
            chunks = re.search(r"calculating perplexity over (\d+) chunks", log)
            self.emit({"tool": "llama.cpp", "version": version, "scheme": f"{qtype} llama-perplexity cross-check",
                       "seed": 0 if qtype != "F32" else None, "ppl": float(m.group(1)) if m else None,
                       "ppl_stderr": float(m.group(2)) if m else None, "chunks": int(chunks.group(1)) if chunks else None,
                       "evaluator": "llama-perplexity (BOS per chunk, second half of each 512 window scored)",
                       "file_bytes": path.stat().st_size, "bits_per_param_total": path.stat().st_size * 8 / N_PARAMS,
                       "seconds": secs, "loadavg": la, "command": shlex.join(map(str, cmd))})

    def part_speed(self) -> None:
        version = self.llama_version()
        bench = self.llama_bin("llama-bench")
        for qtype in SPEED_TYPES:
            path = self.gguf_path(qtype, imatrix=False)
            if not path.is_file():
                die(f"{path} is missing: run --only gguf first")
            cmd = [bench, "-m", path, "-p", "0", "-n", "128", "-t", str(self.args.bench_threads), "-r", "3", "-o", "json"]
            la = loadavg()
            up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
            stdout, secs = run(cmd, log=self.out / "logs" / f"bench-{qtype}.log", env=self.env,
                               timeout=self.args.bench_timeout)
            rows = json.loads(stdout[stdout.index("["):])
            r = rows[0]
            self.emit({"tool": "llama.cpp", "version": version, "scheme": f"{qtype} decode speed", "seed": None,
                       "tok_s": r.get("avg_ts"), "tok_s_stddev": r.get("stddev_ts"), "samples_ts": r.get("samples_ts"),
                       "n_gen": r.get("n_gen"), "threads": r.get("n_threads"), "cpu_info": r.get("cpu_info"),
                       "build_commit": r.get("build_commit"), "file_bytes": path.stat().st_size,
                       "bits_per_param_total": path.stat().st_size * 8 / N_PARAMS, "seconds": secs,
                       "loadavg": la, "loadavg_end": loadavg(), "uptime": up, "command": shlex.join(map(str, cmd))})

    # --- peakllm baseline ----------------------------------------------------------------------------
    def part_peakllm(self) -> None:
        import peakllm

        folder = self.out / "pk-w4g64"
        cmd = self.peakllm + ["quantize", "--method", "gptq", "--bits", "4", "--group-size", "64", "--sym",
                              "--calib-samples", "16", "--calib-seqlen", "512", "--seed", "0",
                              "--eval-tokens", str(self.args.eval_tokens), "--output", str(folder), "--json", "--overwrite"]
        la = loadavg()
        stdout, wall = run(cmd, log=self.out / "logs" / "peakllm-w4g64.log", env=self.env)
        res = last_json(stdout)
        weights = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
        folder_bytes = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip()
        self.emit({"tool": "peakllm", "version": f"{getattr(peakllm, '__version__', '?')} (git {commit})",
                   "scheme": "GPTQ W4 g64 sym (act-order static)", "seed": 0, "ppl": res.get("ppl"),
                   "dense_ppl": res.get("dense_ppl"), "file_bytes": weights, "bits_per_param_total": weights * 8 / N_PARAMS,
                   "folder_bytes": folder_bytes, "bytes_breakdown": safetensors_breakdown(folder),
                   "seconds": res.get("seconds"), "wall_seconds_with_eval": wall,
                   "loadavg": la, "loadavg_end": loadavg(), "command": shlex.join(["peakllm"] + cmd[3:]),
                   "result": {k: v for k, v in res.items() if k not in ("command",)}})


def llmc_worker(args) -> int:
    """Runs inside the llm-compressor venv: GPTQ with its defaults except the W4 g64 sym grid."""
    import hashlib

    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import compressed_tensors
    import llmcompressor
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    ids = np.load(args.segments).astype(np.int64)
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()})
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    recipe = GPTQModifier(
        targets="Linear", ignore=["lm_head"],
        config_groups={"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": args.group_size}}},
    )
    la = [round(x, 2) for x in os.getloadavg()]
    start = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=ids.shape[1], num_calibration_samples=ids.shape[0],
            shuffle_calibration_samples=False)
    seconds = time.perf_counter() - start
    observer = None
    for _, mod in model.named_modules():
        obs = getattr(mod, "weight_observer", None)
        if obs is not None:
            observer = type(obs).__name__
            break
    model.save_pretrained(args.output, save_compressed=True)
    tok.save_pretrained(args.output)
    cfg = json.loads((Path(args.output) / "config.json").read_text())
    try:
        recipe_text = recipe.model_dump(exclude_none=True)
    except Exception:  # noqa: BLE001 - best effort record
        recipe_text = str(recipe)
    print(json.dumps({
        "versions": f"llmcompressor {llmcompressor.__version__}, compressed-tensors {compressed_tensors.__version__}, "
                    f"transformers {transformers.__version__}, torch {torch.__version__}",
        "oneshot_seconds": seconds, "loadavg": la, "quantization_config": cfg.get("quantization_config"),
        "recipe": json.loads(json.dumps(recipe_text, default=str)),
        "weight_observer": observer or "memoryless_minmax (llmcompressor default for weights when observer is unset; "
                                       "observers are removed after calibration)",
        "calib_sha": hashlib.sha256(ids.tobytes()).hexdigest()[:16],
    }, default=str))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="llmc,gguf,speed,peakllm", help="comma-separated parts (default: %(default)s)")
    p.add_argument("--llama-cpp", default="/work/peers/llama.cpp", help="llama.cpp source tree with build/bin")
    p.add_argument("--llmc-venv", default="/work/peers/llmc-venv", help="venv with llmcompressor installed")
    p.add_argument("--out", default="/work/peers/out", help="folder for models and logs (outside the repo)")
    p.add_argument("--results", default=str(REPO / "docs" / "results" / "peers.jsonl"))
    p.add_argument("--seeds", default="0,1,2", help="calibration seeds for llm-compressor (default: %(default)s)")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--bench-threads", type=int, default=2, help="llama-bench -t (default: %(default)s)")
    p.add_argument("--bench-timeout", type=float, default=600,
                   help="seconds allowed per llama-bench run; llama.cpp's spinning threads crawl on an oversubscribed "
                   "machine (default: %(default)s)")
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "_llmc-worker":
        w = argparse.ArgumentParser()
        w.add_argument("_cmd")
        w.add_argument("--model", required=True)
        w.add_argument("--segments", required=True)
        w.add_argument("--output", required=True)
        w.add_argument("--group-size", type=int, default=64)
        return llmc_worker(w.parse_args(argv))
    args = p.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    parts = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(parts) - {"llmc", "gguf", "speed", "peakllm"}
    if unknown:
        p.error(f"unknown part(s) {sorted(unknown)}")
    bench = Bench(args)
    # check every tool a requested part needs before any work starts
    if {"gguf", "speed"} & set(parts):
        for name in LLAMA_BINS:
            bench.llama_bin(name)
    if "llmc" in parts:
        bench.venv_python()
    for part in ("gguf", "speed", "llmc", "peakllm"):
        if part in parts:
            getattr(bench, f"part_{part}")()
    return 0


if __name__ == "__main__":
    sys.exit(main())
