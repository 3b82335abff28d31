import json

import pytest
import torch

from peakllm.cli import main
from peakllm.models import load_model


def quantize(tmp_path, model_dir, text_file, *extra):
    out = tmp_path / "q"
    code = main(["quantize", "--model", str(model_dir), "--calib-dataset", str(text_file), "--calib-samples", "3",
                 "--calib-seqlen", "32", "--eval-dataset", str(text_file), "--eval-tokens", "512", "--output", str(out),
                 "--json", *extra])
    return code, out


@pytest.mark.parametrize("extra", [("--bits", "3", "--group-size", "32"),
                                   ("--bits", "4", "--act-order", "--group-size", "16"),
                                   ("--bits", "2", "--method", "rtn", "--group-size", "-1"),
                                   ("--bits", "ternary", "--group-size", "64"),
                                   ("--bits", "3", "--group-size", "32", "--sym", "--rotate"),
                                   ("--target-bits", "3.0", "--target-grids", "2g32s,3g32,4g64s", "--rotate"),
                                   ("--target-bits", "2.6", "--method", "rtn")])
def test_quantize_writes_packed_folder_that_runs(capsys, tmp_path, tiny_model_dir, text_file, extra):
    code, out = quantize(tmp_path, tiny_model_dir, text_file, *extra)
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"method", "bits", "group_size", "ppl", "dense_ppl", "bits_per_param", "size_bytes", "dense_size_bytes",
            "seconds", "output"} <= result.keys()
    assert result["size_bytes"] < result["dense_size_bytes"]
    # the packed folder, run through the kernels, gives the perplexity measured on the in-memory model
    code = main(["eval", "--model", str(out), "--dataset", str(text_file), "--max-tokens", "512", "--json"])
    reloaded = json.loads(capsys.readouterr().out)
    assert code == 0 and reloaded["ppl"] == pytest.approx(result["ppl"], rel=1e-4)
    kernel_model, _ = load_model(str(out))
    deq_model, _ = load_model(str(out), packed="dequantize")
    ids = torch.randint(0, 300, (1, 8))
    with torch.no_grad():  # decode-sized inputs take the kernel path, not dequantize + GEMM
        a = kernel_model(input_ids=ids[:, :1]).logits
        b = deq_model(input_ids=ids[:, :1]).logits
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_packed_size_on_disk_matches_bits_per_param(capsys, tmp_path, tiny_model_dir, text_file):
    code, out = quantize(tmp_path, tiny_model_dir, text_file, "--bits", "4", "--group-size", "32")
    result = json.loads(capsys.readouterr().out)
    manifest = json.loads((out / "peakllm.json").read_text())
    n_params = sum(e["metadata"]["in_features"] * e["metadata"]["out_features"] for e in manifest["modules"].values())
    packed_bytes = result["bits_per_param"] * n_params / 8
    dense_bytes = sum(torch.Size(d["shape"]).numel() * (4 if d["dtype"] == "F32" else 2) for d in manifest["dense"].values())
    on_disk = (out / "model.safetensors").stat().st_size
    # everything in the file is accounted for except the safetensors JSON header
    assert packed_bytes + dense_bytes <= on_disk < packed_bytes + dense_bytes + 64 * 1024


@pytest.mark.parametrize("extra,message", [
    (("--bits", "5"), "invalid choice"),
    (("--bits", "ternary", "--format", "compressed-tensors"), "compressed-tensors"),
    (("--method", "rtn", "--act-order"), "act-order"),
    (("--group-size", "0"), "group_size"),
    (("--rotate", "--format", "compressed-tensors", "--embed-bits", "keep"), "--rotate applies"),
    (("--rotate", "--act-order", "group"), "--rotate applies"),
    (("--target-grids", "2g32s"), "target-grids is the choice"),
    (("--target-bits", "3", "--bits", "3"), "comes from --target-grids"),
    (("--target-bits", "3", "--target-grids", "9g32"), "BITSgGROUP"),
    (("--target-bits", "1.2"), "below what the candidate grids reach"),
    (("--matrix-grid", "down_proj=3g64", "--target-bits", "3"), "--matrix-grid sets"),
    (("--matrix-grid", "down_proj"), "PATTERN=GRID"),
    (("--matrix-grid", "down_proj=5g64"), "BITSgGROUP"),
    (("--matrix-grid", "(=3g64"), "--matrix-grid '(=3g64'"),
])
def test_quantize_bad_input(capsys, tmp_path, tiny_model_dir, text_file, extra, message):
    try:
        code, out = quantize(tmp_path, tiny_model_dir, text_file, *extra)
    except SystemExit as exc:  # argparse rejects choices itself
        code, out = exc.code, tmp_path / "q"
    err = capsys.readouterr().err
    assert code == 2 and message in err
    assert not out.exists()


def test_refuses_to_overwrite(capsys, tmp_path, tiny_model_dir, text_file):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "keep.txt").write_text("mine")
    code, out = quantize(tmp_path, tiny_model_dir, text_file, "--bits", "4")
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


def test_compressed_tensors_export_loads_in_plain_transformers(capsys, tmp_path, tiny_model_dir, text_file):
    from transformers import AutoModelForCausalLM

    code, out = quantize(tmp_path, tiny_model_dir, text_file, "--bits", "4", "--group-size", "32", "--sym",
                         "--format", "compressed-tensors")
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["format"] == "compressed-tensors" and result["act_order"] == "static"
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {g["weights"]["actorder"] for g in groups.values()} == {"static"}  # GPTQ's default, no g_idx
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    # peakllm's own view of the same quantization: a packed folder from the identical run (same seed)
    code, ours_dir = quantize(tmp_path / "again", tiny_model_dir, text_file, "--bits", "4", "--group-size", "32",
                              "--sym", "--embed-bits", "keep")  # compressed-tensors keeps the embedding dense
    capsys.readouterr()
    ours, _ = load_model(str(ours_dir), packed="dequantize")
    ids = torch.randint(0, 300, (1, 16))
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, ours(input_ids=ids).logits, atol=1e-4, rtol=1e-4)


def test_target_bits_allocation_is_what_the_folder_stores(capsys, tmp_path, tiny_model_dir, text_file):
    from peakllm.calibrate.intk_plan import intk_bytes, parse_grids

    code, out = quantize(tmp_path, tiny_model_dir, text_file, "--target-bits", "2.9", "--rotate",
                         "--target-grids", "2g32s,3g32,4g64s")
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert result["allocation_bytes"] <= result["allocation_budget_bytes"]
    assert len(result["allocation_counts"]) >= 2  # a mix, not one grid everywhere
    modules = json.loads((out / "peakllm.json").read_text())["modules"]
    stored = 0
    for name, grid in result["allocation"].items():
        meta = modules[name]["metadata"]
        (want,) = parse_grids(grid)
        assert (meta["bits"], meta["group_size"], meta["sym"]) == (want.bits, want.group_size, want.sym)
        assert meta["rotate_block"] == meta["in_features"]  # the tiny model's widths are powers of two
        stored += intk_bytes(want, (meta["out_features"], meta["in_features"]), True)
    assert stored == result["allocation_bytes"]
    # `info` shows the mix: matrices and parameters per grid, each grid's bits as stored
    assert main(["info", "--model", str(out), "--json"]) == 0
    grids = json.loads(capsys.readouterr().out)["intk_grids"]
    want_counts = {f"{g} rotated": n for g, n in result["allocation_counts"].items()}
    assert {g: s["matrices"] for g, s in grids.items()} == want_counts


def test_matrix_grid_rule_sets_the_grids_it_names(capsys, tmp_path, tiny_model_dir, text_file):
    code, out = quantize(tmp_path, tiny_model_dir, text_file, "--bits", "2", "--group-size", "32", "--mse",
                         "--rotate", "--matrix-grid", "(v|down)_proj=3g-1m", "--matrix-grid", "[qkv]_proj=4g16s")
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["matrix_grid"] == ["(v|down)_proj=3g-1m", "[qkv]_proj=4g16s"]
    modules = json.loads((out / "peakllm.json").read_text())["modules"]
    seen = set()
    for name, entry in modules.items():
        if "embed_tokens" in name or "lm_head" in name:
            continue
        meta = entry["metadata"]
        kind = name.rsplit(".", 1)[-1]
        want = {"v_proj": (3, -1, False), "down_proj": (3, -1, False), "q_proj": (4, 16, True),
                "k_proj": (4, 16, True)}.get(kind, (2, 32, False))  # the first matching rule wins; others: --bits
        assert (meta["bits"], meta["group_size"], meta["sym"]) == want, name
        seen.add(want)
    assert len(seen) == 3
