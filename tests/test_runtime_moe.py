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
