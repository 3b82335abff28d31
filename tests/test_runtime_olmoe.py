"""OLMoE in the lean runtime: q/k norms over the whole projection output (not per head) and a softmax router
whose top-k probabilities weight the experts.

- A tiny random OLMoE (every weight random, norms included): greedy tokens of the whole-step engine equal a
  plain greedy loop over transformers' full forward, with OLMoE's norm_topk_prob off and with it on; the
  op-by-op path (batch 2: the engine's MoE phase is batch-1 only) gives the same tokens.
- tiny-olmoe folders quantized by the CLI (int4 experts; QMoE's sub-1-bit ternary experts with int4 dense
  layers) decode in the engine with packed experts: greedy tokens equal transformers' on the same folder
  dequantized, and the engine's logits equal the op-by-op path's.
- Under a memory budget that leaves room for two experts: the all-in-memory tokens.
- clip_qkv, which the runtime lacks, falls back with one line.
"""

import pytest
import torch

from conftest import hf_greedy
from test_offload import moe_plan_sizes
from peakllm.cli import main
from peakllm.models import load_model
from peakllm.runtime.generate import generate, generate_text
from peakllm.runtime.model import RuntimeModel

N = 16


def tiny_olmoe(**overrides):
    """A tiny random OLMoE: 6 experts, top 3, grouped-query attention, every weight (norms too) random."""
    import transformers

    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_experts=6, num_experts_per_tok=3, max_position_embeddings=256,
               eos_token_id=0, pad_token_id=0, bos_token_id=0)
    cfg.update(overrides)
    torch.manual_seed(0)
    hf = transformers.OlmoeForCausalLM(transformers.OlmoeConfig(**cfg)).eval()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            mean, std = (1.0, 0.3) if "norm" in name else (0.0, 0.15)
            p.copy_(torch.randn(p.shape, generator=g) * std + mean)
    return hf


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_engine_greedy_tokens_equal_transformers(norm_topk_prob):
    hf = tiny_olmoe(norm_topk_prob=norm_topk_prob)
    assert hf.model.layers[0].self_attn.q_norm.weight.numel() == 64  # whole-width, not per head (16)
    prompt = torch.randint(1, 300, (2, 6), generator=torch.Generator().manual_seed(11))
    ref = hf_greedy(hf, prompt, N)
    assert len(set(ref[0].tolist())) > 3  # a real sequence, not one token repeated
    for row in range(2):
        rt = RuntimeModel.from_hf(hf, torch.float32, max_seq=6 + N)
        rt.setup_cache(1, 6 + N)
        assert rt._step is not None  # attention's norms and the MoE phase run in the engine
        assert torch.equal(generate(rt, None, prompt[row:row + 1], N, stop_at_eos=False), ref[row:row + 1])
    rt = RuntimeModel.from_hf(hf, torch.float32, max_seq=6 + N)
    rt.setup_cache(2, 6 + N)
    assert rt._step is None  # batch 2: op by op
    assert torch.equal(generate(rt, None, prompt, N, stop_at_eos=False), ref)


def test_engine_logits_equal_op_by_op_and_transformers():
    hf = tiny_olmoe()
    ids = torch.randint(1, 300, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(input_ids=ids).logits
    outs = []
    for engine in (True, False):
        rt = RuntimeModel.from_hf(hf)
        rt.use_step_engine = engine
        rt.setup_cache(1, 32)
        with torch.no_grad():
            outs.append(torch.cat([rt(ids[:, :5], 0)] + [rt(ids[:, i:i + 1], i) for i in range(5, 12)], 1))
    torch.testing.assert_close(outs[0], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def olmoe_folders(tmp_path_factory, tiny_tokenizer):
    """tiny-olmoe (random, fp32) quantized to int4 experts and to sub-1-bit ternary experts."""
    from conftest import TINY_TEXT
    from peakllm.models.synth import synthesize

    tmp = tmp_path_factory.mktemp("olmoe")
    src = tmp / "src"
    synthesize("tiny-olmoe", src, tokenizer=tiny_tokenizer, dtype=torch.float32, progress=False)
    text = tmp / "text.txt"
    text.write_text(TINY_TEXT, encoding="utf-8")
    common = ["--calib-dataset", str(text), "--calib-samples", "4", "--calib-seqlen", "32", "--eval-tokens", "0",
              "--stream", "on", "--json"]
    recipes = {"int4": ["--method", "gptq", "--bits", "4", "--group-size", "32"],
               "sub1": ["--method", "gptq", "--bits", "ternary", "--group-size", "-1", "--format", "sub1",
                        "--dense-bits", "4"]}
    for name, recipe in recipes.items():
        assert main(["quantize", "--model", str(src), *recipe, *common, "--output", str(tmp / name)]) == 0
    return tmp


@pytest.mark.parametrize("kind,expert_type", [("int4", "IntKLinear"), ("sub1", "Sub1Linear")])
def test_quantized_folder_decodes_in_the_engine(olmoe_folders, kind, expert_type):
    packed, tok = load_model(str(olmoe_folders / kind))
    dense, _ = load_model(str(olmoe_folders / kind), packed="dequantize")
    rt = RuntimeModel.from_hf(packed, torch.float32, max_seq=40)
    rt.setup_cache(1, 40)
    assert rt._step is not None
    experts = rt.layers[0].mlp.experts
    assert type(experts).__name__ == "PackedExperts" and type(experts.gate_up[0]).__name__ == expert_type
    assert type(rt.layers[0].attn.q_proj).__name__ == "IntKLinear"
    ids = torch.tensor([[5, 17, 42, 99]])
    ref = hf_greedy(dense, ids, N)  # transformers on the same weights, dequantized
    assert torch.equal(generate(rt, tok, ids, N, stop_at_eos=False), ref)
    seq = torch.cat([ids, ref], 1)
    outs = []
    for engine in (True, False):
        rt.use_step_engine = engine
        with torch.no_grad():
            outs.append(torch.cat([rt(seq[:, :4], 0)] + [rt(seq[:, i:i + 1], i) for i in range(4, seq.shape[1])], 1))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5 * outs[1].abs().max().item(), rtol=1e-5)


def test_sub1_experts_under_a_budget_give_the_in_memory_tokens(olmoe_folders):
    hf, tok = load_model(str(olmoe_folders / "sub1"))
    ids = torch.tensor([[5, 17, 42, 99]])
    ref = generate(RuntimeModel.from_hf(hf), tok, ids, N, stop_at_eos=False)
    base, expert = moe_plan_sizes(hf, 4 + N)
    rates = {}
    for capacity in (0, 5):
        for engine in (True, False):
            rt = RuntimeModel.from_hf(hf)
            rt.set_max_memory(base + (capacity + 1) * expert)  # the cached experts plus the one a miss needs
            rt.use_step_engine = engine
            assert torch.equal(generate(rt, tok, ids, N, stop_at_eos=False), ref), (capacity, engine)
            assert rt.offload.capacity == capacity and not rt.offload.all_resident
            st = rt.offload.stats["decode"]
            routed = hf.config.num_hidden_layers * hf.config.num_experts_per_tok  # distinct experts per token
            assert st["steps"] == N - 1 and st["expert_hits"] + st["expert_misses"] == st["steps"] * routed
            rates[(capacity, engine)] = rt.offload.summary()["expert_hit_rate"]
    assert rates[(0, True)] == rates[(0, False)] == 0.0
    assert rates[(5, True)] == rates[(5, False)] > 0.0  # both paths report the same routes to the cache


def test_bench_counts_only_the_routed_share_of_the_experts():
    from peakllm.runtime.bench import weight_bytes_per_step

    hf = tiny_olmoe()  # 6 experts, top 3; untied: the embedding is read one row per token
    experts = sum(p.numel() * 4 for layer in hf.model.layers for p in layer.mlp.experts.parameters())
    embedding = hf.model.embed_tokens.weight.numel() * 4
    everything = sum(p.numel() * 4 for p in hf.parameters())
    for batch in (1, 2):
        read = 1 - (1 - 3 / 6) ** batch
        expect = everything - embedding - experts + int(experts * read) + batch * 64 * 4
        assert abs(weight_bytes_per_step(hf, batch=batch) - expect) <= 2
        assert abs(weight_bytes_per_step(RuntimeModel.from_hf(hf), batch=batch) - expect) <= 2


def test_clip_qkv_falls_back_with_one_line(tiny_tokenizer, capsys):
    from peakllm.runtime.hf_loop import hf_generate_text

    hf = tiny_olmoe(clip_qkv=0.5)
    ids = torch.tensor([[5, 17, 42, 99]])
    text, n = generate_text(hf, tiny_tokenizer, ids, 8)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "clip_qkv" in err[0] and "transformers" in err[0]
    assert (text, n) == hf_generate_text(hf, tiny_tokenizer, ids, 8)
