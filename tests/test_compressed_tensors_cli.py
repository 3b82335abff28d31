"""compressed-tensors folders from the command line: 2/3-bit export that plain transformers loads with exactly
peakllm's dequantized weights, and `peakllm info` counting logical parameters and stored bits of such folders
(peakllm's own and one written by compressed-tensors itself, the way llm-compressor saves)."""

import json
import math

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

    quantize(capsys, tiny_model_dir, text_file, tmp_path / "pk", "peakllm", "--embed-bits", "keep", *extra)
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


def ct_bits_per_param(shapes, bits: int, group_size: int, sym: bool, scale_bytes: int = 4) -> float:
    """Stored bits per weight of pack-quantized matrices, from the format's definition."""
    total = 0
    for out_f, in_f in shapes:
        groups = in_f // group_size
        total += out_f * math.ceil(in_f * bits / 32) * 4 + out_f * groups * scale_bytes + 16  # packed, scale, shape
        if not sym:
            total += math.ceil(out_f * bits / 32) * 4 * groups  # zero points packed down the rows
    return 8 * total / sum(o * i for o, i in shapes)


def test_info_on_peakllm_compressed_tensors_export(capsys, tmp_path, tiny_llama, tiny_model_dir, text_file):
    made = quantize(capsys, tiny_model_dir, text_file, tmp_path / "ct", "compressed-tensors", "--bits", "3",
                    "--group-size", "32", "--method", "rtn")
    info = run_json(capsys, "info", "--model", str(tmp_path / "ct"), "--layers")
    # quantize's JSON counts the bits the compressed-tensors files hold, as info reads them back
    assert made["bits_per_param"] == pytest.approx(info["bits_per_param"])
    assert made["bits_per_param_total"] == pytest.approx(info["bits_per_param_total"])
    shapes = [tuple(tiny_llama.get_submodule(n).weight.shape) for n in linear_names(tiny_llama)]
    assert info["parameters"] == sum(p.numel() for p in tiny_llama.parameters())  # tied lm_head once
    assert info["quantized_parameters"] == sum(o * i for o, i in shapes)
    assert info["compression"] == "compressed-tensors" and info["format"] == "pack-quantized"
    assert info["schemes"] == [{"num_bits": 3, "type": "int", "symmetric": False, "strategy": "group",
                                "group_size": 32, "actorder": None, "format": "pack-quantized", "modules": 14}]
    assert info["bits_per_param"] == pytest.approx(ct_bits_per_param(shapes, 3, 32, sym=False))
    weights = (tmp_path / "ct" / "model.safetensors").stat().st_size
    assert info["bits_per_param_total"] == pytest.approx(8 * weights / info["parameters"])
    rows = {r["name"]: r for r in info["modules"]}
    assert rows["model.layers.1.mlp.down_proj"]["shape"] == [64, 128]
    assert rows["model.layers.1.mlp.down_proj"]["kind"] == "int3 pack-quantized"
    assert rows["model.embed_tokens"]["kind"] == "dense"


@pytest.fixture
def compressor_written_folder(tmp_path, tiny_tokenizer):
    """A tiny untied Llama quantized W4 g32 symmetric with static act-order, compressed and saved by
    compressed-tensors' ModelCompressor (llm-compressor's save path): targets "Linear", ignore lm_head,
    weight_packed / weight_scale / weight_shape, config with the library's own fields and version."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                                 apply_quantization_config)
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).eval()
    dense_params = sum(p.numel() for p in model.parameters())
    weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=32,
                               actorder="static")
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}, ignore=["lm_head"],
        format="pack-quantized", quantization_status="frozen"))
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "weight_scale"):
                m.weight_scale.copy_(m.weight.reshape(m.weight.shape[0], -1, 32).abs().amax(-1) / 7)
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    out = tmp_path / "llmc"
    model.save_pretrained(out)
    compressor.update_config(str(out))
    tiny_tokenizer.save_pretrained(out)
    return out, dense_params


def test_info_on_a_folder_written_by_compressed_tensors(capsys, compressor_written_folder, text_file):
    folder, dense_params = compressor_written_folder
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"] and qc["ignore"] == ["lm_head"]
    info = run_json(capsys, "info", "--model", str(folder))
    assert info["parameters"] == dense_params  # not the int32 words: 4-bit codes, 8 to a word
    assert info["compression"] == "compressed-tensors"
    (scheme,) = info["schemes"]
    assert scheme == {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
                      "actorder": "static", "format": "pack-quantized", "modules": 14}
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)] * 2
    assert info["quantized_parameters"] == sum(o * i for o, i in shapes)
    assert info["bits_per_param"] == pytest.approx(ct_bits_per_param(shapes, 4, 32, sym=True))
    # and peakllm runs it: transformers unpacks it on load, quietly
    ppl = run_json(capsys, "eval", "--model", str(folder), "--dataset", str(text_file), "--max-tokens", "64",
                   "--seqlen", "32")
    assert math.isfinite(ppl["ppl"])


def test_info_refuses_a_packed_width_that_contradicts_weight_shape(capsys, tmp_path, tiny_model_dir, text_file):
    from safetensors.torch import load_file, save_file

    quantize(capsys, tiny_model_dir, text_file, tmp_path / "ct", "compressed-tensors", "--bits", "4",
             "--group-size", "32", "--method", "rtn", "--sym")
    path = tmp_path / "ct" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.0.mlp.up_proj.weight_shape"] = torch.tensor([128, 4096])
    save_file(tensors, path, metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["info", "--model", str(tmp_path / "ct")]) == 2
    assert "does not fit weight_packed" in capsys.readouterr().err
