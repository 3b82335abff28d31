"""GGUF files of every family the runtime runs (llama, qwen2, qwen3, phi3, gemma3): the converter's keys and
tensor names, every tensor dequantizing to peakllm's weights bit for bit (after the family's stored form: llama's
q/k order, Gemma's 1 + w norms), the file read back into the same logits by transformers' GGUF loader where it
can, and by the gguf-library loader always; and a file transformers misreads (a ▁-spelled vocabulary stored under
the "gpt2" tokenizer model, as llama.cpp's converter writes Gemma-3) loads through the gguf library."""

import copy

import gguf
import numpy as np
import pytest
import torch
from conftest import FAMILIES, TINY_TEXT, _randomize, tiny_family, train_tiny_tokenizer

from peakllm.formats.gguf import families
from peakllm.formats.gguf.loader import read_model, read_tokenizer
from peakllm.formats.gguf.writer import llamacpp_row_order, write_gguf
from peakllm.solvers.ggml import rtn_ggml

# keys each converter class writes beyond the common ones (TextModel's, or Phi3MiniModel's own)
FAMILY_KEYS = {"llama": ["vocab_size", "rope.dimension_count"], "qwen2": [], "qwen3": ["attention.key_length"],
               "phi3": ["rope.scaling.original_context_length", "rope.dimension_count", "attention.sliding_window"],
               "gemma3": ["attention.sliding_window", "rope.freq_base_swa", "attention.key_length"]}
COMMON_KEYS = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
               "attention.head_count_kv", "rope.freq_base", "attention.layer_norm_rms_epsilon"]


def gguf_family(kind: str, vocab_size: int = 300):
    """A tiny model whose every hyperparameter a GGUF can state: Gemma-3 with llama.cpp's layer pattern (every
    sixth layer global) and its query scale 1/sqrt(head_dim), with head_dim 256 as in every released Gemma-3
    (transformers' GGUF loader takes query_pre_attn_scalar = 256 whatever the file says)."""
    if kind != "gemma3":
        return tiny_family(kind)
    import transformers

    cfg = transformers.Gemma3TextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=6,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=256,
                                        query_pre_attn_scalar=256, sliding_window=5, max_position_embeddings=256,
                                        layer_types=["sliding_attention"] * 5 + ["full_attention"],
                                        tie_word_embeddings=True, eos_token_id=0, pad_token_id=0)
    return _randomize(transformers.Gemma3ForCausalLM(cfg), 4)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tiny_tokenizer(bos=True)


@pytest.fixture(scope="module")
def written(tmp_path_factory, tokenizer):
    """family -> (path, model, quantized weights): the MLP's matrices in Q8_0 and Q4_0, the rest in F32."""
    out = {}
    for kind in FAMILIES:
        model = gguf_family(kind)
        quantized = {n: rtn_ggml(p.detach(), "Q8_0" if "down_proj" in n else "Q4_0")
                     for n, p in model.named_parameters() if ".mlp." in n and p.dim() == 2}
        path = tmp_path_factory.mktemp("families") / f"{kind}.gguf"
        write_gguf(model, tokenizer, path, quantized, float_type="F32")
        out[kind] = (path, model, quantized)
    return out


def stored_form(model, hf_name: str, value: np.ndarray) -> np.ndarray:
    """What the file holds for ``value`` in HF order: llama's q/k rows reordered, Gemma's norms as 1 + w."""
    cfg = model.config
    name = families.tensor_names(cfg).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    heads = families.qk_heads(cfg, name)
    if heads:
        value = llamacpp_row_order(value, heads)
    shift = families.norm_shift(cfg, hf_name)
    return (torch.from_numpy(value) + shift).numpy() if shift else value


@pytest.mark.parametrize("kind", FAMILIES)
def test_keys_names_and_every_tensor_bit_for_bit(written, kind):
    path, model, quantized = written[kind]
    cfg = model.config
    reader = gguf.GGUFReader(str(path))
    arch = gguf.MODEL_ARCH_NAMES[families.ARCHES[cfg.model_type]]
    assert reader.fields["general.architecture"].contents() == arch
    for key in COMMON_KEYS + FAMILY_KEYS[kind]:
        if not (kind == "phi3" and key == "rope.freq_base"):
            assert f"{arch}.{key}" in reader.fields, key
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    stored = {t.name: t for t in reader.tensors}
    names = gguf.TensorNameMap(families.ARCHES[cfg.model_type], cfg.num_hidden_layers)
    params = {n: p for n, p in model.named_parameters() if n != "lm_head.weight"}
    assert sorted(stored) == sorted(names.get_name(n, try_suffixes=(".weight", ".bias")) for n in params)
    for hf_name, p in params.items():
        t = stored[names.get_name(hf_name, try_suffixes=(".weight", ".bias"))]
        q = quantized.get(hf_name)
        ours = q.dequantize().numpy() if q is not None else p.detach().numpy()
        theirs = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(p.shape)
        assert np.array_equal(theirs.view(np.int32), stored_form(model, hf_name, ours).view(np.int32)), hf_name


@pytest.mark.parametrize("kind", FAMILIES)
def test_file_reads_back_into_the_same_logits(written, tokenizer, kind):
    """The gguf-library loader always; transformers' loader where it reads the family (its Qwen-3 reader fails
    on these files: they go through the gguf library in peakllm)."""
    from transformers import AutoModelForCausalLM

    path, model, quantized = written[kind]
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if name in quantized:
                p.copy_(quantized[name].dequantize())
    ids = torch.tensor([tokenizer(TINY_TEXT[:120])["input_ids"]])
    with torch.no_grad():
        want = reference.eval()(input_ids=ids).logits
        ours = read_model(path)(input_ids=ids).logits
        torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)
        if kind != "qwen3":
            hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
            torch.testing.assert_close(hf.eval()(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    assert read_tokenizer(path)(TINY_TEXT[:300])["input_ids"] == tokenizer(TINY_TEXT[:300])["input_ids"]


def sentencepiece_style_tokenizer():
    """A BPE tokenizer spelled as SentencePiece's (▁ for spaces, byte fallback), like Gemma-3's tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  show_progress=False)
    tok.train_from_iterator([TINY_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def test_a_file_transformers_misreads_loads_through_the_gguf_library(tmp_path):
    from transformers import AutoTokenizer

    from peakllm import models

    tokenizer = sentencepiece_style_tokenizer()
    model = gguf_family("gemma3", vocab_size=len(tokenizer))
    path = tmp_path / "spm.gguf"
    write_gguf(model, tokenizer, path, float_type="F32")
    assert gguf.GGUFReader(str(path)).fields["tokenizer.ggml.model"].contents() == "gpt2"
    with pytest.raises(Exception, match="out of vocabulary"):  # noqa: PT011 - the tokenizers library's bare Exception
        AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    loaded, loaded_tokenizer = models.load_model(str(path))
    text = "The quick  brown fox jumps over   the lazy dog. Sphinx of black quartz!"
    assert loaded_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded_tokenizer.decode(tokenizer(text)["input_ids"]) == text
    ids = torch.tensor([tokenizer(TINY_TEXT[:100])["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_a_truncated_or_foreign_file_is_one_error(written, tmp_path):
    from peakllm.errors import PeakError
    from peakllm.formats.gguf.file import GGUFFile

    data = written["qwen2"][0].read_bytes()
    cases = {"cut.gguf": data[: len(data) // 2], "header.gguf": data[:300], "magic.gguf": b"GGML" + data[4:]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(PeakError, match="cannot read GGUF"):
            GGUFFile(tmp_path / name)
    whole = GGUFFile(written["qwen2"][0])
    assert set(whole.tensors) == {t.name for t in gguf.GGUFReader(str(written["qwen2"][0])).tensors}
