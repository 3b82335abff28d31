"""compressed-tensors export: our bitstreams equal compressed-tensors' own packing, and a tiny random Llama
exported with int-k weights loads with plain AutoModelForCausalLM.from_pretrained and computes exactly the
logits of the same model with the dequantized weights put back."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json

import pytest
import torch

from peakllm.errors import PeakError
from peakllm.formats.compressed_tensors import export_compressed_tensors, module_tensors
from peakllm.formats.intk import PackedIntK, PackedTernary
from peakllm.formats.sparse import PackedBitmask
from peakllm.solvers.grids import Grid
from peakllm.solvers.rtn import rtn

ct_helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(5, 64), (33, 96), (7, 40)])
def test_packing_equals_compressed_tensors_own(bits, shape):
    """compressed-tensors packs signed codes q - 2^(bits-1); its int32 words must equal our bitstream."""
    g = torch.Generator().manual_seed(bits * 7 + shape[0])
    W = torch.randn(shape, generator=g)
    mod = PackedIntK.from_quantized(rtn(W, Grid("affine", bits, 8, False)))
    offset = 1 << (bits - 1)
    signed = (mod.codes().to(torch.int16) - offset).to(torch.int8)
    got = module_tensors("m", mod, torch.float32)
    assert torch.equal(got["m.weight_packed"], ct_helpers.pack_to_int32(signed, bits))
    signed_zp = (mod.zeros.to(torch.int16) - offset).to(torch.int8)
    assert torch.equal(got["m.weight_zero_point"], ct_helpers.pack_to_int32(signed_zp, bits, packed_dim=0))
    assert got["m.weight_shape"].tolist() == list(shape)
    assert torch.equal(got["m.weight_scale"], mod.scales.float())


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def quantize_and_export(tmp_path, grids):
    """RTN every decoder linear (grids cycled over them), export, and build the reference model that holds
    the dequantized weights."""
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in LINEARS]
    packed = {n: PackedIntK.from_quantized(rtn(model.get_submodule(n).weight.data, grids[i % len(grids)]))
              for i, n in enumerate(names)}
    dense = {k: v for k, v in model.state_dict().items() if k.removesuffix(".weight") not in packed}
    out = export_compressed_tensors(tmp_path / "ct", model.config.to_dict(), dense, packed,
                                    tokenizer_save_fn=lambda d: (d / "marker.txt").write_text("tokenizer here"))
    with torch.no_grad():
        for n, mod in packed.items():
            model.get_submodule(n).weight.copy_(mod.dequantize())
    return model, packed, out


SCHEMES = {
    # symmetric schemes load compressed, any mix per layer
    "sym-mixed": [Grid("affine", 4, 32, True), Grid("affine", 8, -1, True), Grid("affine", 3, 16, True),
                  Grid("affine", 2, -1, True)],
    "int4-asym-g32": [Grid("affine", 4, 32, False)],
    "int8-asym-channel": [Grid("affine", 8, -1, False)],
    "int3-asym-g16": [Grid("affine", 3, 16, False)],
}


@pytest.mark.parametrize("scheme", SCHEMES)
def test_transformers_loads_export_with_same_logits(tmp_path, scheme):
    from transformers import AutoModelForCausalLM

    ref, packed, out = quantize_and_export(tmp_path, SCHEMES[scheme])
    assert (out / "marker.txt").read_text() == "tokenizer here"
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied: stored once, as the embedding
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and qc["quant_method"] == "compressed-tensors"
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits, loaded(ids).logits
    # compressed-tensors rebuilds (q_s - zp_s) * scale in fp32 from an fp16-exact scale and small integers,
    # which is exact, so every weight is bit-identical to ours ...
    for n, mod in packed.items():
        assert torch.equal(loaded.get_submodule(n).weight, mod.dequantize()), n
    # ... and the forward passes run the same fp32 ops on the same weights. The 1e-5 allowance (logits are
    # O(1)) only covers a library choosing another summation order; on this machine the difference is 0.
    assert (want - got).abs().max().item() <= 1e-5
    assert (want - got).abs().max().item() < 1e-3 * want.abs().max().item()


def _mod(bits=4, cols=64, group_size=32, sym=False, seed=0):
    W = torch.randn(8, cols, generator=torch.Generator().manual_seed(seed))
    return PackedIntK.from_quantized(rtn(W, Grid("affine", bits, group_size, sym)))


def test_unrepresentable_schemes_raise(tmp_path):
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    cfg = {"model_type": "llama"}
    act = _mod()
    act.g_idx = torch.randperm(64, generator=torch.Generator().manual_seed(1)).to(torch.int32) % 2
    cases = {
        "ternary": PackedTernary.from_quantized(rtn(W, Grid("ternary", 2, 32, False))),
        "sparse": PackedBitmask.pack(W, W > 0),
        "act-order": act,
        "divide": _mod(cols=50, group_size=16),
    }
    for match, mod in cases.items():
        with pytest.raises(PeakError, match=match):
            export_compressed_tensors(tmp_path / "x", cfg, {}, {"layer": mod})
    with pytest.raises(PeakError, match="one scheme"):
        export_compressed_tensors(tmp_path / "x", cfg, {}, {"a": _mod(4), "b": _mod(8)})
    with pytest.raises(PeakError, match="nothing to export"):
        export_compressed_tensors(tmp_path / "x", cfg, {"w": W}, {})
    with pytest.raises(PeakError, match="both"):
        export_compressed_tensors(tmp_path / "x", cfg, {"a.weight": W}, {"a": _mod()})
    assert not (tmp_path / "x").exists()
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("")
    with pytest.raises(PeakError, match="not empty"):
        export_compressed_tensors(tmp_path / "x", cfg, {}, {"a": _mod()})


@pytest.mark.slow
def test_default_model_int4_export_loads_in_transformers(tmp_path):
    """The real default model (SmolLM2-135M), every decoder linear RTN int4 g32 symmetric, exported and
    loaded back by transformers: same logits as the model holding our dequantized weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peakllm.models import load_model

    model, tokenizer = load_model("default")
    packed = {n: PackedIntK.from_quantized(rtn(m.weight.data, Grid("affine", 4, 32, True)))
              for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    dense = {k: v for k, v in model.state_dict().items() if k.removesuffix(".weight") not in packed}
    out = export_compressed_tensors(tmp_path / "ct", model.config.to_dict(), dense, packed,
                                    tokenizer_save_fn=tokenizer.save_pretrained)
    with torch.no_grad():
        for n, mod in packed.items():
            model.get_submodule(n).weight.copy_(mod.dequantize())
    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(out)("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = model(ids).logits, loaded(ids).logits
    assert all(torch.equal(loaded.get_submodule(n).weight, mod.dequantize()) for n, mod in packed.items())
    assert (want - got).abs().max().item() <= 1e-4  # identical weights; logits here are O(10)
    size = (out / "model.safetensors").stat().st_size
    quantized_params = sum(m.num_params for m in packed.values())
    # 4 bits a weight + an fp32 scale per 32, the rest (embedding once, norms) dense fp32, plus the header
    dense_bytes = sum(t.numel() * t.element_size() for k, t in dense.items() if k != "lm_head.weight")
    assert size < dense_bytes + quantized_params * (4 + 32 / 32) / 8 + 200_000
