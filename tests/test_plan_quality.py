"""peakllm plan's quality prediction: each setting scored with its own solver's layer-wise objective (against
a slow obvious reference on one matrix), monotone where it must be, zero where nothing is lost, and carried by
`plan --json`, its ordering and `--run`'s result."""

from __future__ import annotations

import json

import pytest
import torch

from peakllm.calibrate.quality_probe import Setting, layer_sample, measure_settings, relative_losses
from peakllm.calibrate.recipes import QuantRecipe
from peakllm.cli import main
from peakllm.plan import probe as probe_mod
from peakllm.solvers import Grid
from test_plan import RATES

BITS = (2, 3, 4, 8)


def _problem(rows=48, cols=256, tokens=512, seed=0):
    """A matrix and calibration inputs with unequal channel scales (as real activations have)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(tokens, cols, generator=g) * torch.linspace(0.1, 3.0, cols)
    X[:, :cols // 2] += torch.randn(tokens, 1, generator=g)  # correlated channels: GPTQ has something to use
    return torch.randn(rows, cols, generator=g), X


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_losses_are_the_run_solvers_output_error(method):
    """Reference: the run's own recipe compresses W, and ||(W - Q) X||^2 / ||W X||^2 is computed from X itself."""
    W, X = _problem()
    H = X.T @ X
    for bits in (3, 4):
        grid = Grid(bits=bits, group_size=64)
        Q = QuantRecipe(method, grid, act_order="static").compress("m", 0, W.clone(), {"hessian": H.clone()}).weight
        reference = float(((W - Q) @ X.T).pow(2).sum() / (W @ X.T).pow(2).sum())
        got = relative_losses(W, H, [Setting(method, grid)], max_rows=None)[Setting(method, grid)]
        assert got == pytest.approx(reference, rel=1e-4)
        assert reference > 1e-5  # the reference is not trivially zero


def test_more_bits_never_predict_more_loss_and_gptq_beats_rtn():
    W, X = _problem(seed=1)
    settings = [Setting(m, Grid(bits=b, group_size=64)) for m in ("gptq", "rtn") for b in BITS]
    losses = relative_losses(W, X.T @ X, settings, max_rows=None)
    for method in ("gptq", "rtn"):
        by_bits = [losses[Setting(method, Grid(bits=b, group_size=64))] for b in BITS]
        assert by_bits == sorted(by_bits, reverse=True) and by_bits[0] > 10 * by_bits[-1]
    for b in BITS:
        assert losses[Setting("gptq", Grid(bits=b, group_size=64))] <= losses[Setting("rtn", Grid(bits=b, group_size=64))]


def test_nothing_lost_scores_zero():
    """A matrix already on the grid (each group's values 0..3: min-max 2-bit is exact) and one no input reaches."""
    g = torch.Generator().manual_seed(2)
    W = torch.randint(0, 4, (16, 128), generator=g).float()
    W[:, ::64] = 0
    W[:, 1::64] = 3
    _, X = _problem(rows=16, cols=128)
    for method in ("rtn", "gptq"):
        s = Setting(method, Grid(bits=2, group_size=64))
        assert relative_losses(W, X.T @ X, [s], max_rows=None)[s] == pytest.approx(0.0, abs=1e-10)
        assert relative_losses(torch.randn(16, 128), torch.zeros(128, 128), [s])[s] == 0.0


def test_layer_sample_and_scaled_scores(tiny_llama):
    assert layer_sample(30, 3) == {0, 14, 29} and layer_sample(30, None) is None and layer_sample(2, 5) is None
    segments = torch.randint(1, 300, (2, 32))
    settings = [Setting(m, Grid(bits=b, group_size=128)) for m in ("gptq", "rtn") for b in BITS]
    m = measure_settings(tiny_llama, segments, settings)
    assert len(m.losses) == 2 * 7 and all(set(v) == set(settings) for v in m.losses.values())
    for s in settings:
        assert m.scores[s] == pytest.approx(sum(v[s] for v in m.losses.values()))
    for method in ("gptq", "rtn"):
        by_bits = [m.scores[Setting(method, Grid(bits=b, group_size=128))] for b in BITS]
        assert by_bits == sorted(by_bits, reverse=True)


def test_the_pass_stops_after_the_last_sampled_layer():
    """Of 4 layers: sampling {0, 3} runs all 4 and scales the sum by 4 / 2; sampling {0} runs layer 0 alone (no
    anchor stream asks for the rest)."""
    from transformers import LlamaForCausalLM
    from conftest import tiny_llama_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4)).eval()
    calls = []
    for i, layer in enumerate(model.model.layers):
        layer.mlp.register_forward_pre_hook(lambda mod, a, i=i: calls.append(i))  # not run by the input capture
    s = Setting("rtn", Grid(bits=3, group_size=64))
    m = measure_settings(model, torch.randint(1, 300, (2, 16)), [s], layers=3)  # {0, 2, 3}
    assert {n.split(".")[2] for n in m.losses} == {"0", "2", "3"}
    calls.clear()
    m = measure_settings(model, torch.randint(1, 300, (2, 16)), [s], layers=2)  # {0, 3}
    assert calls == [0, 1, 2, 3] and {n.split(".")[2] for n in m.losses} == {"0", "3"}
    assert m.scores[s] == pytest.approx(2 * sum(v[s] for v in m.losses.values()))
    from peakllm.calibrate import quality_probe

    calls.clear()
    only_first = quality_probe.measure_settings(model, torch.randint(1, 300, (2, 16)), [s], layers=1)
    assert calls == [0] and {n.split(".")[2] for n in only_first.losses} == {"0"}


def test_held_out_scoring_is_the_error_on_the_other_tokens():
    """Solved on X_a, scored on X_b: the reference is ||(W - Q) X_b^T||^2 / ||W X_b^T||^2 with Q from X_a; with
    fewer tokens than inputs GPTQ fits X_a far better than unseen X_b, RTN (which fits nothing) does not."""
    W, X = _problem(cols=256, tokens=384, seed=3)
    Xa, Xb = X[:128], X[128:]
    g = Setting("gptq", Grid(bits=3, group_size=64))
    r = Setting("rtn", Grid(bits=3, group_size=64))
    held = relative_losses(W, Xa.T @ Xa, [g, r], max_rows=None, H_score=Xb.T @ Xb)
    seen = relative_losses(W, Xa.T @ Xa, [g, r], max_rows=None)
    Q = QuantRecipe("gptq", g.grid, act_order="static").compress("m", 0, W.clone(), {"hessian": Xa.T @ Xa}).weight
    assert held[g] == pytest.approx(float(((W - Q) @ Xb.T).pow(2).sum() / (W @ Xb.T).pow(2).sum()), rel=1e-4)
    assert held[g] > 2 * seen[g] and held[r] == pytest.approx(seen[r], rel=0.3)


def test_anchor_stream_is_the_rounded_model(tiny_llama):
    """The anchor stream's hidden states give the loss the whole model has with every matrix rounded (and as it
    is); the pass leaves the weights as they were."""
    import copy

    from peakllm.plan.quality import ANCHOR, head_nll
    from peakllm.solvers import rtn

    segments = torch.randint(1, 300, (2, 24))
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    m = measure_settings(tiny_llama, segments, [ANCHOR], layers=1, anchor=ANCHOR, anchor_tokens=16)
    assert all(torch.equal(v, before[k]) for k, v in tiny_llama.state_dict().items())
    on = segments[:1, :16]
    dense, rounded = m.anchor_hidden
    with torch.no_grad():
        assert head_nll(tiny_llama, dense, on) == pytest.approx(float(tiny_llama(input_ids=on, labels=on).loss), rel=1e-5)
        ref = copy.deepcopy(tiny_llama)
        for layer in ref.model.layers:
            for mod in layer.modules():
                if isinstance(mod, torch.nn.Linear):
                    mod.weight.data = rtn(mod.weight.data, ANCHOR.grid).weight
        want = float(ref(input_ids=on, labels=on).loss)
    assert head_nll(tiny_llama, rounded, on) == pytest.approx(want, rel=1e-5)
    assert want != pytest.approx(head_nll(tiny_llama, dense, on), rel=1e-4)
    with torch.no_grad():  # at 4 evenly spaced positions of 15: positions 0, 5, 9, 14 predicting 1, 6, 10, 15
        nll = torch.nn.functional.cross_entropy(tiny_llama(input_ids=on).logits[0, :-1], on[0, 1:], reduction="none")
    assert head_nll(tiny_llama, dense, on, 4) == pytest.approx(float(nll[[0, 5, 9, 14]].mean()), rel=1e-5)


@pytest.fixture
def fixed_probe(monkeypatch):
    monkeypatch.setattr(probe_mod, "probe", lambda refresh=False: RATES)


def test_plan_json_carries_the_prediction_and_orders_by_it(capsys, fixed_probe, tiny_model_dir, tmp_path):
    args = ["plan", "--model", str(tiny_model_dir), "--eval-tokens", "512", "--calib-samples", "2",
            "--calib-seqlen", "64", "--quality-samples", "2", "--quality-seqlen", "48"]
    assert main([*args, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    probe = plan["quality_probe"]
    assert probe["calib_tokens"] == 2 * 48 and probe["seconds"]["total"] > 0 and probe["k"] >= 0
    assert probe["holdout"] and probe["anchor_tokens"] == 48
    scores = [p["quality_score"] for p in plan["plans"]]
    assert all(s is not None and s >= 0 for s in scores)
    assert scores == sorted(scores) and plan["recommended"]["quality_score"] == min(scores)
    for p in plan["plans"]:
        assert p["predicted_dlog_ppl"] == pytest.approx(probe["k"] * p["quality_score"])
        assert p["predicted_ppl_ratio"] == pytest.approx(2.718281828459045 ** p["predicted_dlog_ppl"])
    by = {(p["method"], p["bits"]): p["quality_score"] for p in plan["plans"]}
    assert by["gptq", 2] > by["gptq", 4] > by["gptq", 8] and by["rtn", 2] > by["rtn", 4] > by["rtn", 8]
    assert main([*args]) == 0
    assert "ppl x" in capsys.readouterr().out
    assert main([*args, "--no-quality", "--json"]) == 0
    bare = json.loads(capsys.readouterr().out)
    assert bare["quality_probe"] is None and all(p["predicted_dlog_ppl"] is None for p in bare["plans"])
    assert main([*args, "--max-bits", "4", "--run", "--json", "--output", str(tmp_path / "o")]) == 0
    ran = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert ran["plan_predicted"]["predicted_ppl_ratio"] > 0 and ran["ppl"] > 0
    assert ran["plan_measured_ppl_ratio"] == pytest.approx(ran["ppl"] / ran["dense_ppl"])


@pytest.mark.parametrize("bad", [["--quality-samples", "0"], ["--quality-layers", "-1"], ["--quality-seqlen", "1"]])
def test_bad_probe_sizes_are_one_clear_error(capsys, bad):
    assert main(["plan", "--model", "default", *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("peakllm plan: error:")


def test_goal_quality_follows_the_prediction_not_the_bits():
    from peakllm.plan.plans import Plan, order_key

    wide, narrow = Plan("gptq", 8, quality_score=5.0), Plan("rtn", 2, quality_score=1.0)
    assert sorted([wide, narrow], key=lambda p: order_key("quality", p))[0] is narrow
    wide.quality_score = narrow.quality_score = None  # without the probe: by bits
    assert sorted([narrow, wide], key=lambda p: order_key("quality", p))[0] is wide
