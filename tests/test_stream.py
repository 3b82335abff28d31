"""Streamed compression and evaluation (models bigger than memory) against the in-memory path, on tiny
random models of real families written by `synthesize` as sharded safetensors folders."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peakllm.cli import main
from peakllm import memory
from peakllm.errors import PeakError


def _synth(tmp_path, tokenizer, shape="tiny-llama", dtype=torch.float32, name="src"):
    from peakllm.models.synth import synthesize

    out = tmp_path / name
    synthesize(shape, out, tokenizer=tokenizer, dtype=dtype, progress=False)
    return out


@pytest.fixture
def llama_dir(tmp_path, tiny_tokenizer):
    return _synth(tmp_path, tiny_tokenizer)


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()


def _run(command, model, out, text_file, *extra, capsys=None):
    code = main([command, "--model", str(model), "--calib-dataset", str(text_file), "--calib-samples", "3",
                 "--calib-seqlen", "32", "--batch-size", "2", "--eval-dataset", str(text_file), "--eval-tokens", "512",
                 "--output", str(out), "--json", *extra])
    result = json.loads(capsys.readouterr().out) if capsys is not None and code == 0 else None
    return code, result


CASES = [
    ("quantize", "peakllm", ("--method", "gptq", "--bits", "4", "--group-size", "32")),
    ("quantize", "peakllm", ("--method", "gptq", "--bits", "3", "--group-size", "16", "--act-order")),
    ("quantize", "peakllm", ("--method", "rtn", "--bits", "ternary", "--group-size", "-1")),
    ("quantize", "peakllm", ("--method", "gptq", "--bits", "4", "--group-size", "32", "--embed-bits", "4",
                             "--embed-group-size", "16", "--act-order", "none")),
    ("quantize", "compressed-tensors", ("--method", "gptq", "--bits", "4", "--group-size", "32", "--sym")),
    ("prune", "hf", ("--method", "sparsegpt", "--sparsity", "0.5")),
    ("prune", "peakllm", ("--method", "wanda", "--pattern", "2:4")),
    ("prune", "peakllm", ("--method", "magnitude", "--sparsity", "0.6")),
    ("prune", "peakllm", ("--method", "sparsegpt", "--pattern", "2:4", "--bits", "4", "--group-size", "32")),
    ("prune", "hf", ("--method", "sparsegpt", "--sparsity", "0.6", "--owl")),
]


@pytest.mark.parametrize("command,fmt,extra", CASES)
def test_streamed_output_equals_in_memory_bit_for_bit(capsys, tmp_path, llama_dir, text_file, command, fmt, extra):
    args = (*extra, "--format", fmt)
    code, mem = _run(command, llama_dir, tmp_path / "mem", text_file, *args, "--stream", "off", capsys=capsys)
    assert code == 0
    code, streamed = _run(command, llama_dir, tmp_path / "str", text_file, *args, "--stream", "on", capsys=capsys)
    assert code == 0 and streamed["streamed"] is True
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert set(a) == set(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name
    assert streamed["ppl"] == mem["ppl"] and streamed["dense_ppl"] == mem["dense_ppl"]
    assert streamed.get("bits_per_param") == mem.get("bits_per_param")
    assert streamed.get("sparsity") == pytest.approx(mem.get("sparsity")) if "sparsity" in mem else True
    assert len(list((tmp_path / "str").glob("model-*-of-*.safetensors"))) == 4  # 3 layers + the rest
    assert not list(tmp_path.glob(".*partial*"))


@pytest.mark.parametrize("command,extra", [("quantize", ("--method", "gptq", "--type", "Q4_0")),
                                           ("quantize", ("--method", "rtn", "--type", "Q4_K_M"))])
def test_streamed_gguf_is_the_in_memory_file_byte_for_byte(capsys, tmp_path, llama_dir, text_file, command, extra):
    """The layers go to their offsets in the one .gguf file as they are solved, the embedding last."""
    runs = {}
    for mode in ("off", "on"):
        code, runs[mode] = _run(command, llama_dir, tmp_path / f"{mode}.gguf", text_file, *extra, "--format", "gguf",
                                "--stream", mode, capsys=capsys)
        assert code == 0
    assert runs["on"]["streamed"] is True
    assert (tmp_path / "on.gguf").read_bytes() == (tmp_path / "off.gguf").read_bytes()
    for key in ("ppl", "dense_ppl", "bits_per_param", "bits_per_param_total", "size_bytes", "gguf_tensor_types"):
        assert runs["on"][key] == runs["off"][key], key
    assert sorted(p.name for p in tmp_path.iterdir() if "gguf" in p.name) == ["off.gguf", "on.gguf"]


def test_streamed_experts_are_held_packed_until_their_layer_is_written(monkeypatch, capsys, tmp_path, tiny_tokenizer,
                                                                       text_file):
    """A streamed run keeps each expert's packed form only, as it keeps every other matrix's: the full results
    (dense fp32 weight and codes) of an OLMoE layer's 128 experts held 1.9 GB until the layer was written."""
    from peakllm.calibrate import stream as calibrate_stream

    seen = []
    done = calibrate_stream.StreamIO.done

    def spy(self, li, layer, acts, report):
        seen.append({type(r).__name__ for n, r in report.modules.items() if ".experts." in n})
        return done(self, li, layer, acts, report)

    monkeypatch.setattr(calibrate_stream.StreamIO, "done", spy)
    src = _synth(tmp_path, tiny_tokenizer, "tiny-olmoe")
    code, _ = _run("quantize", src, tmp_path / "str", text_file, "--method", "gptq", "--bits", "4", "--group-size",
                   "32", "--stream", "on", "--eval-tokens", "0", capsys=capsys)
    assert code == 0 and len(seen) >= 2 and all(s == {"_Kept"} for s in seen), seen


@pytest.mark.parametrize("extra", [("--method", "gptq", "--bits", "4", "--group-size", "32"),
                                   ("--method", "gptq", "--bits", "ternary", "--group-size", "-1", "--format", "sub1",
                                    "--dense-bits", "4")])
def test_streamed_moe_experts_equal_in_memory(capsys, tmp_path, tiny_tokenizer, text_file, extra):
    src = _synth(tmp_path, tiny_tokenizer, "tiny-olmoe")
    code, mem = _run("quantize", src, tmp_path / "mem", text_file, *extra, "--stream", "off", capsys=capsys)
    assert code == 0
    code, streamed = _run("quantize", src, tmp_path / "str", text_file, *extra, "--stream", "on", capsys=capsys)
    assert code == 0
    a, b = _tensors(tmp_path / "mem"), _tensors(tmp_path / "str")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert any(".experts.gate_up_proj.3." in n for n in b)
    assert streamed["ppl"] == mem["ppl"] and streamed["expert_tokens_min"] == mem["expert_tokens_min"]
    for key in ("bits_per_param", "bits_per_param_experts"):
        assert streamed[key] == mem[key]
    from peakllm.formats.writer import weight_file_bytes

    # the same parameters over each folder's own bytes (shard headers and the index differ from one header)
    params = 8 * weight_file_bytes(tmp_path / "mem") / mem["bits_per_param_total"]
    assert streamed["bits_per_param_total"] == pytest.approx(8 * weight_file_bytes(tmp_path / "str") / params)
    assert not (tmp_path / "str" / ".sub1").exists()


def test_sharded_peakllm_folder_runs_like_the_single_file_one(capsys, tmp_path, llama_dir, text_file):
    from peakllm.models import load_model

    extra = ("--method", "gptq", "--bits", "4", "--group-size", "32")
    assert _run("quantize", llama_dir, tmp_path / "mem", text_file, *extra, "--stream", "off", capsys=capsys)[0] == 0
    assert _run("quantize", llama_dir, tmp_path / "str", text_file, *extra, "--stream", "on", capsys=capsys)[0] == 0
    m1, _ = load_model(str(tmp_path / "mem"))
    m2, _ = load_model(str(tmp_path / "str"))
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.equal(m1(input_ids=ids).logits, m2(input_ids=ids).logits)


def test_streamed_eval_equals_in_memory(capsys, llama_dir, text_file):
    ppl = {}
    for mode in ("off", "on"):
        assert main(["eval", "--model", str(llama_dir), "--dataset", str(text_file), "--max-tokens", "1024",
                     "--seqlen", "128", "--stream", mode, "--json"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["streamed"] is (mode == "on")
        ppl[mode] = result["ppl"]
    assert ppl["on"] == ppl["off"]


def _cli(args, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "peakllm", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.subprocess
@pytest.mark.parametrize("kill_after", [0, 1])
def test_sigkill_then_resume_gives_identical_files(tmp_path, llama_dir, text_file, kill_after):
    common = ["quantize", "--model", str(llama_dir), "--method", "gptq", "--bits", "4", "--group-size", "32",
              "--calib-dataset", str(text_file), "--calib-samples", "3", "--calib-seqlen", "32",
              "--eval-dataset", str(text_file), "--eval-tokens", "512", "--stream", "on", "--threads", "1", "--json"]
    whole = _cli(common + ["--output", str(tmp_path / "whole")])
    assert whole.returncode == 0, whole.stderr
    killed = _cli(common + ["--output", str(tmp_path / "run")], {"PEAKLLM_KILL_AFTER_LAYER": str(kill_after)})
    assert killed.returncode == -9
    assert not (tmp_path / "run").exists() and (tmp_path / ".run.partial" / ".resume" / "state.json").is_file()
    again = _cli(common + ["--output", str(tmp_path / "run")])  # without --resume: refused, nothing touched
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = _cli(common + ["--output", str(tmp_path / "run"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)
    assert result["resumed_at_layer"] == kill_after + 1
    assert result["ppl"] == json.loads(whole.stdout)["ppl"]
    assert _digest(tmp_path / "run") == _digest(tmp_path / "whole")
    assert not (tmp_path / ".run.partial").exists()


@pytest.mark.subprocess
def test_sigkill_then_resume_gives_the_in_memory_gguf_file(capsys, tmp_path, llama_dir, text_file):
    common = ["quantize", "--model", str(llama_dir), "--method", "gptq", "--format", "gguf", "--type", "Q4_0",
              "--calib-dataset", str(text_file), "--calib-samples", "3", "--calib-seqlen", "32", "--eval-tokens", "0",
              "--threads", "1", "--json"]
    assert main(common + ["--stream", "off", "--output", str(tmp_path / "whole.gguf")]) == 0
    killed = _cli(common + ["--stream", "on", "--output", str(tmp_path / "run.gguf")],
                  {"PEAKLLM_KILL_AFTER_LAYER": "1"})
    assert killed.returncode == -9
    assert not (tmp_path / "run.gguf").exists() and (tmp_path / ".run.gguf.partial" / "run.gguf.tmp").is_file()
    capsys.readouterr()
    assert main(common + ["--stream", "on", "--output", str(tmp_path / "run.gguf"), "--resume"]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_at_layer"] == 2
    assert (tmp_path / "run.gguf").read_bytes() == (tmp_path / "whole.gguf").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if "gguf" in p.name) == ["run.gguf", "whole.gguf"]


@pytest.mark.subprocess
def test_resume_refuses_changed_arguments_and_changed_input(tmp_path, llama_dir, text_file):
    common = ["quantize", "--model", str(llama_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
              "--eval-tokens", "0", "--stream", "on", "--threads", "1", "--output", str(tmp_path / "run")]
    assert _cli(common, {"PEAKLLM_KILL_AFTER_LAYER": "0"}).returncode == -9
    changed = _cli([a if a != "4" else "8" for a in common] + ["--resume"])
    assert changed.returncode == 2 and "bits" in changed.stderr
    shard = sorted(llama_dir.glob("model-*.safetensors"))[1]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    moved = _cli(common + ["--resume"])
    assert moved.returncode == 2 and "changed" in moved.stderr
    assert _cli(common + ["--overwrite"]).returncode == 0  # starting again is allowed


def _snapshot(folder: Path) -> dict:
    return {f.name: f.read_bytes() for f in folder.iterdir()}


@pytest.mark.parametrize("damage", ["missing shard", "corrupt index", "truncated shard", "wrong shape"])
def test_bad_input_fails_before_work_and_leaves_nothing(capsys, tmp_path, llama_dir, text_file, damage):
    shards = sorted(llama_dir.glob("model-*.safetensors"))
    index = llama_dir / "model.safetensors.index.json"
    if damage == "missing shard":
        shards[1].unlink()
    elif damage == "corrupt index":
        index.write_text("{not json")
    elif damage == "truncated shard":
        data = shards[2].read_bytes()
        shards[2].write_bytes(data[: len(data) - 100])
    else:
        cfg = json.loads((llama_dir / "config.json").read_text())
        cfg["intermediate_size"] = 96
        (llama_dir / "config.json").write_text(json.dumps(cfg))
    before = _snapshot(llama_dir)
    code, _ = _run("quantize", llama_dir, tmp_path / "out", text_file, "--bits", "4", "--group-size", "32",
                   "--stream", "on")
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert _snapshot(llama_dir) == before


def test_memory_budget_too_small_is_refused_up_front(capsys, tmp_path, llama_dir, text_file):
    code, _ = _run("quantize", llama_dir, tmp_path / "out", text_file, "--bits", "4", "--group-size", "32",
                   "--stream", "on", "--max-memory", "50MB")
    err = capsys.readouterr().err
    assert code == 2 and "budget" in err and "--max-memory" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_not_enough_disk_for_the_output_is_refused_up_front(capsys, monkeypatch, tmp_path, llama_dir, text_file):
    import shutil

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    before = _snapshot(llama_dir)
    code, _ = _run("prune", llama_dir, tmp_path / "out", text_file, "--method", "sparsegpt", "--stream", "on")
    err = capsys.readouterr().err
    assert code == 2 and "free disk" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    assert _snapshot(llama_dir) == before


def test_prediction_and_peak_are_reported(capsys, monkeypatch, tmp_path, llama_dir, text_file):
    base = 1 << 30  # the process as it stands, fixed so the prediction is exact
    monkeypatch.setattr(memory, "rss_bytes", lambda: base)
    code, result = _run("quantize", llama_dir, tmp_path / "out", text_file, "--bits", "4", "--group-size", "32",
                        "--stream", "on", "--max-memory", "8GB", capsys=capsys)
    assert code == 0
    assert result["max_memory_bytes"] == 8 << 30 and result["peak_rss_bytes"] <= 8 << 30
    # The prediction by hand from the shapes: GPTQ on 3 x 32 calibration tokens in batches of 2, 512 eval tokens.
    cfg = json.loads((llama_dir / "config.json").read_text())
    h, i, v, kv = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], 2 * 16
    assert (h, i, cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["tie_word_embeddings"]) == (
        64, 128, 4, 2, False)
    acts, eval_acts = 4 * 3 * 32 * h, 2 * 4 * 512 * h  # fp32 calibration and (dense + compressed) eval activations
    common = 2 * acts + eval_acts  # calibration activations of the current and the next layer
    params = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h  # q, o; k, v; gate, up, down; two norms
    hessians = 4 * max(3 * h * h, i * i)  # q/k/v/gate/up share an input width (at most 3 held), down its own
    forward = 4 * 64 * (3 * i + 4 * i) + 4 * 2 * 4 * 32 * 32  # 64 tokens a batch through the widest matmuls; scores
    solve = 4 * max(4 * h * h + 3 * h * i, 4 * i * i + 3 * i * h)  # H, its copies and W for the biggest matrix
    embed = 4 * v * h  # the input embedding, read before capture and held to the end
    rounding = 5 * v * h  # --embed-bits 8 (the default): an fp32 copy and uint8 codes of one outer matrix
    phases = {
        "capture (embedding in fp32)": common + embed + rounding,
        "largest decoder layer": common + embed + 4 * params + max(4 * params, hessians + forward, hessians + solve),
        "the rest (embedding, norm, lm_head in fp32) written last": common + 4 * (2 * v * h + h) + 3 * 4 * 512 * v
        + rounding + 2 * v * h * (1 + 8 // 8),  # both outer matrices' codes and their packed int8 bytes
        "evaluation head (norm + lm_head fp32, logits)": eval_acts + 4 * v * h + 3 * 4 * 512 * v,
    }
    phase = max(phases, key=phases.get)
    assert result["predicted_peak_phase"] == phase
    assert result["predicted_peak_rss_bytes"] == base + phases[phase]


def test_parse_size():
    from peakllm.memory import parse_size

    assert parse_size("4GB") == 4 << 30 and parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000
    for bad in ("four", "-1GB", "3XB", "0"):
        with pytest.raises(PeakError):
            parse_size(bad)


def test_synth_checks_disk_before_writing(monkeypatch, tmp_path, tiny_tokenizer):
    import shutil

    from peakllm.models.synth import synthesize

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(PeakError, match="on disk"):
        synthesize("tiny-llama", tmp_path / "m", tokenizer=tiny_tokenizer, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_synth_writes_a_loadable_sharded_model_of_the_shape(tmp_path, tiny_tokenizer):
    from peakllm.models import load_model
    from peakllm.models.synth import SHAPES, synthesize

    info = synthesize("tiny-olmoe", tmp_path / "m", tokenizer=tiny_tokenizer, dtype=torch.bfloat16, progress=False)
    model, _ = load_model(str(tmp_path / "m"))
    cfg = SHAPES["tiny-olmoe"][1]
    assert model.config.num_experts == cfg["num_experts"] and model.config.hidden_size == cfg["hidden_size"]
    assert info["params"] == sum(p.numel() for p in model.parameters()) and info["random_weights"]
    assert info["shards"] == cfg["num_hidden_layers"] + 1
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["random_weights"] == "true"
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["architectures"] == ["OlmoeForCausalLM"]  # what vLLM and transformers dispatch on


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.subprocess
@pytest.mark.parametrize("stream", ["on", "off"])
def test_two_torchrun_workers_give_the_one_process_tensors(tmp_path, tiny_tokenizer, text_file, stream):
    src = _synth(tmp_path, tiny_tokenizer, "tiny-olmoe")
    args = ["quantize", "--model", str(src), "--method", "gptq", "--bits", "4", "--group-size", "32",
            "--calib-dataset", str(text_file), "--calib-samples", "3", "--calib-seqlen", "32", "--eval-tokens", "0",
            "--threads", "1", "--stream", stream, "--json"]
    one = _cli(args + ["--output", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(_free_port()), "-m", "peakllm", *args,
                          "--output", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr
    assert len([line for line in two.stdout.splitlines() if line.startswith("{")]) == 1  # worker 0 reports
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.slow
@pytest.mark.parametrize("command,extra", [
    ("quantize", ("--method", "gptq", "--bits", "4", "--group-size", "64", "--format", "peakllm")),
    ("prune", ("--method", "wanda", "--sparsity", "0.5", "--format", "hf")),  # SparseGPT: tiny models above
])
def test_default_model_streamed_equals_in_memory(capsys, tmp_path, command, extra):
    """The real 135M model: streamed and in-memory runs give the same tensors and the same perplexities."""
    results = {}
    for mode in ("off", "on"):
        code = main([command, "--model", "default", *extra, "--calib-samples", "2", "--calib-seqlen", "128",
                     "--eval-tokens", "1024", "--output", str(tmp_path / mode), "--stream", mode, "--json"])
        assert code == 0
        results[mode] = json.loads(capsys.readouterr().out)
    a, b = _tensors(tmp_path / "off"), _tensors(tmp_path / "on")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a)
    assert results["on"]["ppl"] == results["off"]["ppl"]
    assert results["on"]["dense_ppl"] == results["off"]["dense_ppl"]


def test_a_budget_fixes_the_mmap_threshold_unless_told_otherwise(monkeypatch):
    """Under an explicit --max-memory a streamed run fixes malloc's mmap threshold (1 MiB); the environment
    variable overrides either way, 0 leaves glibc's, and a malformed value is one clear error."""
    monkeypatch.delenv(memory.MMAP_THRESHOLD_ENV, raising=False)
    assert memory.mmap_threshold(budget=True) == memory.BUDGET_MMAP_THRESHOLD == 1 << 20
    assert memory.mmap_threshold(budget=False) == 0
    monkeypatch.setenv(memory.MMAP_THRESHOLD_ENV, "0")
    assert memory.mmap_threshold(budget=True) == 0
    monkeypatch.setenv(memory.MMAP_THRESHOLD_ENV, "4194304")
    assert memory.mmap_threshold(budget=False) == 4194304
    monkeypatch.setenv(memory.MMAP_THRESHOLD_ENV, "4MB")
    with pytest.raises(PeakError, match="PEAKLLM_MMAP_THRESHOLD"):
        memory.release_free_heap(setup=True, budget=True)
