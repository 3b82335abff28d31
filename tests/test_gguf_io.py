"""GGUF in, every output format out: a tiny random Llama written as a GGUF file (with llama.cpp's tensor
names and q/k row order, as its converter writes them) is pruned and quantized into each format, and
each output loads and evaluates; a failure to write is reported before the compression."""

import json

import numpy as np
import pytest
import torch
from conftest import tiny_llama_config, train_tiny_tokenizer

from peakllm import models
from peakllm.cli import main

LAYER_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
               "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k (interleaved RoPE halves); transformers' loader undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path, model, tokenizer, *, add_bos: bool) -> None:
    """`model` (a LlamaForCausalLM) and its byte-level BPE `tokenizer` as an fp32 GGUF file."""
    import gguf

    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in ("<eos>", "<bos>") else 1 for t in tokens])  # 3: control
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(vocab["<bos>"])
    w.add_eos_token_id(vocab["<eos>"])
    w.add_add_bos_token(add_bos)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf_name, gguf_name in LAYER_NAMES.items():
            t = sd[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name in ("attn_q", "attn_k"):
                t = _llamacpp_permute(t, cfg.num_attention_heads if gguf_name == "attn_q" else cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(t))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    """(path of a tiny Llama GGUF whose tokenizer adds BOS, the model it was written from)."""
    from transformers import LlamaForCausalLM

    tokenizer = train_tiny_tokenizer(bos=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=False, bos_token_id=1)).eval()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_llama_gguf(path, model, tokenizer, add_bos=True)
    return path, model


def test_gguf_loads_as_a_plain_model(tiny_gguf):
    path, original = tiny_gguf
    model, tokenizer = models.load_model(str(path))
    assert getattr(model, "hf_quantizer", None) is None and "quantization_config" not in model.config.to_dict()
    ids = torch.tensor([tokenizer("The quick brown fox")["input_ids"]])
    assert ids[0, 0] == tokenizer.bos_token_id
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, original(input_ids=ids).logits)


RUNS = [
    ("prune", "hf", ["--method", "wanda", "--sparsity", "0.5"]),
    ("prune", "peakllm", ["--method", "sparsegpt", "--pattern", "2:4"]),
    ("quantize", "peakllm", ["--method", "gptq", "--bits", "4", "--group-size", "32"]),
    ("quantize", "sub1", ["--method", "rtn", "--bits", "ternary", "--group-size", "64"]),
    ("quantize", "compressed-tensors", ["--method", "gptq", "--bits", "4", "--group-size", "32", "--sym"]),
]


@pytest.mark.parametrize("command,fmt,extra", RUNS, ids=[f"{c}-{f}" for c, f, _ in RUNS])
def test_gguf_input_writes_every_format(capsys, tmp_path, tiny_gguf, text_file, command, fmt, extra):
    out = tmp_path / "out"
    argv = [command, "--model", str(tiny_gguf[0]), "--format", fmt, *extra, "--calib-dataset", str(text_file),
            "--calib-samples", "3", "--calib-seqlen", "32", "--eval-dataset", str(text_file), "--eval-tokens", "512",
            "--output", str(out), "--json"]
    assert main(argv) == 0, capsys.readouterr().err
    result = json.loads(capsys.readouterr().out)
    assert result["format"] == fmt and result["bos"] is True
    assert "quantization_config" not in json.loads((out / "config.json").read_text()) or fmt == "compressed-tensors"
    assert main(["eval", "--model", str(out), "--dataset", str(text_file), "--max-tokens", "512", "--json"]) == 0
    reloaded = json.loads(capsys.readouterr().out)
    assert reloaded["bos"] is True and reloaded["ppl"] == pytest.approx(result["ppl"], rel=1e-3)


def test_gguf_and_its_converted_folder_give_the_same_perplexity(capsys, tmp_path, tiny_gguf, text_file):
    model, tokenizer = models._load_gguf(tiny_gguf[0])
    folder = tmp_path / "converted"
    models._save_hf_folder(model, tokenizer, folder)
    seen = []
    for spec in (tiny_gguf[0], folder):
        assert main(["eval", "--model", str(spec), "--dataset", str(text_file), "--seqlen", "32", "--max-tokens",
                     "256", "--json"]) == 0
        seen.append(json.loads(capsys.readouterr().out))
    assert seen[0]["bos"] is True and seen[1]["bos"] is True
    assert seen[0]["ppl"] == seen[1]["ppl"]


def _error_lines(capsys) -> list[str]:
    """stderr without transformers' GGUF progress bar (a plain tqdm bar it draws while dequantizing)."""
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    return [line for line in lines if line.strip() and "GGUF tensors" not in line]


def test_write_failure_comes_before_the_compression(capsys, tmp_path, tiny_gguf, text_file, monkeypatch):
    from peakllm.calibrate import run as compression_run

    monkeypatch.setattr(compression_run, "calibrate", lambda *a, **k: pytest.fail("compressed before the check"))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    argv = ["prune", "--model", str(tiny_gguf[0]), "--calib-dataset", str(text_file), "--calib-samples", "2",
            "--calib-seqlen", "32", "--eval-tokens", "0", "--output", str(blocker / "out")]
    assert main(argv) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "cannot create the output folder" in err[0]

    class Refusing:  # a quantizer transformers would not serialize, as on any model it holds quantized
        quantization_config = type("Cfg", (), {"quant_method": "gguf"})()

        def is_serializable(self, *a):
            return False

    original = compression_run.load_model

    def held_quantized(spec, **kw):
        model, tok = original(spec, **kw)
        model.hf_quantizer = Refusing()
        return model, tok

    monkeypatch.setattr(compression_run, "load_model", held_quantized)
    assert main(argv[:-2] + ["--output", str(tmp_path / "out2"), "--format", "hf"]) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and "cannot save it as an hf folder" in err[0]
    assert not (tmp_path / "out2").exists()
