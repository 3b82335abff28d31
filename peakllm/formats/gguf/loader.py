"""A .gguf file of a family peakllm runs, read with the ``gguf`` library into a transformers model and tokenizer.

For the files transformers' own GGUF loader cannot read. The case that made this necessary: llama.cpp's
converter writes a model folder without a SentencePiece ``tokenizer.model`` (as transformers saves Gemma-3) with
its ``▁``-spelled BPE vocabulary under the "gpt2" tokenizer model; llama.cpp reads it, transformers rebuilds it as
byte-level BPE and fails ("Token `\\n` out of vocabulary"). Here the vocabulary's spelling decides: a byte-level
one gets a byte-level BPE, a ``▁``-spelled one SentencePiece's BPE (byte fallback, spaces as ``▁``).

The weights are dequantized with ``gguf.quants.dequantize`` and undo what the converter did per family
(``families.py``): llama's q/k row order, Gemma-3's ``1 + w`` norms. The hyperparameters come from the file's keys.
"""

from __future__ import annotations

import gguf
import numpy as np

from peakllm.errors import PeakError
from peakllm.formats.gguf import families
from peakllm.formats.gguf.file import GGUFFile
from peakllm.formats.gguf.reader import hf_row_order

# GGUF architecture -> (transformers config class, model class)
MODEL_CLASSES = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
                 "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
                 "phi3": ("Phi3Config", "Phi3ForCausalLM")}
GEMMA3_SWA_PATTERN = 6  # llama.cpp's default for Gemma-3: every sixth layer is global


def read_config(reader: GGUFFile):
    """The transformers config the file's keys describe."""
    import transformers

    arch = reader.get("general.architecture")
    if arch not in MODEL_CLASSES:
        raise PeakError(f"GGUF architecture {arch!r} is not one peakllm reads: {', '.join(MODEL_CLASSES)}")
    tensors = reader.tensors
    if "token_embd.weight" not in tensors:
        raise PeakError("the GGUF file has no token_embd.weight")

    def key(name, default=None):
        return reader.get(f"{arch}.{name}", default)

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    head_dim = key("attention.key_length", hidden // heads)
    theta = key("rope.freq_base", 10000.0)
    kw = dict(vocab_size=tensors["token_embd.weight"].shape[0], hidden_size=hidden,
              intermediate_size=key("feed_forward_length"), num_hidden_layers=key("block_count"),
              num_attention_heads=heads, num_key_value_heads=key("attention.head_count_kv", heads),
              max_position_embeddings=key("context_length", 2048), rms_norm_eps=key("attention.layer_norm_rms_epsilon"),
              tie_word_embeddings="output.weight" not in tensors,
              bos_token_id=reader.get("tokenizer.ggml.bos_token_id"),
              eos_token_id=reader.get("tokenizer.ggml.eos_token_id"),
              pad_token_id=reader.get("tokenizer.ggml.padding_token_id"))
    rope = {"rope_type": "default", "rope_theta": theta}
    if arch in ("llama", "qwen3", "gemma3"):
        kw["head_dim"] = head_dim
    if arch == "phi3":
        rot = key("rope.dimension_count", head_dim) * heads / hidden
        kw.update(original_max_position_embeddings=key("rope.scaling.original_context_length"),
                  sliding_window=key("attention.sliding_window") or None)
        rope["partial_rotary_factor"] = rot
        if key("rope.dimension_count", head_dim) != head_dim:
            kw["partial_rotary_factor"] = rot
    if arch == "gemma3":
        n = kw["num_hidden_layers"]
        swa = key("attention.sliding_window", 0)
        kw.update(query_pre_attn_scalar=head_dim, sliding_window=swa or None,
                  final_logit_softcapping=key("final_logit_softcapping"),
                  layer_types=[("sliding_attention" if swa and (i + 1) % GEMMA3_SWA_PATTERN else "full_attention")
                               for i in range(n)])
        if key("rope.scaling.type") == "linear":
            rope.update(rope_type="linear", factor=key("rope.scaling.factor"))
        rope = {"full_attention": rope, "sliding_attention": {"rope_type": "default",
                                                              "rope_theta": key("rope.freq_base_swa", 10000.0)}}
    config_class = getattr(transformers, MODEL_CLASSES[arch][0])
    try:  # transformers 5 takes rope_parameters; 4 takes rope_theta (and rope_local_base_freq)
        cfg = config_class(**kw, rope_parameters=rope)
        if getattr(cfg, "rope_parameters", None) is None:
            raise TypeError
    except TypeError:
        full = rope.get("full_attention", rope)
        extra = {"rope_local_base_freq": rope["sliding_attention"]["rope_theta"]} if "sliding_attention" in rope else {}
        if full.get("rope_type") == "linear":
            extra["rope_scaling"] = {"rope_type": "linear", "factor": full["factor"]}
        cfg = config_class(**kw, rope_theta=full["rope_theta"], **extra)
    return cfg


def read_model(path, dtype=None):
    """The file's model, as a transformers ``*ForCausalLM`` with dense float weights (fp32 unless ``dtype``)."""
    import torch
    import transformers

    reader = GGUFFile(path)
    cfg = read_config(reader)
    model = getattr(transformers, MODEL_CLASSES[reader.get("general.architecture")][1])(cfg)
    names = families.tensor_names(cfg)
    stored = reader.tensors
    state = {}
    for hf_name, p in model.named_parameters():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        t = stored.get(name) if name else None
        if t is None:
            raise PeakError(f"the GGUF file has no tensor {name or hf_name} for {hf_name}")
        if t.shape != tuple(p.shape):
            raise PeakError(f"{t.name}: the file stores {list(t.shape)}, the model needs {list(p.shape)}")
        value = reader.dequantize(t.name)
        heads = families.qk_heads(cfg, name)
        if heads:
            value = hf_row_order(value, heads)
        value = torch.from_numpy(np.array(value, dtype=np.float32))  # a writable copy, off the memory map
        shift = families.norm_shift(cfg, hf_name)
        state[hf_name] = value - shift if shift else value
    model.load_state_dict(state, strict=False)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.to(dtype or torch.float32).eval()


def byte_level(tokens: list[str], types: list[int]) -> bool:
    """Whether the normal tokens are spelled in GPT-2's byte alphabet (else SentencePiece's, with ``▁``)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = set(bytes_to_unicode().values())
    normal = [t for t, k in zip(tokens, types) if k == gguf.TokenType.NORMAL]
    return sum(set(t) <= alphabet for t in normal) >= 0.99 * max(len(normal), 1)


def read_tokenizer(path):
    """The file's tokenizer, built with the ``tokenizers`` library from its vocabulary, merges and special ids."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    reader = GGUFFile(path)
    tokens = reader.get("tokenizer.ggml.tokens")
    merges = reader.get("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise PeakError(f"the GGUF file {path} has no BPE vocabulary with merges to build a tokenizer from")
    types = reader.get("tokenizer.ggml.token_type") or [gguf.TokenType.NORMAL] * len(tokens)
    special = {k: reader.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    spm = not byte_level(tokens, types)
    if spm:  # the converter stored user-defined tokens with real spaces; the vocabulary spells them with ▁
        tokens = [t.replace(" ", "\u2581") if k == gguf.TokenType.USER_DEFINED else t for t, k in zip(tokens, types)]
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    unk = tokens[special["unknown"]] if special["unknown"] is not None else None
    if spm:
        tok = Tokenizer(models.BPE(vocab, pairs, unk_token=unk, byte_fallback=True, fuse_unk=True))
        prefix = bool(reader.get("tokenizer.ggml.add_space_prefix", False))
        steps = [normalizers.Prepend("\u2581")] if prefix else []
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    else:
        tok = Tokenizer(models.BPE(vocab, pairs))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    added = [AddedToken(t, special=k == gguf.TokenType.CONTROL, normalized=False)
             for t, k in zip(tokens, types) if k in (gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED)]
    tok.add_tokens(added)
    names = {"bos_token": special["bos"], "eos_token": special["eos"], "unk_token": special["unknown"],
             "pad_token": special["padding"]}
    kwargs = {k: tokens[i] for k, i in names.items() if i is not None and 0 <= i < len(tokens)}
    add_bos = reader.get("tokenizer.ggml.add_bos_token", False) and "bos_token" in kwargs
    add_eos = reader.get("tokenizer.ggml.add_eos_token", False) and "eos_token" in kwargs
    if add_bos or add_eos:
        single = ([kwargs["bos_token"]] if add_bos else []) + ["$A"] + ([kwargs["eos_token"]] if add_eos else [])
        ids = {kwargs[k]: special[k.split("_")[0]] for k in ("bos_token", "eos_token") if k in kwargs}
        tok.post_processor = processors.TemplateProcessing(single=" ".join(single), special_tokens=list(ids.items()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    template = reader.get("tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer
