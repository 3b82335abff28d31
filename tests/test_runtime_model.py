"""RuntimeModel logits against the HF model it was built from: prefill, token-by-token decode, chunks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from peakllm.runtime.model import DenseLinear, RuntimeModel
from conftest import tiny_family as _tiny


CASES = [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": False, "rope_parameters": {"rope_type": "linear", "factor": 2.0,
                                                                   "rope_theta": 500.0}}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("phi3", {}),
    ("gemma3", {}),
]


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(ids).logits.float()


# "layer": the whole-step engine (one C call per token); "ops": fused ops per module; "torch": plain torch.
@pytest.mark.parametrize("path", ["layer", "ops", "torch"])
@pytest.mark.parametrize("kind,overrides", CASES)
def test_prefill_and_decode_match_hf_fp32(kind, overrides, path):
    hf = _tiny(kind, **overrides)
    ids = torch.randint(1, 300, (2, 19), generator=torch.Generator().manual_seed(5))
    ref = _hf_logits(hf, ids)
    rt = RuntimeModel.from_hf(hf, torch.float32)
    rt.use_fused, rt.use_step_engine = path != "torch", path == "layer"
    rt.setup_cache(2, 32)
    assert rt._step is not None  # every family here runs in the whole-step engine
    torch.testing.assert_close(rt(ids, 0), ref, rtol=1e-4, atol=1e-4)

    rt.setup_cache(2, 32)
    steps = [rt(ids[:, :4], 0)] + [rt(ids[:, t:t + 1], t) for t in range(4, 19)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-4, atol=1e-4)

    chunks = [rt(ids[:, :7], 0), rt(ids[:, 7:12], 7), rt(ids[:, 12:], 12)]  # chunks after a cached prefix
    torch.testing.assert_close(torch.cat(chunks, 1), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(rt(ids, 0, last_only=True), ref[:, -1:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layer_kernel", [True, False])
@pytest.mark.parametrize("kind", ["llama", "qwen3", "phi3", "gemma3"])
def test_bf16_runtime_tracks_hf_bf16(kind, layer_kernel):
    hf = _tiny(kind).to(torch.bfloat16)
    ids = torch.randint(1, 300, (1, 12), generator=torch.Generator().manual_seed(6))
    ref = _hf_logits(hf, ids)
    rt = RuntimeModel.from_hf(hf, torch.bfloat16)
    rt.use_step_engine = layer_kernel
    rt.setup_cache(1, 16)
    steps = [rt(ids[:, :3], 0)] + [rt(ids[:, t:t + 1], t) for t in range(3, 12)]
    out = torch.cat(steps, 1).float()
    # bf16 rounding differs in order only: a few units of bf16 precision at the logits' scale
    gap = (out - ref).abs().max().item()
    assert gap <= 0.03 * ref.abs().max().item()
    # The same next token wherever HF's top two logits are further apart than twice that gap; elsewhere a
    # near-tie may fall either way under bf16 rounding (tiny random models have many: Gemma's last position
    # here has a top-2 margin of 0.06 against a gap of 0.23).
    top2 = ref.topk(2, dim=-1).values
    decisive = top2[..., 0] - top2[..., 1] > 2 * gap
    assert decisive.any()
    assert torch.equal(out.argmax(-1)[decisive], ref.argmax(-1)[decisive])


def test_dense_linears_become_dense_linear_and_tied_head_shares_embedding():
    hf = _tiny("llama")
    rt = RuntimeModel.from_hf(hf, torch.float32)
    assert isinstance(rt.layers[0].attn.q_proj, DenseLinear)
    assert rt.lm_head.weight.data_ptr() == rt.embed.data_ptr()
    assert rt.embed.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # fp32: shared, not copied


class _ScaledLinear(nn.Module):
    """Stands in for a packed module: any nn.Module with forward(x [..., in]) -> [..., out]."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous() * 2.0)
        self.bias = linear.bias
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        y = (x @ self.weight_t) * 0.5
        return y if self.bias is None else y + self.bias


@pytest.mark.parametrize("fused", [True, False])
def test_non_linear_modules_drop_in(fused):
    hf = _tiny("llama")
    ids = torch.randint(1, 300, (1, 9), generator=torch.Generator().manual_seed(7))
    layer = hf.model.layers[0]  # layer 1 stays dense: a mix of the two decode paths
    layer.self_attn.k_proj = _ScaledLinear(layer.self_attn.k_proj)
    layer.mlp.down_proj = _ScaledLinear(layer.mlp.down_proj)
    ref = _hf_logits(hf, ids)
    hf.model.layers[0].mlp.down_proj.calls = 0
    rt = RuntimeModel.from_hf(hf)
    rt.use_fused = fused
    assert rt.layers[0].mlp.down_proj is hf.model.layers[0].mlp.down_proj
    rt.setup_cache(1, 16)
    assert rt._step is None  # a module the engine cannot describe: the op-by-op path runs every layer
    rt.setup_cache(1, 16)
    steps = [rt(ids[:, :5], 0)] + [rt(ids[:, t:t + 1], t) for t in range(5, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-4, atol=1e-4)
    assert hf.model.layers[0].mlp.down_proj.calls == 5  # prefill + 4 decode steps


def test_cache_limits_are_errors():
    from peakllm.errors import PeakError

    rt = RuntimeModel.from_hf(_tiny("llama"))
    with pytest.raises(PeakError):
        rt(torch.ones(1, 3, dtype=torch.long), 0)  # no cache yet
    rt.setup_cache(1, 8)
    with pytest.raises(PeakError):
        rt(torch.ones(1, 9, dtype=torch.long), 0)
    with pytest.raises(PeakError):
        rt.setup_cache(1, 10_000)


def test_unsupported_architecture_is_an_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    from peakllm.errors import PeakError

    hf = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=16))
    with pytest.raises(PeakError, match="gpt2"):
        RuntimeModel.from_hf(hf)


@pytest.mark.slow
def test_default_model_logits_match_hf(default_model):
    hf, tokenizer = default_model
    ids = tokenizer("The capital of France is Paris, and the capital of Italy is", return_tensors="pt")["input_ids"]
    ref = _hf_logits(hf, ids)
    rt = RuntimeModel.from_hf(hf, torch.float32)
    rt.setup_cache(1, 64)
    T = ids.shape[1]
    steps = [rt(ids[:, : T - 4], 0)] + [rt(ids[:, t:t + 1], t) for t in range(T - 4, T)]
    out = torch.cat(steps, 1)
    assert (out - ref).abs().max().item() <= 1e-3 * ref.abs().max().item()
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    # The HF config's RoPE settings made it into the table: theta from the config, positions 0..S-1.
    theta = hf.config.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, rt.head_dim, 2).float() / rt.head_dim)
    torch.testing.assert_close(rt.cos[7, 0, : rt.head_dim // 2], torch.cos(7 * inv_freq))
    assert F.softmax(out[0, -1], -1).max() > 0.1  # a real model is confident about "Rome"-like continuations


def test_without_compiled_kernels_the_torch_path_serves(monkeypatch):
    from peakllm.kernels import dense

    from peakllm.kernels import decode

    monkeypatch.setattr(dense, "_fns", {})  # as if g++ were missing: every kernel falls back to torch
    monkeypatch.setattr(decode, "_fns", {})
    hf = _tiny("qwen3")
    ids = torch.randint(1, 300, (1, 8), generator=torch.Generator().manual_seed(8))
    rt = RuntimeModel.from_hf(hf)
    rt.setup_cache(1, 8)
    assert rt._step is None
    steps = [rt(ids[:, :3], 0)] + [rt(ids[:, t:t + 1], t) for t in range(3, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), _hf_logits(hf, ids), rtol=1e-4, atol=1e-4)


PACKED = {"llama": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
          "phi3": ("self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"),  # fused: split into views
          "gemma3": ("self_attn.q_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@pytest.mark.parametrize("kind,dtype", [(k, d) for k in PACKED for d in (torch.float32, torch.bfloat16)])
def test_packed_intk_modules_run_in_the_runtime(dtype, kind):
    from peakllm.runtime.linear import IntKLinear

    hf = _tiny(kind)
    g = torch.Generator().manual_seed(10)
    for layer in hf.model.layers:
        for path in PACKED[kind]:
            owner, name = layer.get_submodule(path.split(".")[0]), path.split(".")[1]
            out_f, in_f = getattr(owner, name).weight.shape
            groups = (in_f + 31) // 32
            setattr(owner, name, IntKLinear(
                in_f, out_f, 4, 32, torch.randint(0, 256, (out_f, (in_f * 4 + 7) // 8), generator=g, dtype=torch.uint8),
                (torch.rand(out_f, groups, generator=g) * 0.05).half(),
                torch.randint(0, 16, (out_f, groups), generator=g, dtype=torch.uint8)))
    ids = torch.randint(1, 300, (2, 10), generator=g)
    ref = _hf_logits(hf, ids)
    rt = RuntimeModel.from_hf(hf, dtype)
    rt.setup_cache(2, 16)
    assert rt._step is not None
    if kind == "phi3":  # q, k, v and gate, up are row views of the fused modules' codes: nothing copied
        fused, q, v = hf.model.layers[0].self_attn.qkv_proj, rt.layers[0].attn.q_proj, rt.layers[0].attn.v_proj
        assert isinstance(q, IntKLinear) and q.qweight.data_ptr() == fused.qweight.data_ptr()
        assert v.qweight.data_ptr() == fused.qweight[-v.out_features:].data_ptr()
    out = torch.cat([rt(ids[:, :4], 0)] + [rt(ids[:, t:t + 1], t) for t in range(4, 10)], 1).float()
    tol = 1e-4 if dtype == torch.float32 else 0.03 * ref.abs().max().item()  # bf16: rounding of activations
    assert (out - ref).abs().max().item() <= tol
