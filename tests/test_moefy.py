"""MoEfication: exactness at k = E, weights as a partition of the dense MLP, routing, save/load, math pieces."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from peakllm.errors import PeakError
from peakllm.models.moe import PeakMoeConfig, PeakMoeForCausalLM, active_params_fraction, set_top_k
from peakllm.models.moefy import (
    balanced_assign,
    balanced_kmeans,
    expert_shares,
    fit_router_lstsq,
    build_moe,
    collect_activations,
    kept_share,
    kept_share_curve,
    moefy,
)

from conftest import tiny_llama_config


def convert(model, tokenizer, text_file, **kw):
    kw = {"calib_samples": 6, "calib_seqlen": 32, "calib_source": str(text_file), "progress": False, **kw}
    return moefy(model, tokenizer, **kw)


def tokens(n=2, L=24, seed=1):
    return torch.randint(0, 300, (n, L), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_all_experts_equal_dense(tiny_llama, tiny_tokenizer, text_file):
    moe = convert(tiny_llama, tiny_tokenizer, text_file, experts=4, top_k=4)
    x = tokens()
    torch.testing.assert_close(moe(x).logits, tiny_llama(x).logits, atol=2e-5, rtol=1e-5)
    assert moe.moefy_stats["kept_share"] == pytest.approx([1.0, 1.0])


@torch.no_grad()
def test_experts_partition_dense_mlp(tiny_llama, tiny_tokenizer, text_file):
    E = 8
    moe = convert(tiny_llama, tiny_tokenizer, text_file, experts=E, top_k=2)
    I = tiny_llama.config.intermediate_size
    for dense_layer, moe_layer in zip(tiny_llama.model.layers, moe.model.layers):
        mlp, experts = dense_layer.mlp, moe_layer.mlp.experts
        assert experts.gate_up_proj.shape == (E, 2 * I // E, 64)
        assert experts.down_proj.shape == (E, 64, I // E)
        seen = []
        for e in range(E):
            for j in range(I // E):
                gate_row = experts.gate_up_proj[e, j]
                # find the dense neuron this row came from: an exact match, by a plain scan
                matches = [i for i in range(I) if torch.equal(mlp.gate_proj.weight[i], gate_row)]
                assert len(matches) == 1
                i = matches[0]
                assert torch.equal(experts.gate_up_proj[e, I // E + j], mlp.up_proj.weight[i])
                assert torch.equal(experts.down_proj[e, :, j], mlp.down_proj.weight[:, i])
                seen.append(i)
        assert sorted(seen) == list(range(I))  # every neuron in exactly one expert


@torch.no_grad()
def test_block_is_sum_of_routed_experts(tiny_llama, tiny_tokenizer, text_file):
    E, k = 4, 2
    moe = convert(tiny_llama, tiny_tokenizer, text_file, experts=E, top_k=k)
    block = moe.model.layers[1].mlp
    x = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3))
    calls = []
    handle = block.experts.register_forward_pre_hook(lambda _m, args: calls.append(args))
    y = block(x)
    handle.remove()
    _, top_k_index, top_k_weights = calls[0]
    assert top_k_index.shape == (14, k) and torch.equal(top_k_weights, torch.ones(14, k))
    scores = block.gate.scores(x.reshape(-1, 64))
    for t in range(14):
        chosen = top_k_index[t].tolist()
        assert len(set(chosen)) == k and all(0 <= e < E for e in chosen)
        # the chosen experts are the k best-scored ones
        assert scores[t, chosen].min() >= scores[t].sort(descending=True).values[k - 1]
        ref = torch.zeros(64)
        for e in chosen:
            gate_up = block.experts.gate_up_proj[e] @ x.reshape(-1, 64)[t]
            g, u = gate_up.chunk(2)
            ref += block.experts.down_proj[e] @ (F.silu(g) * u)
        torch.testing.assert_close(y.reshape(-1, 64)[t], ref, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_save_load_round_trip(tmp_path, tiny_llama, tiny_tokenizer, text_file):
    from transformers import AutoConfig, AutoModelForCausalLM

    moe = convert(tiny_llama, tiny_tokenizer, text_file, experts=4, top_k=1)
    moe.save_pretrained(tmp_path / "moe")
    assert AutoConfig.from_pretrained(tmp_path / "moe").model_type == "peakllm_moe"
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    assert isinstance(back, PeakMoeForCausalLM)
    assert back.config.num_experts == 4 and back.config.num_experts_per_tok == 1
    x = tokens()
    assert torch.equal(back(x).logits, moe(x).logits)


@torch.no_grad()
def test_mlp_router_trains_and_routes(tiny_llama, tiny_tokenizer, text_file):
    moe = convert(tiny_llama, tiny_tokenizer, text_file, experts=4, top_k=2, router_hidden=16, router_steps=20)
    assert moe.model.layers[0].mlp.gate.hidden.weight.shape == (16, 64)
    x = tokens()
    assert torch.isfinite(moe(x).logits).all()
    assert all(0 < s <= 1 for s in moe.moefy_stats["kept_share"])


@torch.no_grad()
def test_one_calibration_serves_every_top_k(tiny_llama, tiny_tokenizer, text_file):
    from peakllm.data import calibration_segments

    segments = calibration_segments(tiny_tokenizer, 6, 32, source=str(text_file))
    X, A = collect_activations(tiny_llama, segments, max_tokens=100, progress=False)
    assert X[0].shape == (100, 64) and A[0].shape == (100, 128)
    one = build_moe(tiny_llama, X, A, experts=4, top_k=1, progress=False)
    three = build_moe(tiny_llama, X, A, experts=4, top_k=3, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), three.state_dict().values()))
    x = tokens()
    set_top_k(one, 3)
    assert one.config.num_experts_per_tok == 3
    assert torch.equal(one(x).logits, three(x).logits)
    set_top_k(one, 4)  # all experts: the dense model again
    torch.testing.assert_close(one(x).logits, tiny_llama(x).logits, atol=2e-5, rtol=1e-5)
    assert one.moefy_stats["kept_share_by_k"][0][2] == pytest.approx(three.moefy_stats["kept_share"][0])


def test_dense_model_untouched(tiny_llama, tiny_tokenizer, text_file):
    before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    convert(tiny_llama, tiny_tokenizer, text_file, experts=4, top_k=2)
    assert all(torch.equal(before[k], v) for k, v in tiny_llama.state_dict().items())


@pytest.mark.parametrize("experts,top_k,match", [(3, 1, "divide"), (0, 1, "divide"), (4, 0, "top-k"), (4, 5, "top-k")])
def test_bad_arguments(tiny_llama, tiny_tokenizer, text_file, experts, top_k, match):
    with pytest.raises(PeakError, match=match):
        convert(tiny_llama, tiny_tokenizer, text_file, experts=experts, top_k=top_k)


def test_rejects_non_llama_and_biased_mlp(tiny_tokenizer, text_file):
    from transformers import LlamaForCausalLM, MistralConfig, MistralForCausalLM

    mistral = MistralForCausalLM(MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2))
    with pytest.raises(PeakError, match="Llama"):
        convert(mistral, tiny_tokenizer, text_file, experts=4, top_k=2)
    biased = LlamaForCausalLM(tiny_llama_config(mlp_bias=True))
    with pytest.raises(PeakError, match="bias-free"):
        convert(biased, tiny_tokenizer, text_file, experts=4, top_k=2)


def test_config_validates_shape():
    from huggingface_hub.errors import StrictDataclassClassValidationError

    with pytest.raises(StrictDataclassClassValidationError, match="num_experts_per_tok"):
        PeakMoeConfig(hidden_size=64, num_attention_heads=4, num_experts=4, num_experts_per_tok=5)


def test_active_params_fraction_counts_k_of_E_experts():
    cfg = PeakMoeConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, num_experts=4,
                        num_experts_per_tok=1, moe_intermediate_size=32)
    model = PeakMoeForCausalLM(cfg)
    total = sum(p.numel() for p in model.parameters())
    experts = 2 * (4 * 2 * 32 * 64 + 4 * 64 * 32)  # 2 layers of gate_up + down
    assert active_params_fraction(model) == pytest.approx((total - experts * 3 / 4) / total)


# --- the math pieces against plain references ---------------------------------------------------------------

def test_balanced_assign_sizes_and_greedy_order():
    sim = torch.randn(24, 4, generator=torch.Generator().manual_seed(0))
    labels = balanced_assign(sim, 6)
    assert torch.bincount(labels, minlength=4).tolist() == [6, 6, 6, 6]
    # slow reference: repeatedly take the best remaining (row, col) pair with room left
    ref, counts, left = [-1] * 24, [0] * 4, set(range(24))
    while left:
        r, c = max(((r, c) for r in left for c in range(4) if counts[c] < 6), key=lambda rc: sim[rc[0], rc[1]].item())
        ref[r] = c
        counts[c] += 1
        left.remove(r)
    assert labels.tolist() == ref


def test_balanced_kmeans_recovers_planted_groups():
    gen = torch.Generator().manual_seed(0)
    E, per, T = 4, 16, 200
    # neurons of one group fire on the same tokens: planted co-activation
    active = torch.rand(E, T, generator=gen) < 0.25
    P = torch.cat([active[e].float().repeat(per, 1) for e in range(E)]) + 0.05 * torch.rand(E * per, T, generator=gen)
    perm = torch.randperm(E * per, generator=gen)
    labels = balanced_kmeans(P[perm], E, seed=1)
    truth = (torch.arange(E * per) // per)[perm]
    assert torch.bincount(labels, minlength=E).tolist() == [per] * E
    for e in range(E):  # each found cluster is exactly one planted group
        assert truth[labels == e].unique().numel() == 1


def test_router_lstsq_matches_lstsq_reference():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(300, 12, generator=gen)
    S = torch.rand(300, 5, generator=gen)
    W, b = fit_router_lstsq(X, S, damp=0.0)
    Xb = torch.cat([X, torch.ones(300, 1)], dim=1).double()
    ref = torch.linalg.lstsq(Xb, S.double()).solution
    torch.testing.assert_close(W, ref[:-1].T.float(), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b, ref[-1].float(), atol=1e-5, rtol=1e-4)


def test_expert_shares_and_kept_share_against_loops():
    gen = torch.Generator().manual_seed(0)
    h, W_down = torch.randn(10, 12, generator=gen), torch.randn(6, 12, generator=gen)
    groups = [torch.tensor([0, 5, 7]), torch.tensor([1, 2, 3]), torch.tensor([4, 6, 8]), torch.tensor([9, 10, 11])]
    S = expert_shares(h, W_down, groups)
    for t in range(10):
        norms = [torch.linalg.norm(sum(W_down[:, i] * h[t, i] for i in g.tolist())) for g in groups]
        torch.testing.assert_close(S[t], torch.stack(norms) / sum(norms), atol=1e-6, rtol=1e-5)
    scores = torch.randn(10, 4, generator=gen)
    ref = 0.0
    for t in range(10):
        best = sorted(range(4), key=lambda e: -scores[t, e].item())[:2]
        ref += S[t, best].sum().item() / 10
    assert kept_share(S, scores, 2) == pytest.approx(ref, rel=1e-6)
    curve = kept_share_curve(S, scores)
    assert curve == pytest.approx([kept_share(S, scores, k) for k in range(1, 5)], rel=1e-6)
    assert curve[-1] == pytest.approx(1.0)


@pytest.mark.slow
@torch.no_grad()
def test_default_model_all_experts_equal_dense(default_model):
    model, tokenizer = default_model
    moe = moefy(model, tokenizer, experts=8, top_k=8, calib_samples=2, calib_seqlen=64, progress=False)
    assert moe.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 2 * 192, 576)
    x = tokenizer("MoEfication splits a dense MLP into experts.", return_tensors="pt").input_ids
    torch.testing.assert_close(moe(x).logits, model(x).logits, atol=1e-3, rtol=1e-4)
    set_top_k(moe, 2)
    assert not torch.allclose(moe(x).logits, model(x).logits, atol=1e-3)
