import json

import pytest
import torch

from peakllm.calibrate.loop import calibrate
from peakllm.calibrate.stats import capture_inputs
from peakllm.models.anatomy import decoder_layers
from peakllm.errors import PeakError
from peakllm.calibrate.recipes import PruneRecipe, QuantRecipe
from peakllm.solvers import Grid


class Recording(PruneRecipe):
    """A recipe that remembers the statistics the pipeline handed it."""

    seen: dict

    def compress(self, name, layer_index, W, stats):
        self.seen[name] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in stats.items()}
        return super().compress(name, layer_index, W, stats)


def hessian_of_inputs(model, module_name, segments):
    xs = []
    handle = model.get_submodule(module_name).register_forward_pre_hook(lambda m, a: xs.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.no_grad():
        model(input_ids=segments)
    handle.remove()
    x = torch.cat(xs).double()
    return 2 * x.t() @ x / x.shape[0]


def test_pipeline_feeds_compressed_outputs_forward(tiny_llama):
    """Layer 1's statistics must come from layer 0 *after* layer 0 was pruned, and q/k/v of a layer
    must see its dense inputs; both are checked against hooks on the final model."""
    torch.manual_seed(0)
    segments = torch.randint(0, 300, (5, 24))
    recipe = Recording("sparsegpt", 0.5)
    recipe.seen = {}
    report = calibrate(tiny_llama, segments, recipe, batch_size=2, progress=False)
    assert len(report.modules) == 14 and report.calib_tokens == 120
    for name in ("model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.q_proj"):
        ref = hessian_of_inputs(tiny_llama, name, segments)
        got = recipe.seen[name]["hessian"].double()
        assert recipe.seen[name]["tokens"] == 120
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5)
    # true sequential: down_proj saw the inputs produced by the already pruned gate/up
    ref = hessian_of_inputs(tiny_llama, "model.layers.1.mlp.down_proj", segments)
    assert torch.allclose(recipe.seen["model.layers.1.mlp.down_proj"]["hessian"].double(), ref, rtol=1e-4, atol=1e-5)


def test_group_order_and_exact_sparsity(tiny_llama):
    segments = torch.randint(0, 300, (4, 16))
    report = calibrate(tiny_llama, segments, PruneRecipe("sparsegpt", 0.0, pattern=(2, 4)), batch_size=4, progress=False)
    names = list(report.modules)
    assert names[:4] == [f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"]
    assert names[4:7] == [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")]
    for name in names:
        w = tiny_llama.get_submodule(name).weight
        groups = (w == 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert torch.all(groups >= 2)  # exactly 2 pruned; a kept weight may be 0 only by coincidence
        assert torch.equal(report.modules[name].mask.reshape(w.shape[0], -1, 4).sum(-1),
                           torch.full_like(groups, 2))


def test_offloaded_activations_give_identical_results(tiny_llama):
    segments = torch.randint(0, 300, (4, 16))
    copy = type(tiny_llama)(tiny_llama.config).eval()
    copy.load_state_dict(tiny_llama.state_dict())
    calibrate(tiny_llama, segments, PruneRecipe("wanda", 0.5), batch_size=1, progress=False)
    calibrate(copy, segments, PruneRecipe("wanda", 0.5), batch_size=1, offload_bytes=0, progress=False)
    for (n, a), (_, b) in zip(tiny_llama.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), n


def test_quant_recipe_puts_weights_on_grid(tiny_llama):
    segments = torch.randint(0, 300, (2, 16))
    report = calibrate(tiny_llama, segments, QuantRecipe("gptq", Grid(bits=3, group_size=32)), progress=False)
    for name, r in report.modules.items():
        assert torch.equal(tiny_llama.get_submodule(name).weight, r.quant.dequantize())


def test_bad_calibration_inputs(tiny_llama):
    with pytest.raises(PeakError, match="empty"):
        calibrate(tiny_llama, torch.zeros(0, 16, dtype=torch.long), PruneRecipe(), progress=False)
    with pytest.raises(PeakError, match="sparsity"):
        PruneRecipe("wanda", 1.0)
    with pytest.raises(PeakError):
        PruneRecipe("sparsegpt", 0.5, pattern=(4, 4))
    segments = torch.randint(0, 300, (2, 16))
    with pytest.raises(PeakError, match="divisible"):
        calibrate(tiny_llama, segments, PruneRecipe("magnitude", 0.5, pattern=(2, 3)), progress=False)


def test_model_without_linear_layers():
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=1)).eval()
    for name, mod in list(model.model.layers[0].named_modules()):
        if isinstance(mod, torch.nn.Linear):
            parent, _, leaf = name.rpartition(".")
            setattr(model.model.layers[0].get_submodule(parent), leaf, torch.nn.Identity())
    with pytest.raises(PeakError, match="no linear layers"):
        calibrate(model, torch.randint(0, 300, (1, 8)), PruneRecipe(), progress=False)
    with pytest.raises(PeakError, match="no decoder layers"):
        decoder_layers(torch.nn.Linear(2, 2))


def test_prune_cli_writes_loadable_folder(capsys, tmp_path, tiny_model_dir, text_file):
    from transformers import AutoModelForCausalLM

    from peakllm.cli import main
    from peakllm.models import load_model

    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tiny_model_dir), "--method", "sparsegpt", "--sparsity", "0.5", "--format", "hf",
                 "--calib-dataset", str(text_file), "--calib-samples", "4", "--calib-seqlen", "32",
                 "--eval-dataset", str(text_file), "--eval-tokens", "512", "--output", str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0
    assert {"method", "sparsity_target", "sparsity", "ppl", "dense_ppl", "seconds", "calib_tokens", "output"} <= result.keys()
    assert abs(result["sparsity"] - 0.5) < 0.01 and result["calib_tokens"] == 128
    hf = AutoModelForCausalLM.from_pretrained(out)
    ours, _ = load_model(str(out))
    w = hf.model.layers[0].mlp.up_proj.weight
    assert abs((w == 0).float().mean().item() - 0.5) < 0.01
    assert torch.equal(w, ours.model.layers[0].mlp.up_proj.weight)


def test_prune_cli_owl_allocates_per_layer_sparsity_loading_the_model_once(capsys, tmp_path, tiny_model_dir, text_file,
                                                                          monkeypatch):
    from transformers import AutoModelForCausalLM

    from peakllm.calibrate import run as compression_run
    from peakllm.cli import main

    loads = []
    real_load = compression_run.load_model
    monkeypatch.setattr(compression_run, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    out = tmp_path / "owl"
    code = main(["prune", "--model", str(tiny_model_dir), "--method", "wanda", "--sparsity", "0.5", "--owl", "--format", "hf",
                 "--owl-lambda", "0.1", "--calib-dataset", str(text_file), "--calib-samples", "4",
                 "--calib-seqlen", "32", "--eval-tokens", "0", "--output", str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["owl"] is True
    assert len(loads) == 1  # the outlier pass runs on the model the pipeline then prunes
    hf = AutoModelForCausalLM.from_pretrained(out)
    per_layer = []
    for layer in hf.model.layers:
        ws = [m.weight for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        per_layer.append(sum((w == 0).sum().item() for w in ws) / sum(w.numel() for w in ws))
    assert all(0.4 - 0.01 <= s <= 0.6 + 0.01 for s in per_layer)  # within --sparsity +- --owl-lambda
    assert max(per_layer) - min(per_layer) > 0.005  # non-uniform: OWL moved sparsity between layers
    assert abs(result["sparsity"] - 0.5) < 0.02


@pytest.mark.parametrize("argv,message", [
    (["--sparsity", "1.5"], "sparsity"),
    (["--pattern", "4:4"], "0 < N < M"),
    (["--pattern", "2:5"], "divisible"),
    (["--calib-samples", "0"], "empty"),
    (["--bits", "4", "--format", "hf"], "--format peakllm"),
    (["--values", "bf16", "--format", "hf"], "--format peakllm"),
    (["--bits", "4", "--values", "fp16"], "drop --values"),
])
def test_prune_cli_bad_input_leaves_nothing(capsys, tmp_path, tiny_model_dir, text_file, argv, message):
    from peakllm.cli import main

    out = tmp_path / "pruned"
    code = main(["prune", "--model", str(tiny_model_dir), "--calib-dataset", str(text_file), "--calib-seqlen", "16",
                 "--eval-tokens", "0", "--output", str(out), *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob(".pruned*"))


def test_sink_weight_counts_each_segments_first_position_w_times():
    """Stats with sink_weight w equal the obvious sums: w x0 x0^T + sum of the other positions' x x^T."""
    from peakllm.calibrate.stats import Stats

    torch.manual_seed(0)
    batches = [torch.randn(3, 7, 5), torch.randn(2, 7, 5)]
    w = 10.0
    s = Stats(5, {"hessian", "sqnorm"}, "cpu", sink_weight=w)
    for x in batches:
        s.add(x)
    got = s.finish()
    H = torch.zeros(5, 5, dtype=torch.float64)
    sq = torch.zeros(5, dtype=torch.float64)
    for x in batches:
        for row in x.double():
            for pos, v in enumerate(row):
                k = w if pos == 0 else 1.0
                H += k * torch.outer(v, v)
                sq += k * v * v
    assert got["tokens"] == 35
    assert torch.allclose(got["hessian"].double(), H * 2 / 35, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got["sqnorm"].double(), sq, rtol=1e-5, atol=1e-6)


def test_pipeline_hands_solvers_the_sink_weighted_hessian(tiny_llama):
    """calibrate(sink_weight=w): each matrix's H counts every segment's first position w times."""
    torch.manual_seed(0)
    segments = torch.randint(0, 300, (4, 16))
    recipe = Recording("sparsegpt", 0.5)
    recipe.seen = {}
    calibrate(tiny_llama, segments, recipe, batch_size=2, progress=False, sink_weight=10.0)
    name = "model.layers.1.self_attn.q_proj"
    xs = []
    handle = tiny_llama.get_submodule(name).register_forward_pre_hook(lambda m, a: xs.append(a[0].clone()))
    with torch.no_grad():
        tiny_llama(input_ids=segments)
    handle.remove()
    x = torch.cat(xs).double()
    x[:, 0] *= 10 ** 0.5
    x = x.reshape(-1, x.shape[-1])
    ref = 2 * x.t() @ x / x.shape[0]
    assert torch.allclose(recipe.seen[name]["hessian"].double(), ref, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ref, hessian_of_inputs(tiny_llama, name, segments), rtol=1e-2)


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_prune_writes_packed_bf16_values_and_an_8bit_embedding_by_default(capsys, tmp_path, tiny_model_dir, text_file,
                                                                          pattern):
    """No --format: a peakllm folder whose kept values are bf16, the embedding int8, smaller than the input,
    the JSON's sizes and expected speed, and the kernels' logits equal to the dequantized folder's."""
    from peakllm.cli import main
    from peakllm.formats.container import load_model_folder
    from peakllm.formats.writer import weight_file_bytes
    from peakllm.models import load_model

    out = tmp_path / "pruned"
    target = ["--pattern", pattern] if pattern else ["--sparsity", "0.5"]
    code = main(["prune", "--model", str(tiny_model_dir), *target, "--calib-dataset", str(text_file),
                 "--calib-samples", "4", "--calib-seqlen", "32", "--eval-tokens", "0", "--output", str(out), "--json"])
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["format"] == "peakllm" and result["values"] == "bf16" and result["embed_bits"] == "8"
    manifest = json.loads((out / "peakllm.json").read_text())
    kinds = {e["kind"] for e in manifest["modules"].values()}
    assert kinds == {"intk", "nm" if pattern else "bitmask"}
    assert all(e["tensors"]["values"]["dtype"] == "BF16" for e in manifest["modules"].values() if "values" in e["tensors"])
    assert weight_file_bytes(out) < weight_file_bytes(tiny_model_dir)
    assert 8 < result["bits_per_param"] < 11  # 8 value bits + mask / positions (+ offsets, manifest: tiny rows)
    assert result["decode_bytes_per_token"] < result["decode_bytes_per_token_bf16"]
    assert result["roofline_speedup_vs_bf16"] == pytest.approx(
        result["decode_bytes_per_token_bf16"] / result["decode_bytes_per_token"])
    ours, tok = load_model(str(out))  # the kernels run the bf16 values: the same logits as the dequantized folder
    ref, _ = load_model(str(out), packed="dequantize")
    ids = tok("The quick brown fox", return_tensors="pt").input_ids[:, :8]
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)
    load_model_folder(out)  # checks every tensor against the manifest


def test_prune_recipe_rounds_kept_values_to_the_stored_dtype():
    from peakllm.calibrate.recipes import PruneRecipe

    W = torch.randn(8, 16)
    r = PruneRecipe("magnitude", 0.5, values="bf16").compress("m", 0, W.clone(), {})
    assert r.values_dtype == torch.bfloat16 and torch.equal(r.weight, r.weight.bfloat16().float())
    assert torch.equal(r.weight != 0, r.mask)
    with pytest.raises(PeakError, match="fp16's range"):
        PruneRecipe("magnitude", 0.5, values="fp16").compress("m", 0, W * 1e6, {})
