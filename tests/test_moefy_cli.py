"""`peakllm moefy`: writes a loadable MoE folder, reports JSON, and leaves nothing behind on error."""

from __future__ import annotations

import json

import pytest
import torch

from peakllm.cli import main


def moefy_args(model_dir, text_file, output, *extra, experts="4", top_k="2"):
    return ["moefy", "--model", str(model_dir), "--experts", experts, "--top-k", top_k, "--calib-samples", "4",
            "--calib-seqlen", "32", "--calib-dataset", str(text_file), "--output", str(output), *extra]


def test_cli_writes_loadable_folder(tmp_path, tiny_model_dir, text_file, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peakllm.models.moe import PeakMoeForCausalLM

    out = tmp_path / "moe"
    log = tmp_path / "log.jsonl"
    assert main(moefy_args(tiny_model_dir, text_file, out, "--json", "--log", str(log))) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["experts"] == 4 and result["top_k"] == 2 and result["calib_tokens"] == 4 * 32
    assert result["output"] == str(out) and result["ppl"] is None and result["seconds"] > 0
    assert json.loads(log.read_text())["command"] == "moefy"
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert isinstance(model, PeakMoeForCausalLM) and model.config.num_experts_per_tok == 2
    total = sum(p.numel() for p in model.parameters())
    experts = 2 * (4 * 2 * 32 * 64 + 4 * 64 * 32)  # 2 layers of 4 experts (128 neurons / 4): gate_up + down
    assert result["active_params_fraction"] == pytest.approx((total - experts * 2 / 4) / total)  # 2 of 4 run
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl", "moe", "text.txt", "tiny-llama"]  # no temp folder


def test_output_loads_with_load_model(tmp_path, tiny_model_dir, text_file):
    from peakllm.models import load_model
    from peakllm.models.moe import PeakMoeForCausalLM

    out = tmp_path / "moe"
    assert main(moefy_args(tiny_model_dir, text_file, out, "--json")) == 0
    model, tokenizer = load_model(str(out))
    assert isinstance(model, PeakMoeForCausalLM) and model.config.num_experts == 4
    ids = tokenizer("Sphinx of black quartz", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("experts,top_k,extra", [("3", "1", []), ("4", "5", []), ("4", "0", []),
                                                  ("4", "2", ["--eval-tokens", "-1"])])
def test_bad_arguments_leave_nothing(tmp_path, tiny_model_dir, text_file, capsys, experts, top_k, extra):
    out = tmp_path / "moe"
    assert main(moefy_args(tiny_model_dir, text_file, out, *extra, experts=experts, top_k=top_k)) == 2
    assert "error" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt", "tiny-llama"]


def test_existing_output_refused(tmp_path, tiny_model_dir, text_file, capsys):
    out = tmp_path / "moe"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(moefy_args(tiny_model_dir, text_file, out)) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_failed_save_leaves_no_temp_folder(tmp_path, tiny_model_dir, text_file, monkeypatch):
    from peakllm.errors import PeakError
    from peakllm.models.moe import PeakMoeForCausalLM

    def broken(self, *a, **k):
        raise PeakError("disk full (simulated)")

    monkeypatch.setattr(PeakMoeForCausalLM, "save_pretrained", broken)
    out = tmp_path / "moe"
    assert main(moefy_args(tiny_model_dir, text_file, out)) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt", "tiny-llama"]


def test_eval_tokens_reports_both_perplexities(tmp_path, tiny_model_dir, text_file, capsys):
    out = tmp_path / "moe"
    assert main(moefy_args(tiny_model_dir, text_file, out, "--json", "--eval-tokens", "512")) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["ppl"] > 1 and result["dense_ppl"] > 1
