"""--max-memory as a promise: the in-memory path's peak predicted like the streamed one's, the path chosen on
predictions, a run that cannot fit refused before any work; predicted against measured peak in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peakllm import memory
from peakllm.cli import main

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """A random Llama whose weights (200 MB in fp32, 12 layers) dwarf the variation of a fresh process's RSS, so
    that holding it whole or one layer at a time differs by far more than the noise; stored in bf16."""
    from conftest import TINY_TEXT, tiny_llama_config, train_tiny_tokenizer
    from transformers import LlamaForCausalLM

    path = tmp_path_factory.mktemp("wide") / "model"
    torch.manual_seed(0)
    cfg = tiny_llama_config(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8,
                            num_key_value_heads=8, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    train_tiny_tokenizer().save_pretrained(path)
    (path.parent / "text.txt").write_text(TINY_TEXT * 4, encoding="utf-8")
    return path


def _peakllm(model: Path, out: Path, *extra: str) -> tuple[int, dict | None, str]:
    """peakllm quantize in a fresh process (its peak RSS is its own), RTN 4-bit, no evaluation."""
    text = model.parent / "text.txt"
    cmd = [sys.executable, "-m", "peakllm", "quantize", "--model", str(model), "--method", "rtn", "--bits", "4",
           "--group-size", "128", "--embed-bits", "keep", "--calib-dataset", str(text), "--eval-tokens", "0",
           "--output", str(out), "--overwrite", "--json", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else None
    return proc.returncode, result, proc.stderr


# Bounds, measured peak over predicted peak (both whole-process VmHWM, the interpreter and torch included): the
# prediction counts every phase's large tensors and none of the allocator's slack.
UNDER, OVER = 0.80, 1.10


def test_in_memory_and_streamed_predictions_bound_the_measured_peak_and_the_budget_is_kept(wide_dir, tmp_path):
    # under a budget: the budget's malloc settings (memory.mmap_threshold), which the prediction assumes
    code, mem, err = _peakllm(wide_dir, tmp_path / "mem", "--stream", "off", "--max-memory", "4GB")
    assert code == 0, err
    assert mem["streamed"] is False and mem["predicted_peak_phase"].startswith("loading")
    assert UNDER <= mem["peak_rss_bytes"] / mem["predicted_peak_rss_bytes"] <= OVER, mem
    # a budget under the in-memory peak (the fp32 model and the bf16 pages: 300 MB over a layer, which is what
    # streaming holds): auto streams, keeps the budget, and its own prediction bounds its peak
    budget = mem["predicted_peak_rss_bytes"] - (150 << 20)
    code, auto, err = _peakllm(wide_dir, tmp_path / "auto", "--max-memory", str(budget))
    assert code == 0, err
    assert auto["streamed"] is True and auto["in_memory_predicted_peak_rss_bytes"] > budget
    assert auto["peak_rss_bytes"] <= budget and auto["max_memory_bytes"] == budget
    assert UNDER <= auto["peak_rss_bytes"] / auto["predicted_peak_rss_bytes"] <= OVER, auto
    assert mem["predicted_peak_rss_bytes"] - auto["predicted_peak_rss_bytes"] > 200 << 20  # the model, less a layer

    # the same budget with --stream off: refused before any work, saying what would help
    code, _, err = _peakllm(wide_dir, tmp_path / "off", "--max-memory", str(budget), "--stream", "off")
    assert code == 2 and "in memory this run needs about" in err and "--stream on" in err, err
    assert not (tmp_path / "off").exists() and not list(tmp_path.glob(".off*"))


def test_a_budget_nothing_fits_is_refused_before_any_work(capsys, tmp_path, tiny_model_dir, text_file):
    code = main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--max-memory", "1MB",
                 "--calib-dataset", str(text_file), "--eval-dataset", str(text_file), "--eval-tokens", "0",
                 "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "budget" in err and "--max-memory" in err
    assert not (tmp_path / "out").exists()


def test_the_in_memory_result_reports_its_plan(capsys, monkeypatch, tmp_path, tiny_model_dir, text_file):
    monkeypatch.setattr(memory, "rss_bytes", lambda: 1 << 30)  # the process as it stands, fixed
    code = main(["quantize", "--model", str(tiny_model_dir), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--embed-bits", "keep", "--calib-dataset", str(text_file), "--eval-tokens", "0", "--stream", "off",
                 "--max-memory", "4GB", "--output", str(tmp_path / "out"), "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    h, i, v, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    linears = 2 * h * h + 2 * h * kv + 3 * h * i  # q, o; k, v; gate, up, down
    params = layers * (linears + 2 * h) + v * h + h  # tied lm_head once
    source = sum(f.stat().st_size for f in tiny_model_dir.glob("*.safetensors"))
    loading = 4 * params + source
    kept = int((1 + 8 / 32) * layers * linears)  # uint8 codes and fp32 scale + zero per 32 columns
    solve = 4 * 3 * h * i  # RTN: copies of the largest matrix (budget.layer_terms without a Hessian)
    writing = 4 * params + kept + int(1.1 * (4 * (params - layers * linears) + (4 + 0.5) / 8 * layers * linears))
    phases = {"loading (input pages + fp32 model)": loading, "largest decoder layer": 4 * params + kept + solve,
              "writing the output": writing}
    phase = max(phases, key=phases.get)
    assert result["streamed"] is False and result["predicted_peak_phase"] == phase
    assert result["predicted_peak_rss_bytes"] == (1 << 30) + phases[phase]
    assert result["max_memory_bytes"] == 4 << 30 and result["peak_rss_bytes"] > 0
