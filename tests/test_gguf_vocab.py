"""A tokenizer that came from a GGUF file is written back as that file has it (llama-quantize keeps the keys; a
tokenizer rebuilt from transformers' conversion changes kind: Gemma-3's SentencePiece "llama" vocabulary came out
as "gpt2" BPE with another pre-tokenizer, and llama.cpp then split the same text into other tokens), through a
converted model folder too; a source with another number of tokens than the embedding's rows is one error."""

import gguf
import pytest
from conftest import tiny_family, tokenizer_keys_gguf, train_tiny_tokenizer

from peakllm.errors import PeakError
from peakllm.formats.gguf.vocab import VOCAB_FILE, attach_source, folder_tokenizer, save_tokenizer, source_of
from peakllm.formats.gguf.writer import write_gguf


def tokenizer_fields(path) -> list:
    fields = gguf.GGUFReader(str(path)).fields
    return [(k, f.types, f.contents()) for k, f in fields.items() if k.startswith("tokenizer.")]


def test_a_gguf_tokenizer_is_written_back_key_for_key_through_a_converted_folder(tmp_path):
    model, tokenizer = tiny_family("llama"), train_tiny_tokenizer(bos=True)
    source = tokenizer_keys_gguf(tmp_path / "source.gguf", model.config.vocab_size)
    attach_source(tokenizer, source)
    folder = tmp_path / "folder"
    folder.mkdir()
    save_tokenizer(tokenizer, folder)
    reloaded = folder_tokenizer(folder)
    assert source_of(reloaded) == folder / VOCAB_FILE
    write_gguf(model, reloaded, tmp_path / "out.gguf")
    written = tokenizer_fields(tmp_path / "out.gguf")
    assert written == tokenizer_fields(source)
    assert dict((k, v) for k, _, v in written)["tokenizer.ggml.model"] == "llama"
    plain = tmp_path / "plain.gguf"  # a tokenizer with no GGUF behind it: the converter's gpt2 vocabulary
    write_gguf(model, train_tiny_tokenizer(bos=True), plain)
    assert gguf.GGUFReader(str(plain)).fields["tokenizer.ggml.model"].contents() == "gpt2"


def test_a_source_with_another_token_count_is_one_error_before_writing(tmp_path):
    model, tokenizer = tiny_family("llama"), train_tiny_tokenizer(bos=True)
    attach_source(tokenizer, tokenizer_keys_gguf(tmp_path / "source.gguf", model.config.vocab_size - 1))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(PeakError, match="one row per token"):
        write_gguf(model, tokenizer, out / "x.gguf")
    assert list(out.iterdir()) == []
