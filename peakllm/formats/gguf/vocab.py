"""The tokenizer of a GGUF file, written as llama.cpp's converter writes a tokenizer.json-only model folder
(``TextModel._set_vocab_gpt2`` / ``get_vocab_base``): every id's token with llama.cpp's token type, the
pre-tokenizer named by llama.cpp's hash of a fixed text, then gguf's ``SpecialVocab`` (merges, special token ids,
add_bos/add_eos, chat template) read from the tokenizer's saved files. The converter takes this path for every
family whose folder has no SentencePiece ``tokenizer.model``, which is how transformers saves a fast tokenizer
(Gemma-3's included: its ``▁``-spelled vocabulary is then stored under the "gpt2" model, as llama.cpp does).

A model that came from a GGUF file keeps that file's tokenizer instead, key for key, as ``llama-quantize`` does:
rebuilding it from transformers' conversion would change its kind (Gemma-3's GGUFs hold a SentencePiece "llama"
vocabulary with scores, which transformers turns into BPE merges, which the converter would write as "gpt2" with a
different pre-tokenizer: llama.cpp would then split text differently). The loader marks such a tokenizer with
its source (``attach_source``); a model folder converted from a GGUF keeps the source's ``tokenizer.*`` keys in
``tokenizer.gguf`` beside ``tokenizer.json`` (``save_tokenizer``), so they survive conversion and every output."""

from __future__ import annotations

import json
import os
import shutil
from hashlib import sha256
from pathlib import Path

import gguf

from peakllm.errors import PeakError

# llama.cpp's get_vocab_base_pre: the sha256 of str(tokenizer.encode(CHKTXT)) names the pre-tokenizer.
CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
          '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
          '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
          '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
PRE_TOKENIZERS = {  # the families peakllm runs; a tokenizer not listed gets llama.cpp's "default"
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    # Gemma-3's tokenizer.json (the converter's table names it after a Granite model with the same tokenizer)
    "789696f5946cc0fc59371f39f6097cafed196b3acded6140432f26bbb1ae1669": "granite-embed-multi-311m",
}


def pre_tokenizer(tokenizer) -> str:
    return PRE_TOKENIZERS.get(sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest(), "default")


def looks_special(token: str) -> bool:
    """TextModel.does_token_look_special: added tokens that are control tokens though not marked special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
            or (token.startswith("<unused") and token.endswith(">")))


def tokenizer_json_rows(saved: Path) -> int | None:
    """What Gemma3Model counts as the real vocabulary: tokenizer.json's model vocabulary plus its added tokens."""
    path = saved / "tokenizer.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return len(data["model"]["vocab"]) + len(data.get("added_tokens", []))


def add_bpe_tokenizer(w: gguf.GGUFWriter, tokenizer, saved: Path, vocab_size: int, *, llama: bool) -> None:
    """The converter's _set_vocab_gpt2 for ``tokenizer``, whose files ``save_pretrained`` wrote to ``saved``
    (beside the model's config.json, where SpecialVocab also looks for special token ids).
    ``llama``: LlamaModel.set_vocab's additions (add_space_prefix from the config; no BOS for a 49152 vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE":
        raise PeakError("GGUF output writes BPE tokenizers so far (SentencePiece Unigram ones are not done)")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise PeakError(f"the tokenizer has ids up to {max(vocab.values())}, beyond the model's {vocab_size} rows")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if i in added:
            if not added[i].normalized:  # llama.cpp takes added tokens as pre-normalized
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if added[i].special or looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")  # user-defined spaces, pre-normalized (Gemma)
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    config = saved / "tokenizer_config.json"
    prefix = json.loads(config.read_text(encoding="utf-8")).get("add_prefix_space") if config.is_file() else None
    prefix = getattr(tokenizer, "add_prefix_space", None) if prefix is None else prefix
    if llama and isinstance(prefix, bool):  # LlamaModel.set_vocab, from tokenizer_config.json (transformers 5 saves
        w.add_add_space_prefix(prefix)      # it only as the tokenizer's attribute; SmolLM2's own GGUF has it: False)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer(tokenizer))
    w.add_token_list(tokens)
    w.add_token_types(types)
    gguf.SpecialVocab(saved, load_merges=True, n_vocab=vocab_size).add_to_gguf(w, quiet=True)
    if llama and vocab_size == 49152:  # the converter turns BOS off for this vocabulary (granite small, SmolLM)
        w.add_add_bos_token(False)


VOCAB_FILE = "tokenizer.gguf"  # in a model folder: the tokenizer.* keys of the GGUF it was converted from
SOURCE_ATTR = "peakllm_gguf_vocab"  # on a tokenizer: the GGUF file (a model or a VOCAB_FILE) holding its keys


def attach_source(tokenizer, path: Path) -> None:
    """Mark ``tokenizer`` as the one of GGUF file ``path``, or of a model folder ``path`` with a VOCAB_FILE."""
    path = Path(path)
    if path.is_dir():
        path = path / VOCAB_FILE
    if path.is_file():
        setattr(tokenizer, SOURCE_ATTR, path)


def folder_tokenizer(path: Path):
    """The tokenizer of a model folder, marked with the GGUF tokenizer keys the folder keeps, if any."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    attach_source(tokenizer, path)
    return tokenizer


def source_of(tokenizer) -> Path | None:
    return getattr(tokenizer, SOURCE_ATTR, None)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """``save_pretrained`` and, for a tokenizer read from a GGUF, its source's keys as VOCAB_FILE."""
    tokenizer.save_pretrained(folder)
    source = source_of(tokenizer)
    if source is not None and source.name == VOCAB_FILE:  # already the keys alone: copied, not parsed again
        shutil.copyfile(source, Path(folder) / VOCAB_FILE)
    elif source is not None:
        write_vocab_file(source, Path(folder))


def write_vocab_file(source: Path, folder: Path) -> None:
    """The ``tokenizer.*`` keys of GGUF file ``source`` as ``folder/tokenizer.gguf`` (no tensors; temp, rename)."""
    reader = gguf.GGUFReader(str(source))
    tmp = folder / f".{VOCAB_FILE}.tmp"
    w = gguf.GGUFWriter(str(tmp), reader.fields["general.architecture"].contents())
    try:
        copy_source_tokenizer(w, reader)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        os.replace(tmp, folder / VOCAB_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def source_tokens(reader: gguf.GGUFReader) -> int:
    field = reader.fields.get("tokenizer.ggml.tokens")
    if field is None:
        raise PeakError(f"{reader.data.filename} has no tokenizer.ggml.tokens: it is not the GGUF its tokenizer "
                        "came from")
    return len(field.data)


def copy_source_tokenizer(w: gguf.GGUFWriter, reader: gguf.GGUFReader) -> None:
    """Every ``tokenizer.*`` key of the GGUF file ``reader`` reads into ``w``, in its order and value types
    (the gguf library's reader parses every key in Python: ~20 s for Gemma-3's 262144 tokens, once per file)."""
    for name, field in reader.fields.items():
        if name.startswith("tokenizer."):
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            w.add_key_value(name, field.contents(), kind, sub_type=sub)
