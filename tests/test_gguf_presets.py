"""llama-quantize's presets by GGUF tensor name (the cases llama_tensor_get_type spells out), --tensor-type
overrides, and the --target-bits allocation: its solver never exceeds the size, and a written file holds the
types the run reported, at or under the target."""

import itertools
import json
import random

import gguf
import pytest
import torch

from peakllm.cli import main
from peakllm.errors import PeakError
from peakllm.formats.gguf.presets import ModelShape, parse_overrides, preset_types, use_more_bits
from peakllm.solvers.allocate import allocate, hull, type_losses


def llama_tensors(n_layer, hidden, ff, kv_rows=None, *, tied=True, qkv=False):
    """GGUF name -> (rows, cols) of a llama-shaped model, in a shuffled order (the rules sort them as llama.cpp)."""
    kv_rows = kv_rows or hidden
    t = {"token_embd.weight": (1000, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        t["output.weight"] = (1000, hidden)
    for i in range(n_layer):
        b = f"blk.{i}."
        attn = {"attn_qkv.weight": (hidden + 2 * kv_rows, hidden)} if qkv else {
            "attn_q.weight": (hidden, hidden), "attn_k.weight": (kv_rows, hidden), "attn_v.weight": (kv_rows, hidden)}
        for k, v in {**attn, "attn_output.weight": (hidden, hidden), "ffn_gate.weight": (ff, hidden),
                     "ffn_up.weight": (ff, hidden), "ffn_down.weight": (hidden, ff), "attn_norm.weight": (hidden,),
                     "ffn_norm.weight": (hidden,)}.items():
            t[b + k] = v
    items = list(t.items())
    random.Random(0).shuffle(items)
    return dict(items)


def per_layer(types, kind, n_layer):
    return [types[f"blk.{i}.{kind}.weight"] for i in range(n_layer)]


N = 16  # layers: use_more_bits picks 0, 1, 4, 7, 10, 13, 14, 15
SHAPE = ModelShape(N, 8, 8)  # no GQA


def test_use_more_bits_is_llamacpps_layer_choice():
    assert [i for i in range(N) if use_more_bits(i, N)] == [0, 1, 4, 7, 10, 13, 14, 15]


def test_q4_k_m_attn_v_and_ffn_down_in_q6_k_on_the_layers_it_names():
    types = preset_types("Q4_K_M", llama_tensors(N, 256, 512), SHAPE)
    more = ["Q6_K" if use_more_bits(i, N) else "Q4_K" for i in range(N)]
    assert per_layer(types, "attn_v", N) == more and per_layer(types, "ffn_down", N) == more
    assert set(per_layer(types, "attn_q", N) + per_layer(types, "ffn_up", N)) == {"Q4_K"}
    assert types["token_embd.weight"] == "Q6_K"  # tied: token_embd takes the output's rule
    assert "output_norm.weight" not in types and "blk.0.attn_norm.weight" not in types
    untied = preset_types("Q4_K_M", llama_tensors(N, 256, 512, tied=False), SHAPE)
    assert untied["token_embd.weight"] == "Q4_K" and untied["output.weight"] == "Q6_K"


@pytest.mark.parametrize("preset,attn_v,ffn_down,attn_output,rest", [
    ("Q3_K_M", ["Q5_K"] * 2 + ["Q4_K"] * 14, ["Q5_K"] + ["Q4_K"] * 15, "Q4_K", "Q3_K"),
    ("Q3_K_L", ["Q5_K"] * 16, ["Q5_K"] * 16, "Q5_K", "Q3_K"),
    ("Q3_K_S", ["Q3_K"] * 16, ["Q3_K"] * 16, "Q3_K", "Q3_K"),
    ("Q4_K_S", ["Q5_K"] * 4 + ["Q4_K"] * 12, ["Q5_K"] * 2 + ["Q4_K"] * 14, "Q4_K", "Q4_K"),
    ("Q2_K", ["Q3_K"] * 16, ["Q3_K"] * 16, "Q3_K", "Q2_K"),
    ("Q4_0", ["Q4_0"] * 16, ["Q4_1"] * 2 + ["Q4_0"] * 14, "Q4_0", "Q4_0"),  # with an imatrix
    ("Q5_0", ["Q5_0"] * 16, ["Q5_1"] * 2 + ["Q5_0"] * 14, "Q5_0", "Q5_0"),
    ("Q5_K_S", ["Q5_K"] * 16, ["Q5_K"] * 16, "Q5_K", "Q5_K"),
    ("Q6_K", ["Q6_K"] * 16, ["Q6_K"] * 16, "Q6_K", "Q6_K"),
])
def test_presets_layer_rules(preset, attn_v, ffn_down, attn_output, rest):
    types = preset_types(preset, llama_tensors(N, 256, 512), SHAPE)
    assert per_layer(types, "attn_v", N) == attn_v and per_layer(types, "ffn_down", N) == ffn_down
    assert set(per_layer(types, "attn_output", N)) == {attn_output}
    assert set(per_layer(types, "attn_q", N) + per_layer(types, "ffn_gate", N)) == {rest}


def test_gqa_expert_imatrix_and_70b_cases():
    t = llama_tensors(N, 256, 512, kv_rows=64)
    assert set(per_layer(preset_types("Q2_K", t, ModelShape(N, 8, 2)), "attn_v", N)) == {"Q4_K"}  # GQA 4
    assert per_layer(preset_types("IQ4_NL", t, ModelShape(N, 8, 2)), "attn_v", N) == ["Q5_K"] * N
    no_imatrix = preset_types("IQ4_NL", t, ModelShape(N, 8, 4), imatrix=False)
    assert per_layer(no_imatrix, "ffn_down", N) == ["Q5_K"] * 2 + ["IQ4_NL"] * 14
    assert per_layer(preset_types("Q4_0", t, SHAPE, imatrix=False), "ffn_down", N) == ["Q4_0"] * N
    experts = preset_types("Q4_K_M", t, ModelShape(N, 8, 8, n_expert=8))
    assert set(per_layer(experts, "attn_v", N) + per_layer(experts, "attn_k", N)) == {"Q8_0"}
    assert set(per_layer(experts, "attn_output", N)) == {"Q5_K"}
    seventy = preset_types("Q3_K_S", llama_tensors(80, 256, 512, kv_rows=64), ModelShape(80, 8, 1))
    assert set(per_layer(seventy, "attn_v", 80)) == {"Q5_K"}


def test_fused_qkv_takes_attn_vs_rules():
    types = preset_types("Q4_K_M", llama_tensors(N, 256, 512, qkv=True), SHAPE)
    assert per_layer(types, "attn_qkv", N) == ["Q6_K" if use_more_bits(i, N) else "Q4_K" for i in range(N)]


def test_widths_a_type_cannot_take_fall_back_and_output_goes_q8_0():
    types = preset_types("Q4_K_M", llama_tensors(N, 576, 1536, kv_rows=192), SHAPE)
    assert types["token_embd.weight"] == "Q8_0"  # 576 is no multiple of Q4_K's 256: llama.cpp's Q8_0 output
    assert per_layer(types, "attn_q", N) == ["Q5_0"] * N  # Q4_K -> Q5_0
    assert per_layer(types, "attn_v", N) == ["Q8_0" if use_more_bits(i, N) else "Q5_0" for i in range(N)]
    assert per_layer(types, "ffn_down", N) == ["Q6_K" if use_more_bits(i, N) else "Q4_K" for i in range(N)]
    q3 = preset_types("Q3_K_S", llama_tensors(2, 576, 1536), ModelShape(2, 8, 8))
    assert q3["blk.0.attn_q.weight"] == "Q4_0" and q3["blk.0.ffn_down.weight"] == "Q3_K"
    odd = preset_types("Q8_0", {"blk.0.attn_q.weight": (48, 48), "token_embd.weight": (10, 48)}, ModelShape(1, 1, 1))
    assert odd == {"blk.0.attn_q.weight": "F16", "token_embd.weight": "F16"}


def test_overrides_first_match_wins_and_skip_the_counters_as_llamacpp():
    t = llama_tensors(N, 256, 512)
    types = preset_types("Q3_K_M", t, SHAPE, overrides=parse_overrides([r"blk\.0\.attn_v=Q8_0", "attn_v=q6_k",
                                                                       r"blk\.1\.ffn_down=Q2_K"]))
    assert per_layer(types, "attn_v", N) == ["Q8_0"] + ["Q6_K"] * 15
    # llama.cpp counts only the ffn_down tensors its rules saw: blk.1 overridden, blk.2 is the second one
    assert per_layer(types, "ffn_down", N) == ["Q5_K", "Q2_K"] + ["Q4_K"] * 14
    skipped = preset_types("Q3_K_M", t, SHAPE, overrides=(("blk\\.0\\.attn_v", "Q4_0"),))
    assert per_layer(skipped, "attn_v", N) == ["Q4_0", "Q5_K", "Q5_K"] + ["Q4_K"] * 13
    embed = preset_types("Q4_K_M", t, SHAPE, overrides=(("token_embd", "Q4_0"),), embed_type="Q5_0")
    assert embed["token_embd.weight"] == "Q5_0"  # --embed-type first, as --token-embedding-type


@pytest.mark.parametrize("bad,message", [("attn_v", "PATTERN=TYPE"), ("attn_v=Q9_K", "unknown GGUF block type"),
                                         ("(attn=Q8_0", "not a regular expression"), ("=Q8_0", "PATTERN=TYPE")])
def test_bad_overrides_are_one_error(bad, message):
    with pytest.raises(PeakError, match=message):
        parse_overrides([bad])


def test_allocation_never_exceeds_the_budget_and_no_single_change_that_fits_does_better():
    rng = random.Random(1)
    for trial in range(200):
        options = {}
        for n in range(rng.randint(1, 6)):
            sizes = sorted(rng.sample(range(10, 200), rng.randint(1, 5)))
            losses = sorted((rng.random() * 10 for _ in sizes), reverse=rng.random() < 0.9)
            options[f"t{n}"] = [(f"T{k}", b, loss) for k, (b, loss) in enumerate(zip(sizes, losses))]
        low = sum(min(o[1] for o in opts) for opts in options.values())
        high = sum(max(o[1] for o in opts) for opts in options.values())
        budget = rng.randint(low, high + 20)
        pick = allocate(options, budget)
        chosen = {n: next(o for o in options[n] if o[0] == pick[n]) for n in options}
        used = sum(o[1] for o in chosen.values())
        assert used <= budget
        total = sum(o[2] for o in chosen.values())
        best = min(sum(o[2] for o in combo) for combo in itertools.product(*options.values())
                   if sum(o[1] for o in combo) <= budget)
        assert total >= best - 1e-9
        for n, opts in options.items():  # locally optimal: no one tensor's change that fits lowers the loss
            for o in opts:
                if used - chosen[n][1] + o[1] <= budget:
                    assert o[2] >= chosen[n][2] - 1e-12
    with pytest.raises(PeakError, match="smallest types"):
        allocate({"a": [("Q4_0", 100, 1.0)], "b": [("Q4_0", 50, 1.0)]}, 149)


def test_hull_keeps_the_convex_undominated_options():
    opts = [("a", 10, 9.0), ("b", 20, 4.0), ("c", 30, 3.5), ("d", 40, 1.0), ("e", 25, 6.0)]
    assert [o[0] for o in hull(opts)] == ["a", "b", "d"]  # e dominated, c above the chord b-d


def test_type_losses_rank_by_grid_and_sampled_rows_estimate_the_whole():
    torch.manual_seed(0)
    W, X = torch.randn(256, 64), torch.randn(500, 64)
    H = X.T @ X / 500
    full = type_losses(W, H, ["Q4_0", "Q5_0", "Q8_0"])
    assert full["Q8_0"] < full["Q5_0"] < full["Q4_0"]
    sampled = type_losses(W, H, ["Q4_0"], max_rows=64)
    assert sampled["Q4_0"] == pytest.approx(full["Q4_0"], rel=0.2)


def quantize(tmp_path, model_dir, text_file, *extra, name="out.gguf"):
    out = tmp_path / name
    argv = ["quantize", "--model", str(model_dir), "--format", "gguf", "--calib-dataset", str(text_file),
            "--calib-samples", "2", "--calib-seqlen", "32", "--eval-tokens", "0", "--output", str(out), "--json",
            *extra]
    return out, main(argv)


def file_types(path):
    reader = gguf.GGUFReader(str(path))
    ft = int(reader.fields["general.file_type"].parts[-1][0])
    return {t.name: t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}, gguf.LlamaFileType(ft).name


def test_preset_file_holds_llamacpps_types_and_file_type(capsys, tmp_path, tiny_model_dir, text_file):
    out, code = quantize(tmp_path, tiny_model_dir, text_file, "--type", "Q4_K_M", "--method", "rtn",
                         "--tensor-type", r"blk\.1\.ffn_up=Q8_0")
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    types, file_type = file_types(out)
    assert file_type == "MOSTLY_Q4_K_M" and result["gguf_tensor_map"] == types
    # 2 layers: use_more_bits picks layer 1; 64/128 columns take no K-quant: Q6_K -> Q8_0, Q4_K -> Q5_0
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["blk.0.attn_v.weight"] == types["blk.0.ffn_down.weight"] == types["blk.0.attn_q.weight"] == "Q5_0"
    assert types["blk.1.ffn_up.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert sum(s["tensors"] for s in result["gguf_types"].values()) == len(types)
    assert main(["info", "--model", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["gguf_tensor_map"] == types and info["gguf_file_type"] == "MOSTLY_Q4_K_M"
    assert info["bits_per_param_total"] == pytest.approx(result["bits_per_param_total"])


def test_target_bits_file_is_at_or_under_the_target(capsys, tmp_path, tiny_model_dir, text_file):
    out, code = quantize(tmp_path, tiny_model_dir, text_file, "--target-bits", "6.2", "--method", "rtn",
                         "--tensor-type", r"blk\.0\.attn_v=Q8_0")
    assert code == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert 5.9 < result["bits_per_param_total"] <= 6.2
    params = sum(int(t.n_elements) for t in gguf.GGUFReader(str(out)).tensors)  # the whole file, as the target
    assert result["bits_per_param_total"] == pytest.approx(8 * out.stat().st_size / params)
    assert result["allocation_bytes"] <= result["allocation_budget_bytes"]
    types, _ = file_types(out)
    assert result["gguf_tensor_map"] == types and len(set(types.values())) > 1
    assert types["blk.0.attn_v.weight"] == "Q8_0"  # pinned by the pattern, counted as fixed


@pytest.mark.parametrize("extra,message", [
    (["--target-bits", "3"], "outside what the candidate types reach"),
    (["--target-bits", "6", "--type", "Q4_K_M"], "drop --type"),
    (["--target-types", "Q4_0"], "add --target-bits"),
    (["--target-bits", "6", "--target-types", "Q4_0,Q9_9"], "unknown GGUF block type"),
    (["--tensor-type", "attn_v"], "PATTERN=TYPE"),
    (["--tensor-type", "(=Q4_0"], "not a regular expression"),
    (["--type", "Q4_K_X"], "unknown GGUF type or preset"),
])
def test_bad_allocation_options_are_one_error_before_any_work(capsys, tmp_path, tiny_model_dir, text_file, extra,
                                                             message):
    out, code = quantize(tmp_path, tiny_model_dir, text_file, *extra)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("error:") == 1, err
    assert not out.exists() and list(tmp_path.glob("*.gguf*")) == []


def test_one_type_everywhere_without_a_preset():
    types = preset_types(None, llama_tensors(N, 256, 512, tied=False), SHAPE, base="Q4_0")
    outer = {"token_embd.weight", "output.weight"}
    assert {t for n, t in types.items() if n not in outer} == {"Q4_0"}
    assert types["token_embd.weight"] == types["output.weight"] == "Q6_K"


def test_header_size_needs_no_free_disk_for_the_whole_file(monkeypatch, tiny_llama, tiny_tokenizer):
    # the header is all that is measured: a disk too small for the whole F16 file must not refuse it
    import shutil
    from collections import namedtuple

    from peakllm.calibrate.gguf_plan import ALIGN, header_bytes

    size = header_bytes(tiny_llama, tiny_tokenizer)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 20, 1 << 20, 0))
    assert header_bytes(tiny_llama, tiny_tokenizer) == size and size % ALIGN == 0 and size > 0
