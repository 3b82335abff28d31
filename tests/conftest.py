"""Shared fixtures: a tiny trained tokenizer and tiny random Llama models built locally from configs."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Int-k decoding defaults to int8 activations; most tests compare the kernels with fp32 references (HF
# greedy tokens, dequantize-then-matmul), so they run with fp32 activations, and the int8 path is tested
# on its own against its stated bound (test_kernels_intk_int8act.py), also as the unset default there.
os.environ.setdefault("PEAKLLM_INTK_ACT", "f32")

import pytest
import torch

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
) * 40


def train_tiny_tokenizer(*, bos: bool = False):
    """A byte-level BPE tokenizer trained in a second on a pangram text (vocab 300): <eos>, and <bos> with `bos`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<bos>"] if bos else ["<eos>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", **({"bos_token": "<bos>"} if bos else {}))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return train_tiny_tokenizer()


def tokenizer_keys_gguf(path, tokens: int, arch: str = "llama"):
    """A GGUF file holding only tokenizer keys, of the kinds Gemma-3's files hold (a SentencePiece "llama"
    vocabulary: tokens, scores, types, flags, ids): what a converted built-in folder keeps of its source."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"\u2581t{i}" for i in range(tokens)])
    w.add_token_scores([-float(i) for i in range(tokens)])
    w.add_token_types([3, 3] + [1] * (tokens - 2))
    w.add_bos_token_id(1)
    w.add_add_bos_token(True)
    w.add_add_space_prefix(False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    return path


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=0,
               bos_token_id=0, pad_token_id=0)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def _randomize(model, seed: int):
    # Random weights everywhere (norm weights and biases too), so no term of the forward is trivial.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if "norm" in name else 0.0))
    return model.eval()


FAMILIES = ("llama", "qwen2", "qwen3", "phi3", "gemma3")


def hf_greedy(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy tokens, each from a full forward over everything so far: no cache, no generation config."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, hf(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[:, prompt.shape[1]:]


def tiny_family(kind: str, **overrides):
    """A tiny random model of one family the runtime runs (vocab 300, EOS 0), every weight random."""
    import transformers

    if kind == "llama":
        return _randomize(transformers.LlamaForCausalLM(tiny_llama_config(**overrides)), 0)
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True, eos_token_id=0)
    common.update(overrides)
    if kind == "qwen2":  # also Qwen2.5's shape: q/k/v biases
        return _randomize(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**common)), 1)
    if kind == "qwen3":
        return _randomize(transformers.Qwen3ForCausalLM(transformers.Qwen3Config(head_dim=16, **common)), 2)
    if kind == "phi3":  # fused qkv_proj and gate_up_proj
        common.setdefault("pad_token_id", 0)
        return _randomize(transformers.Phi3ForCausalLM(transformers.Phi3Config(**common)), 3)
    if kind == "gemma3":
        # Scaled embeddings, (1 + w) norms before and after attention and MLP, q/k norms, GeGLU, a query
        # scalar that is not head_dim, and local layers with a 5-token window and their own RoPE base
        # between global ones: sequences of more than 5 tokens cross the window.
        common.update(num_hidden_layers=3, pad_token_id=0)
        common.setdefault("layer_types", ["sliding_attention", "full_attention", "sliding_attention"])
        cfg = transformers.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=24, sliding_window=5, **common)
        return _randomize(transformers.Gemma3ForCausalLM(cfg), 4)
    raise ValueError(kind)


@pytest.fixture
def tiny_llama():
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    return model


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_llama, tiny_tokenizer):
    """A tiny random Llama saved as a normal Hugging Face folder."""
    path = tmp_path / "tiny-llama"
    tiny_llama.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TINY_TEXT, encoding="utf-8")
    return path


def pytest_sessionstart(session):
    """Build the C++ kernels (or load them from ~/.cache/peakllm) before the tests isolate their caches: a
    test that only uses a kernel should not compile it in every session; the tests marked `build` are
    the ones about compiling."""
    from peakllm.kernels.build import load_library

    for name in ("dense", "decode", "intk", "sparse", "sub1"):
        load_library(name)


@pytest.fixture(autouse=True)
def _isolated_cache(request, tmp_path_factory, monkeypatch):
    """Unit tests get a cache of their own; slow tests use the user's cache (the converted default model)."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("PEAKLLM_CACHE", str(tmp_path_factory.getbasetemp() / "peakllm-cache"))


@pytest.fixture(scope="session")
def default_model():
    """The real default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from peakllm.models import load_model

    return load_model("default")
