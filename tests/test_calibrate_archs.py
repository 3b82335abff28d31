"""The pipeline is generic over decoder-only HF families: tiny random models of each, pruned and quantized."""

import pytest
import torch

from peakllm.calibrate.loop import calibrate
from peakllm.calibrate.recipes import PruneRecipe, QuantRecipe
from peakllm.solvers import Grid

COMMON = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128)


def build(family):
    import transformers as tf

    torch.manual_seed(0)
    if family == "opt":
        cfg = tf.OPTConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                           max_position_embeddings=128, word_embed_proj_dim=64)
        return tf.OPTForCausalLM(cfg).eval()
    if family == "gemma3":
        cfg = tf.Gemma3TextConfig(**COMMON, intermediate_size=128, num_key_value_heads=2, head_dim=16,
                                  sliding_window=8, layer_types=["sliding_attention", "full_attention"])
        return tf.Gemma3ForCausalLM(cfg).eval()
    cls_cfg, cls_model = {"qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
                          "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM),
                          "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),  # fused qkv_proj, gate_up_proj
                          "mistral": (tf.MistralConfig, tf.MistralForCausalLM)}[family]
    extra = {"pad_token_id": 0} if family == "phi3" else {}
    return cls_model(cls_cfg(**COMMON, intermediate_size=128, num_key_value_heads=2, **extra)).eval()


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3", "mistral", "gemma3", "opt"])
def test_prune_and_quantize_every_family(family):
    segments = torch.randint(0, 300, (3, 24))
    model = build(family)
    report = calibrate(model, segments, PruneRecipe("sparsegpt", 0.5), batch_size=2, progress=False)
    # 2 layers x (4 attention + 2..3 MLP matrices), or (qkv + o + gate_up + down) with Phi-3's fused ones
    assert len(report.modules) >= (8 if family == "phi3" else 12)
    for name, r in report.modules.items():
        w = model.get_submodule(name).weight
        assert abs((w == 0).float().mean().item() - 0.5) < 0.02, name
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=segments).logits).all()
    model = build(family)
    report = calibrate(model, segments, QuantRecipe("gptq", Grid(bits=4, group_size=16)), progress=False)
    for name, r in report.modules.items():
        assert torch.equal(model.get_submodule(name).weight, r.quant.dequantize()), name
