"""`peakllm quantize --format gguf`: the decoder's matrices solved onto a llama.cpp block type and written as one
.gguf file, read back by the gguf library's own reader and transformers' GGUF loader; bad input is one error
before any work."""

import json

import gguf
import numpy as np
import pytest
import torch

from peakllm import models
from peakllm.cli import main
from peakllm.formats.gguf.blocks import unpack


def quantize_gguf(tmp_path, model_dir, text_file, *extra, name="out.gguf"):
    out = tmp_path / name
    argv = ["quantize", "--model", str(model_dir), "--format", "gguf", "--calib-dataset", str(text_file),
            "--calib-samples", "3", "--calib-seqlen", "32", "--eval-dataset", str(text_file), "--eval-tokens", "512",
            "--output", str(out), "--json", *extra]
    return out, main(argv)


@pytest.mark.parametrize("method,qtype", [("gptq", "Q4_0"), ("rtn", "Q5_1"), ("gptq", "IQ4_NL"), ("gptq", "Q8_0")])
def test_written_file_holds_the_solved_codes_and_loads_in_transformers(capsys, tmp_path, tiny_model_dir, text_file,
                                                                      method, qtype):
    out, code = quantize_gguf(tmp_path, tiny_model_dir, text_file, "--method", method, "--type", qtype)
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["type"] == qtype and result["format"] == "gguf"
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    matrices = [n for n in types if n.startswith("blk.") and n.endswith(".weight") and "norm" not in n]
    assert len(matrices) == 2 * 7 and all(types[n] == qtype for n in matrices)
    assert types["token_embd.weight"] == "Q8_0"  # Q6_K's blocks do not divide 64 columns: llama.cpp's fallback
    # the reported size is the file's, and bits/param over the matrices is the type's exact rate
    assert result["size_bytes"] == out.stat().st_size
    t = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    assert result["bits_per_param"] == pytest.approx(8 * t[1] / t[0])
    # transformers' GGUF loader gives the model whose perplexity the run reported
    assert main(["eval", "--model", str(out), "--dataset", str(text_file), "--max-tokens", "512", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] == pytest.approx(result["ppl"], rel=1e-4)


def test_stored_blocks_dequantize_to_the_weights_the_run_evaluated(capsys, tmp_path, tiny_model_dir, text_file):
    out, code = quantize_gguf(tmp_path, tiny_model_dir, text_file, "--type", "Q4_0")
    assert code == 0, capsys.readouterr().err
    loaded, _ = models.load_model(str(out))
    reader = gguf.GGUFReader(str(out))
    down = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    rows, cols = (int(d) for d in reversed(down.shape.tolist()))
    ours = unpack("Q4_0", np.asarray(down.data).reshape(rows, -1), (rows, cols)).dequantize()
    theirs = torch.from_numpy(gguf.quants.dequantize(down.data, down.tensor_type).reshape(rows, cols).copy())
    assert torch.equal(ours, theirs)
    assert torch.equal(loaded.model.layers[1].mlp.down_proj.weight.float(), theirs)


def test_gptq_beats_rtn_on_the_same_block_type(capsys, tmp_path, tiny_model_dir, text_file):
    ppl = {}
    for method in ("rtn", "gptq"):
        out, code = quantize_gguf(tmp_path, tiny_model_dir, text_file, "--method", method, "--type", "Q4_0",
                                  "--embed-bits", "keep", name=f"{method}.gguf")
        assert code == 0, capsys.readouterr().err
        ppl[method] = json.loads(capsys.readouterr().out)["ppl"]
    assert ppl["gptq"] < ppl["rtn"]


@pytest.mark.parametrize("extra,message", [
    (["--type", "Q4_Z"], "unknown GGUF type or preset"),
    (["--bits", "3"], "do not apply to --format gguf"),
    (["--embed-bits", "8"], "--embed-type"),
    (["--act-order", "group"], "do not apply to --format gguf"),
    (["--sink-weight", "0"], "--sink-weight must be above 0"),
])
def test_bad_options_are_one_error_before_any_work(capsys, tmp_path, tiny_model_dir, text_file, extra, message):
    out, code = quantize_gguf(tmp_path, tiny_model_dir, text_file, *extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("error:") == 1
    assert not out.exists() and list(tmp_path.glob("*.gguf*")) == []


def test_output_must_be_a_gguf_file_and_is_not_clobbered(capsys, tmp_path, tiny_model_dir, text_file):
    _, code = quantize_gguf(tmp_path, tiny_model_dir, text_file, name="folder")
    assert code == 2 and "ending in .gguf" in capsys.readouterr().err
    existing = tmp_path / "out.gguf"
    existing.write_bytes(b"mine")
    _, code = quantize_gguf(tmp_path, tiny_model_dir, text_file)
    assert code == 2 and "already exists" in capsys.readouterr().err and existing.read_bytes() == b"mine"
    _, code = quantize_gguf(tmp_path, tiny_model_dir, text_file, "--overwrite")
    assert code == 0 and existing.read_bytes()[:4] == b"GGUF"


def test_type_without_gguf_format_is_refused(capsys, tmp_path, tiny_model_dir, text_file):
    assert main(["quantize", "--model", str(tiny_model_dir), "--type", "Q4_0", "--output", str(tmp_path / "o")]) == 2
    assert "add --format gguf" in capsys.readouterr().err


@pytest.mark.parametrize("method,qtype", [("sparsegpt", "Q4_0"), ("wanda", "Q4_1")])
def test_prune_then_round_onto_a_block_type_keeps_zeros_where_the_type_can(capsys, tmp_path, tiny_model_dir, text_file,
                                                                          method, qtype):
    """prune --format gguf: every decoder matrix is half zeros on Q4_0 (a zero level), as --help says; on Q4_1
    (w = d*q - m) the pruned weights become their blocks' grid points nearest 0, few of them 0."""
    out = tmp_path / "pruned.gguf"
    code = main(["prune", "--model", str(tiny_model_dir), "--method", method, "--sparsity", "0.5", "--format", "gguf",
                 "--type", qtype, "--calib-dataset", str(text_file), "--calib-samples", "3", "--calib-seqlen", "32",
                 "--eval-tokens", "0", "--output", str(out), "--json"])
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["sparsity"] == pytest.approx(0.5) and result["zeros_exact"] is (qtype == "Q4_0")
    matrices = [t for t in gguf.GGUFReader(str(out)).tensors if t.name.startswith("blk.") and "norm" not in t.name]
    assert len(matrices) == 14 and all(t.tensor_type.name == qtype for t in matrices)
    for t in matrices:
        zeros = float((gguf.quants.dequantize(t.data, t.tensor_type) == 0).mean())
        assert zeros >= 0.5 if qtype == "Q4_0" else zeros < 0.25, (t.name, zeros)


@pytest.mark.parametrize("extra,message", [(["--bits", "4"], "do not apply to --format gguf"),
                                           (["--type", "Q4_0"], "add --format gguf"),
                                           (["--embed-type", "Q9"], "unknown GGUF block type")])
def test_bad_prune_gguf_options_are_one_error_before_any_work(capsys, tmp_path, tiny_model_dir, text_file, extra, message):
    fmt = [] if "--type" in extra else ["--format", "gguf"]
    code = main(["prune", "--model", str(tiny_model_dir), *fmt, *extra, "--calib-dataset", str(text_file),
                 "--output", str(tmp_path / "x.gguf")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("error:") == 1
    assert list(tmp_path.glob("*.gguf*")) == []
