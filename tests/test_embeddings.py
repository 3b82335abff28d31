"""Quantized token embedding and lm_head: stored once when tied, looked up and multiplied by the int-k kernels
exactly as dequantize-then-matmul does, counted in bits_per_param_total."""

import json

import pytest
import torch
from safetensors import safe_open

from peakllm.cli import main
from peakllm.calibrate.embeddings import embed_grid, quantize_outer
from peakllm.models.anatomy import outer_modules
from peakllm.errors import PeakError
from peakllm.models import load_model
from peakllm.runtime.embedding import PackedEmbedding
from peakllm.runtime.linear import IntKLinear
from peakllm.solvers import Grid, rtn


def _quantize(tmp_path, model_dir, text_file, *extra, out_name="q"):
    out = tmp_path / out_name
    code = main(["quantize", "--model", str(model_dir), "--calib-dataset", str(text_file), "--calib-samples", "2",
                 "--calib-seqlen", "32", "--eval-dataset", str(text_file), "--eval-tokens", "512", "--bits", "4",
                 "--group-size", "32", "--output", str(out), "--json", *extra])
    return code, out


@pytest.fixture
def untied_model_dir(tmp_path, tiny_tokenizer):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(1)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False)).eval()
    path = tmp_path / "untied"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_quantize_outer_tied_is_one_matrix(tiny_llama):
    grid = embed_grid("8", 32)
    W = tiny_llama.model.embed_tokens.weight.detach().clone()
    assert list(outer_modules(tiny_llama)) == ["model.embed_tokens"]
    results = quantize_outer(tiny_llama, grid)
    assert list(results) == ["model.embed_tokens"]
    expect = rtn(W, Grid(bits=8, group_size=32, sym=True))
    assert torch.equal(results["model.embed_tokens"].quant.codes, expect.codes)
    assert torch.equal(tiny_llama.model.embed_tokens.weight, expect.weight)
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight  # still tied: one tensor
    assert quantize_outer(tiny_llama, embed_grid("keep")) == {}


def test_tied_embedding_stored_once_and_runs_from_codes(capsys, tmp_path, tiny_model_dir, text_file):
    code, out = _quantize(tmp_path, tiny_model_dir, text_file, "--embed-bits", "8")
    result = json.loads(capsys.readouterr().out)
    assert code == 0 and result["embed_bits"] == "8"
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert {"model.embed_tokens.qweight", "model.embed_tokens.scales"} <= names
    assert not any(n.startswith("lm_head") for n in names) and "model.embed_tokens.weight" not in names
    packed, _ = load_model(str(out))
    assert isinstance(packed.model.embed_tokens, PackedEmbedding)
    assert packed.lm_head is packed.model.embed_tokens.linear  # the tied head is the same bytes
    deq, _ = load_model(str(out), packed="dequantize")
    ids = torch.randint(0, 300, (2, 7))
    with torch.no_grad():
        assert torch.equal(packed.model.embed_tokens(ids), deq.model.embed_tokens(ids))
        for T in (1, 7):  # decode-sized (kernel) and prefill-sized (dequantize + GEMM) inputs
            a, b = packed(input_ids=ids[:, :T]).logits, deq(input_ids=ids[:, :T]).logits
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    # bits over the whole file: every stored byte of the weight files over the model's parameters, tied once
    n_params = sum(p.numel() for n, p in deq.named_parameters())
    on_disk = (out / "model.safetensors").stat().st_size
    assert result["bits_per_param_total"] == pytest.approx(8 * on_disk / n_params)
    assert main(["info", "--model", str(out), "--json"]) == 0  # info reports what quantize reported
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == n_params
    assert info["bits_per_param"] == pytest.approx(result["bits_per_param"])
    assert info["bits_per_param_total"] == pytest.approx(result["bits_per_param_total"])
    keep_code, _ = _quantize(tmp_path, tiny_model_dir, text_file, "--embed-bits", "keep", out_name="keep")
    keep = json.loads(capsys.readouterr().out)
    assert keep_code == 0 and keep["bits_per_param"] == pytest.approx(result["bits_per_param"])  # linears only
    assert keep["bits_per_param_total"] > result["bits_per_param_total"]


def test_untied_head_and_embedding_quantized_separately(capsys, tmp_path, untied_model_dir, text_file):
    code, out = _quantize(tmp_path, untied_model_dir, text_file, "--embed-bits", "4", "--embed-group-size", "16")
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    packed, _ = load_model(str(out))
    deq, _ = load_model(str(out), packed="dequantize")
    assert set(outer_modules(packed)) == {"model.embed_tokens", "lm_head"}
    assert main(["info", "--model", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == sum(p.numel() for p in deq.parameters())  # embedding and head both counted
    assert isinstance(packed.model.embed_tokens, PackedEmbedding) and isinstance(packed.lm_head, IntKLinear)
    assert packed.lm_head is not packed.model.embed_tokens.linear
    assert packed.lm_head.bits == 4 and packed.lm_head.group_size == 16
    ids = torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        assert torch.allclose(packed(input_ids=ids[:, :1]).logits, deq(input_ids=ids[:, :1]).logits,
                              atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_runtime_logits_equal_dequantize_then_matmul(capsys, tmp_path, tiny_model_dir, text_file, dtype):
    from peakllm.runtime.bench import weight_bytes_per_step
    from peakllm.runtime.model import RuntimeModel

    code, out = _quantize(tmp_path, tiny_model_dir, text_file, "--embed-bits", "8", "--eval-tokens", "0")
    assert code == 0, capsys.readouterr().err
    packed, _ = load_model(str(out))
    deq, _ = load_model(str(out), packed="dequantize")
    rt = RuntimeModel.from_hf(packed, dtype, max_seq=32)
    rt.setup_cache(1, 32)
    assert rt.packed_embed is not None and rt.lm_head is packed.lm_head
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    ref = deq(input_ids=ids).logits
    got = torch.cat([rt(ids[:, :4], 0), rt(ids[:, 4:], 4)], dim=1)  # prefill, then one decode step
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(got.float(), ref, atol=tol, rtol=tol)
    if dtype == torch.float32:
        assert rt._step is not None  # the whole-step engine ran the int-k lm_head
    # a step reads the int-k head once (the tied table is not counted again) plus one 67-byte row per sequence
    # (64 one-byte codes, one group of 64: an fp16 scale and a zero point)
    assert weight_bytes_per_step(rt, batch=2) - weight_bytes_per_step(rt) == 67
    head = packed.lm_head
    head_bytes = sum(t.numel() * t.element_size() for t in (head.qweight, head.scales, head.zeros))
    assert head_bytes == 300 * 67


def test_embed_bits_errors_before_any_work(capsys, tmp_path, tiny_model_dir, text_file):
    code, out = _quantize(tmp_path, tiny_model_dir, text_file, "--format", "compressed-tensors", "--sym",
                          "--embed-bits", "8")
    assert code == 2 and "--embed-bits keep" in capsys.readouterr().err and not out.exists()
    code, out = _quantize(tmp_path, tiny_model_dir, text_file, "--embed-group-size", "48")
    assert code == 2 and "does not divide the embedding width 64" in capsys.readouterr().err and not out.exists()
    with pytest.raises(PeakError):
        embed_grid("6")


def test_packed_embedding_scales_like_gemma():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(20, 32, generator=g)
    q = rtn(W, Grid(bits=8, group_size=16, sym=True))
    from peakllm.formats.intk import PackedIntK
    from peakllm.runtime.linear import packed_linear

    pm = PackedIntK.from_quantized(q)
    lin = packed_linear("intk", pm.to_tensors(""), pm.metadata())
    emb = PackedEmbedding(lin, torch.float32, torch.tensor(32 ** 0.5))
    ids = torch.tensor([[0, 19, 7], [7, 7, 1]])
    assert torch.equal(emb(ids), q.weight[ids] * torch.tensor(32 ** 0.5))
    with pytest.raises(PeakError):
        emb(torch.tensor([20]))
