"""compressed-tensors folders from the command line: 2/3-bit export that plain transformers loads with exactly
peakllm's dequantized weights."""

import json

import pytest
import torch

from peakllm.cli import main
from peakllm.models import load_model

pytest.importorskip("compressed_tensors")

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run_json(capsys, *argv) -> dict:
    capsys.readouterr()
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def quantize(capsys, model_dir, text_file, out, fmt, *extra) -> dict:
    return run_json(capsys, "quantize", "--model", str(model_dir), "--calib-dataset", str(text_file),
                    "--calib-samples", "3", "--calib-seqlen", "32", "--eval-tokens", "0", "--output", str(out),
                    "--format", fmt, *extra)


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in LINEARS]


@pytest.mark.parametrize("extra", [("--bits", "3", "--group-size", "32"),
                                   ("--bits", "3", "--group-size", "16", "--sym"),
                                   ("--bits", "2", "--group-size", "-1", "--method", "rtn")])
def test_low_bit_export_loads_in_transformers_with_peakllm_weights(capsys, tmp_path, tiny_model_dir, text_file,
                                                                   extra):
    from transformers import AutoModelForCausalLM

    quantize(capsys, tiny_model_dir, text_file, tmp_path / "pk", "peakllm", *extra)
    result = quantize(capsys, tiny_model_dir, text_file, tmp_path / "ct", "compressed-tensors", *extra)
    assert result["format"] == "compressed-tensors"
    ours, _ = load_model(str(tmp_path / "pk"), packed="dequantize")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "ct", dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs(ids)  # compressed-tensors unpacks symmetric weights on the first forward pass
    names = linear_names(ours)
    assert len(names) == 14
    # the model is fp32, so the scales are stored in fp32: fp16-exact values, and (q - zero) * scale is exact
    for n in names:
        assert torch.equal(theirs.get_submodule(n).weight, ours.get_submodule(n).weight), n
