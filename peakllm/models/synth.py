"""Randomly initialised models of real architectures' shapes, written as bf16 safetensors shards.

No 1B+ weights can be installed here, so scale is measured on random weights of the real shapes: they
say everything about memory and time and nothing about quality (every table labels them so). A model is
written one decoder layer at a time (one shard per layer plus one for the rest), so writing a 7B shape
needs memory for one layer, not for the model. The tokenizer is the default model's (vocab 49152); a
shape whose vocabulary is smaller is widened to it so every token id is valid (stated in `info`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from peakllm.errors import PeakError
from peakllm.formats.folder import staged_dir
from peakllm.models.anatomy import decoder_layers
from peakllm.progress import tqdm

# name -> (model_type, config overrides); numbers from the published configs of each model
SHAPES = {
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False)),
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                                   tie_word_embeddings=False)),
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                                   tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0,
                                   tie_word_embeddings=True)),
    "olmoe-1b-7b": ("olmoe", dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                  num_attention_heads=16, num_key_value_heads=16, vocab_size=50304,
                                  num_experts=64, num_experts_per_tok=8, max_position_embeddings=4096,
                                  rms_norm_eps=1e-5, tie_word_embeddings=False)),
    # tiny stand-ins of the same families, for tests
    "tiny-llama": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=0, max_position_embeddings=512,
                                 tie_word_embeddings=False)),
    "tiny-olmoe": ("olmoe", dict(hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=0, num_experts=4, num_experts_per_tok=2,
                                 max_position_embeddings=512, tie_word_embeddings=False)),
}
STD = 0.02  # the families' initializer_range


def shape_config(shape: str, vocab_size: int, special_tokens: dict | None = None):
    from transformers import AutoConfig

    if shape not in SHAPES:
        raise PeakError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    model_type, overrides = SHAPES[shape]
    cfg = dict(overrides)
    cfg["vocab_size"] = max(cfg["vocab_size"], vocab_size)
    cfg.update(special_tokens or {})
    config = AutoConfig.for_model(model_type, **cfg)
    config.initializer_range = STD
    return config


def synthesize(shape: str, out_dir, *, tokenizer, dtype=torch.bfloat16, seed: int = 0, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Write a random model of `shape` to `out_dir` (temp folder, then rename); return its facts."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM


    config = shape_config(shape, len(tokenizer), {"bos_token_id": tokenizer.bos_token_id,
                                                  "eos_token_id": tokenizer.eos_token_id, "pad_token_id": None})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers, prefix = decoder_layers(model)
    tied = getattr(config, "tie_word_embeddings", False)
    params = {n: p for n, p in model.named_parameters()}  # tied lm_head appears once, as the embedding
    nbytes = sum(p.numel() for p in params.values()) * torch.empty((), dtype=dtype).element_size()
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out_dir.parent).free
    if nbytes * 1.02 + (64 << 20) > free:
        raise PeakError(f"{shape} needs {nbytes / 1e9:.1f} GB on disk; {out_dir.parent} has {free / 1e9:.1f} GB free")
    groups = [[n for n in params if n.startswith(f"{prefix}.{i}.")] for i in range(len(layers))]
    in_layers = {n for g in groups for n in g}
    groups.append([n for n in params if n not in in_layers])
    total = len(groups)
    weight_map = {}
    gen = torch.Generator().manual_seed(seed)
    with staged_dir(out_dir, overwrite) as tmp:
        for k, names in enumerate(tqdm(groups, desc=f"writing {shape}", unit="shard", disable=not progress)):
            fname = f"model-{k + 1:05d}-of-{total:05d}.safetensors"
            tensors = {}
            for n in names:
                p = params[n]
                if n.endswith("norm.weight") or n.endswith("layernorm.weight"):
                    t = torch.ones(p.shape, dtype=dtype)
                elif n.endswith(".bias"):
                    t = torch.zeros(p.shape, dtype=dtype)
                else:
                    t = torch.empty(p.shape, dtype=torch.float32).normal_(0.0, STD, generator=gen).to(dtype)
                tensors[n] = t
                weight_map[n] = fname
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors
        index = {"metadata": {"total_size": nbytes, "peakllm_synth": shape, "random_weights": "true"},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        config.dtype = dtype
        config.architectures = [type(model).__name__]  # what vLLM and transformers' pipelines dispatch on
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "PEAKLLM_SYNTH.json").write_text(json.dumps(
            {"shape": shape, "seed": seed, "random_weights": True,
             "note": "randomly initialised: measures memory and time, never quality"}, indent=2) + "\n")
    n_params = sum(p.numel() for p in params.values())
    return {"shape": shape, "output": str(out_dir), "params": n_params, "size_bytes": nbytes, "shards": total,
            "layers": len(layers), "vocab_size": config.vocab_size, "tied_embeddings": tied, "random_weights": True}
