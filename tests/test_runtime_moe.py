"""The lean runtime on a moefied (peakllm_moe) model: the MoE block runs as the model's own module."""

import torch

from peakllm.runtime.model import RuntimeModel


def test_runtime_matches_hf_on_moefied_model():
    from peakllm.models.moe import PeakMoeConfig, PeakMoeForCausalLM

    torch.manual_seed(0)
    cfg = PeakMoeConfig(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128)
    hf = PeakMoeForCausalLM(cfg).eval()
    rt = RuntimeModel.from_hf(hf)
    ids = torch.randint(0, 300, (1, 10))
    rt.setup_cache(1, 32)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
        prefill = rt(ids[:, :6])
        steps = [rt(ids[:, i:i + 1], start_pos=i) for i in range(6, 10)]
    assert torch.allclose(prefill, ref[:, :6], atol=1e-4, rtol=1e-4)
    for i, step in zip(range(6, 10), steps):
        assert torch.allclose(step[:, 0], ref[:, i], atol=1e-4, rtol=1e-4)


def _moe_model(experts=4, top_k=2, seed=0):
    from peakllm.models.moe import PeakMoeConfig, PeakMoeForCausalLM

    torch.manual_seed(seed)
    cfg = PeakMoeConfig(vocab_size=300, hidden_size=64, intermediate_size=32 * experts, moe_intermediate_size=32,
                        num_experts=experts, num_experts_per_tok=top_k, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=128)
    hf = PeakMoeForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.mlp.gate.bias.normal_()  # a router bias that matters
    return hf


def _int4_experts(hf, seed=1):
    """Replace every layer's fused experts by PackedExperts of random int4 modules (one expert as nn.Linear)."""
    from torch import nn

    from peakllm.runtime.experts import PackedExperts
    from peakllm.runtime.linear import IntKLinear

    g = torch.Generator().manual_seed(seed)

    def intk(out_f, in_f):
        groups = in_f // 16
        return IntKLinear(in_f, out_f, 4, 16, torch.randint(0, 256, (out_f, in_f // 2), generator=g, dtype=torch.uint8),
                          (torch.rand(out_f, groups, generator=g) * 0.05).half(),
                          torch.randint(0, 16, (out_f, groups), generator=g, dtype=torch.uint8))

    for layer in hf.model.layers:
        ex = layer.mlp.experts
        E, two_i, H = ex.gate_up_proj.shape
        gate_up = [intk(two_i, H) for _ in range(E)]
        down = [intk(H, two_i // 2) for _ in range(E)]
        down[0] = nn.Linear(two_i // 2, H, bias=False)  # a dequantized-on-load expert is a plain Linear
        layer.mlp.experts = PackedExperts(gate_up, down, ex.act_fn)
    return hf


def _decode_both(hf, ids):
    outs = []
    for engine in (True, False):
        rt = RuntimeModel.from_hf(hf)
        rt.use_step_engine = engine
        rt.setup_cache(1, 32)
        assert rt._step is not None  # MoE layers are described to the engine at batch 1
        with torch.no_grad():
            outs.append(torch.cat([rt(ids[:, :5], 0)] + [rt(ids[:, i:i + 1], i) for i in range(5, ids.shape[1])], 1))
    return outs


def test_engine_runs_moe_blocks_with_dense_experts():
    hf = _moe_model(experts=6, top_k=3)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    engine, ops = _decode_both(hf, ids)
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    torch.testing.assert_close(engine, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(engine, ops, atol=1e-5, rtol=1e-5)


def test_engine_runs_moe_blocks_with_packed_experts():
    hf = _int4_experts(_moe_model(experts=4, top_k=2, seed=3))
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(4))
    engine, ops = _decode_both(hf, ids)
    torch.testing.assert_close(engine, ops, atol=1e-5 * ops.abs().max().item(), rtol=1e-5)


def test_moe_engine_falls_back_where_it_does_not_apply():
    hf = _moe_model()
    rt = RuntimeModel.from_hf(hf)
    rt.setup_cache(2, 16)
    assert rt._step is None  # batch 2: the MoE phase is batch-1 only
    rt = RuntimeModel.from_hf(hf, torch.bfloat16)
    rt.setup_cache(1, 16)
    assert rt._step is None  # bf16 activations: op by op


def test_engine_runs_moe_blocks_with_sub1_experts():
    """QMoE's format in the engine: ternary experts in the sub-1-bit stream, decoded while multiplying."""
    from peakllm.formats.sub1 import PackedSub1
    from peakllm.formats.sub1_code import Sub1Dictionary
    from peakllm.runtime.experts import PackedExperts
    from peakllm.runtime.sub1 import Sub1Linear

    hf = _moe_model(experts=4, top_k=2, seed=5)
    g = torch.Generator().manual_seed(6)
    dictionary = Sub1Dictionary(8, 225, 128)

    def ternary(out_f, in_f):
        codes = torch.randint(0, 3, (out_f, in_f), generator=g, dtype=torch.uint8)
        codes[torch.rand(out_f, in_f, generator=g) < 0.8] = 1  # mostly zeros, as QMoE's experts are
        scale = (torch.rand(out_f, 1, generator=g) * 0.1 + 0.02).half()
        return Sub1Linear(PackedSub1.encode(codes, scale, scale, -1, dictionary, block_rows=8))

    for layer in hf.model.layers:
        ex = layer.mlp.experts
        E, two_i, H = ex.gate_up_proj.shape
        layer.mlp.experts = PackedExperts([ternary(two_i, H) for _ in range(E)],
                                          [ternary(H, two_i // 2) for _ in range(E)], ex.act_fn)
    ids = torch.randint(0, 300, (1, 12), generator=torch.Generator().manual_seed(7))
    engine, ops = _decode_both(hf, ids)
    torch.testing.assert_close(engine, ops, atol=1e-5 * ops.abs().max().item(), rtol=1e-5)
