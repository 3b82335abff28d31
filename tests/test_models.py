import json
from pathlib import Path

import pytest
import torch
from conftest import tokenizer_keys_gguf

from peakllm import models
from peakllm.errors import PeakError
from peakllm.formats.gguf.vocab import SOURCE_ATTR


def test_hf_folder_loads_with_same_logits(tiny_model_dir, tiny_llama):
    model, tok = models.load_model(str(tiny_model_dir))
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, tiny_llama(input_ids=ids).logits, atol=1e-6)
    assert tok("fox")["input_ids"]


def test_bad_specs(tmp_path, tiny_model_dir):
    with pytest.raises(PeakError, match="not found"):
        models.load_model(str(tmp_path / "missing"))
    txt = tmp_path / "weights.bin"
    txt.write_bytes(b"1234")
    with pytest.raises(PeakError, match="not a .gguf"):
        models.load_model(str(txt))
    with pytest.raises(PeakError, match="no config.json"):
        models.load_model(str(tmp_path))
    corrupt = tmp_path / "broken.gguf"
    corrupt.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    with pytest.raises(PeakError, match="cannot load GGUF"):
        models.load_model(str(corrupt))
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["model_type"] = "bert"
    (tiny_model_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PeakError, match="unsupported architecture"):
        models.load_model(str(tiny_model_dir))


def test_default_conversion_is_atomic(monkeypatch, tmp_path, tiny_llama, tiny_tokenizer):
    """An interrupted first conversion leaves no cache entry; the next call converts and reuses it."""
    monkeypatch.setenv("PEAKLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "default_gguf_path", lambda: Path("/nonexistent/model.gguf"))
    source = tokenizer_keys_gguf(tmp_path / "source.gguf", tiny_llama.config.vocab_size)

    def fake_load(path):  # the tokenizer of a GGUF file (its keys are kept in the converted folder); the
        monkeypatch.setattr(tiny_tokenizer, SOURCE_ATTR, source, raising=False)  # session's tokenizer undone after
        return tiny_llama, tiny_tokenizer

    monkeypatch.setattr(models, "_load_gguf", fake_load)
    original = type(tiny_tokenizer).save_pretrained

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_tokenizer), "save_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.default_model_dir()
    model_root = tmp_path / "cache" / "models"
    assert list(model_root.iterdir()) == []  # neither the target nor a temp folder survives
    monkeypatch.setattr(type(tiny_tokenizer), "save_pretrained", original)
    path = models.default_model_dir()
    assert (path / "config.json").is_file() and path.name == models.DEFAULT_NAME
    monkeypatch.setattr(models, "_load_gguf", lambda path: pytest.fail("converted twice"))
    assert models.default_model_dir() == path
    model, _ = models.load_model("default")
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in tiny_llama.parameters())


@pytest.mark.slow
def test_default_model_is_smollm2(default_model):
    model, tok = default_model
    assert type(model).__name__ == "LlamaForCausalLM"
    assert models.param_count(model) == 134_515_008
    assert model.config.num_hidden_layers == 30


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_packed_folder_loads_on_a_meta_skeleton_with_derived_buffers(tmp_path, family, tiny_tokenizer):
    """Loading builds the model on the meta device: every tensor must come out real and equal to the
    saved model's, including buffers derived from the config (RoPE inverse frequencies, Gemma-3's
    embedding scale), and the loaded weights must not be re-initialised on the way."""
    import transformers as tf

    from peakllm.formats.container import save_model_folder
    from peakllm.formats.intk import PackedIntK
    from peakllm.models.packed import load_peakllm_folder
    from peakllm.formats.writer import dense_state

    common = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2)
    if family == "gemma3":
        hf = tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(**common, head_dim=16)).eval()
    else:
        hf = tf.LlamaForCausalLM(tf.LlamaConfig(**common)).eval()
    name = "model.layers.1.mlp.down_proj"
    codes = torch.randint(0, 16, (64, 128), dtype=torch.uint8)
    pack = PackedIntK.from_codes(codes, torch.rand(64, 4) / 16 + 0.01, torch.full((64, 4), 8.0), bits=4, group_size=32)
    save_model_folder(tmp_path / "m", config=hf.config.to_dict(), dense_tensors=dense_state(hf, {name}),
                      packed_modules={name: pack}, manifest={}, extra_files=tiny_tokenizer.save_pretrained)
    loaded, _ = load_peakllm_folder(tmp_path / "m", packed="dequantize")
    with torch.no_grad():
        hf.get_submodule(name).weight.copy_(pack.dequantize())
    want = dict(hf.named_parameters()) | dict(hf.named_buffers())
    got = dict(loaded.named_parameters()) | dict(loaded.named_buffers())
    assert set(got) == set(want)
    for key, t in got.items():
        assert not t.is_meta, key
        torch.testing.assert_close(t, want[key], rtol=0, atol=0, msg=key)
