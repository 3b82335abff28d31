"""Integration tests on the real default model (SmolLM2-135M) with small token budgets."""

import pytest
import torch

from peakllm import solvers
from peakllm.data import calibration_segments

pytestmark = pytest.mark.slow

MODULES = ["model.layers.{i}.self_attn.q_proj", "model.layers.{i}.self_attn.o_proj",
           "model.layers.{i}.mlp.up_proj", "model.layers.{i}.mlp.down_proj"]


@pytest.fixture(scope="module")
def real_inputs(default_model):
    """Inputs X [tokens, in] of a few matrices in layers 3 and 20, from 4 x 256 calibration tokens."""
    model, tokenizer = default_model
    names = [m.format(i=i) for i in (3, 20) for m in MODULES]
    xs = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda m, a, n=n: xs[n].append(a[0].reshape(-1, a[0].shape[-1]).clone())) for n in names]
    with torch.no_grad():
        model(input_ids=calibration_segments(tokenizer, 4, 256, seed=1))
    for h in hooks:
        h.remove()
    return {n: (model.get_submodule(n).weight.detach().clone(), torch.cat(x)) for n, x in xs.items()}


def out_error(W, W_hat, X):
    return float(((W - W_hat).double() @ X.double().t()).pow(2).sum())


def test_pruning_error_order_on_real_activations(real_inputs):
    """||WX - ŴX||² at 50%: sparsegpt < wanda < magnitude on every module checked."""
    for name, (W, X) in real_inputs.items():
        H = 2 * X.t() @ X / X.shape[0]
        sqnorm = (X * X).sum(0)
        e_sgpt = out_error(W, solvers.sparsegpt(W, H, 0.5).weight, X)
        e_wanda = out_error(W, solvers.wanda(W, sqnorm, 0.5)[0], X)
        e_mag = out_error(W, solvers.magnitude(W, 0.5)[0], X)
        assert e_sgpt < e_wanda < e_mag, (name, e_sgpt, e_wanda, e_mag)


def test_gptq_error_not_above_rtn_on_real_activations(real_inputs):
    for name, (W, X) in real_inputs.items():
        H = 2 * X.t() @ X / X.shape[0]
        for grid in (solvers.Grid(bits=3, group_size=128), solvers.Grid(bits=2, group_size=64),
                     solvers.Grid(kind="ternary", group_size=-1)):
            q, _ = solvers.gptq(W, H, grid)
            r = solvers.rtn(W, grid)
            assert out_error(W, q.weight, X) <= out_error(W, r.weight, X), (name, grid)
