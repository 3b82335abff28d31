"""What each model family's GGUF file holds beyond its tensors' bytes, as llama.cpp's ``convert_hf_to_gguf.py``
writes it (its classes ``LlamaModel``, ``Qwen2Model``, ``Qwen3Model``, ``Gemma3Model``, ``Phi3MiniModel``).

- the architecture (``general.architecture``, and the prefix of its keys) and the hyperparameter keys;
- per-tensor changes: llama's q/k rows in llama.cpp's RoPE order, Gemma-3's norm weights stored as ``1 + w``
  (``Gemma3RMSNorm`` multiplies by ``1 + w``; llama.cpp by the stored value) and its token embedding cut to
  the tokenizer's real vocabulary; Phi-3's fused ``qkv_proj`` and ``gate_up_proj`` stay fused
  (``attn_qkv``, ``ffn_up``), as the converter leaves them;
- the tokenizer's quirks (``writer.add_bpe_tokenizer``): the BOS flag llama turns off for SmolLM's vocabulary.
Tensor names come from gguf's own ``TensorNameMap`` for the architecture.
"""

from __future__ import annotations

import gguf

from peakllm.errors import PeakError

# HF model_type -> the GGUF architecture the converter writes for it
ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2,
          "qwen3": gguf.MODEL_ARCH.QWEN3, "gemma3_text": gguf.MODEL_ARCH.GEMMA3, "phi3": gguf.MODEL_ARCH.PHI3}
PERMUTED_QK = {gguf.MODEL_ARCH.LLAMA}  # LlamaModel.permute: q/k rows in llama.cpp's RoPE order
NORM_SHIFT = {gguf.MODEL_ARCH.GEMMA3: 1.0}  # added to every "*norm.weight" (Gemma3Model.norm_shift)


def arch_of(cfg) -> gguf.MODEL_ARCH:
    model_type = getattr(cfg, "model_type", None)
    if model_type not in ARCHES:
        raise PeakError(f"GGUF output is written for the families {', '.join(sorted(ARCHES))}, not {model_type!r}")
    return ARCHES[model_type]


def rope_of(cfg) -> tuple[dict, dict]:
    """(the global layers' RoPE parameters, the sliding layers' or {}), from transformers 5's
    ``rope_parameters`` (per layer type for Gemma-3) or transformers 4's ``rope_theta``/``rope_scaling``."""
    rope = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    if "full_attention" in rope or "sliding_attention" in rope:
        return dict(rope.get("full_attention", {})), dict(rope.get("sliding_attention", {}))
    if "rope_theta" not in rope and getattr(cfg, "rope_theta", None) is not None:
        rope["rope_theta"] = cfg.rope_theta
    local = getattr(cfg, "rope_local_base_freq", None)
    return rope, ({"rope_theta": local} if local is not None else {})


def check_family(cfg) -> gguf.MODEL_ARCH:
    """The file's architecture, or one error for a model the writer cannot describe as the converter would."""
    arch = arch_of(cfg)
    rope, _ = rope_of(cfg)
    kind = rope.get("rope_type", rope.get("type", "default"))
    allowed = ("default", "linear") if arch == gguf.MODEL_ARCH.GEMMA3 else ("default",)
    if kind not in allowed or (arch == gguf.MODEL_ARCH.PHI3 and rope.get("long_factor")):
        raise PeakError(f"GGUF output does not write RoPE scaling {kind!r} for {cfg.model_type} yet")
    return arch


def head_dim_of(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def add_text_metadata(w: gguf.GGUFWriter, cfg) -> None:
    """TextModel.set_gguf_parameters: the keys every family starts from."""
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    rope, local = rope_of(cfg)
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(rope["factor"])
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(rope["rope_theta"])
    if local.get("rope_theta") is not None:
        w.add_rope_freq_base_swa(local["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if getattr(cfg, "head_dim", None) is not None:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)


def add_metadata(w: gguf.GGUFWriter, cfg, name: str | None, file_type: gguf.LlamaFileType) -> None:
    """The hyperparameter keys of ``cfg``'s family, as its converter class writes them."""
    arch = check_family(cfg)
    w.add_type(gguf.GGUFType.MODEL)
    if name:
        w.add_name(name)
    if arch == gguf.MODEL_ARCH.PHI3:
        add_phi3_metadata(w, cfg)
    else:
        add_text_metadata(w, cfg)
    w.add_file_type(file_type)
    if arch == gguf.MODEL_ARCH.LLAMA:  # LlamaModel.set_gguf_parameters
        w.add_vocab_size(cfg.vocab_size)
        w.add_rope_dimension_count(head_dim_of(cfg))
    elif arch == gguf.MODEL_ARCH.GEMMA3:  # Gemma3Model.set_gguf_parameters, over TextModel's keys
        if getattr(cfg, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(cfg.final_logit_softcapping)
        if getattr(cfg, "sliding_window_pattern", None) != 1:
            w.add_sliding_window(cfg.sliding_window)


def add_phi3_metadata(w: gguf.GGUFWriter, cfg) -> None:
    """Phi3MiniModel.set_gguf_parameters (which does not start from TextModel's)."""
    rope, _ = rope_of(cfg)
    partial = rope.get("partial_rotary_factor", getattr(cfg, "partial_rotary_factor", None) or 1.0)
    original = rope.get("original_max_position_embeddings", getattr(cfg, "original_max_position_embeddings", None))
    if original is None:
        raise PeakError("a Phi-3 GGUF needs original_max_position_embeddings in the config")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_rope_scaling_orig_ctx_len(original)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(int(partial * cfg.hidden_size) // cfg.num_attention_heads)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_sliding_window(getattr(cfg, "sliding_window", None) or 0)


def tensor_names(cfg) -> gguf.TensorNameMap:
    return gguf.TensorNameMap(arch_of(cfg), cfg.num_hidden_layers)


def qk_heads(cfg, name: str) -> int:
    """> 0 for a tensor whose rows the family stores in llama.cpp's q/k order, for that many heads."""
    if arch_of(cfg) not in PERMUTED_QK or not name.startswith("blk."):
        return 0
    return cfg.num_attention_heads if ".attn_q." in name else cfg.num_key_value_heads if ".attn_k." in name else 0


def norm_shift(cfg, hf_name: str) -> float:
    return NORM_SHIFT.get(arch_of(cfg), 0.0) if hf_name.endswith("norm.weight") else 0.0


def stored_rows(cfg, hf_name: str, rows: int, tokenizer_rows: int | None) -> int:
    """Gemma3Model.modify_tensors keeps only the token embedding rows the tokenizer has (its tokenizer.json's
    vocabulary and added tokens): the rows the file stores."""
    if arch_of(cfg) == gguf.MODEL_ARCH.GEMMA3 and hf_name.endswith("embed_tokens.weight") and tokenizer_rows:
        return min(rows, tokenizer_rows)
    return rows
