"""The BOS protocol: segments, windows and prompts start with BOS exactly when the tokenizer adds it; a
tokenizer that adds none (SmolLM2's) gets the very tensors it got before BOS handling existed."""

import json

import pytest
import torch
from conftest import TINY_TEXT

from peakllm import data
from peakllm.cli import main
from peakllm.cli.generate_cmd import prompt_ids
from peakllm.eval import cached_evaluate, evaluate


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The tiny byte-level BPE, with a <bos> its post-processor puts first (as Gemma's and Llama's do)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>", "<bos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TINY_TEXT], trainer)
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", bos_token="<bos>")


def _old_segments(tokenizer, n, seqlen, source, seed):
    """calibration_segments as it was before the BOS protocol (the reference the no-BOS path must equal)."""
    tokens = data.tokenize_source(tokenizer, source)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (n,), generator=gen)
    return torch.stack([tokens[s : s + seqlen] for s in starts.tolist()])


def _old_windows(tokens, seqlen, max_tokens):
    n = min(tokens.numel() // seqlen, max_tokens // seqlen)
    return tokens[: n * seqlen].view(n, seqlen)


def test_detects_bos_from_what_the_tokenizer_does(tiny_tokenizer, bos_tokenizer):
    assert data.bos_token_id(tiny_tokenizer) is None
    assert data.bos_token_id(bos_tokenizer) == bos_tokenizer.bos_token_id
    assert data.protocol_bos(bos_tokenizer, False) is None
    # a bos_token that the tokenizer does not put first is not the protocol's business
    plain = type(tiny_tokenizer)(tokenizer_object=tiny_tokenizer.backend_tokenizer, eos_token="<eos>", bos_token="<eos>")
    assert plain.bos_token_id is not None and data.bos_token_id(plain) is None


def test_no_bos_tokenizer_gets_the_old_segments_and_windows(tiny_tokenizer, text_file):
    old = _old_segments(tiny_tokenizer, 5, 32, str(text_file), 3)
    for bos in (True, False):
        assert torch.equal(data.calibration_segments(tiny_tokenizer, 5, 32, source=str(text_file), seed=3, bos=bos), old)
    tokens = data.tokenize_source(tiny_tokenizer, str(text_file))
    bos_id = data.protocol_bos(tiny_tokenizer)
    assert torch.equal(data.eval_windows(tokens, 32, 200, bos_id=bos_id), _old_windows(tokens, 32, 200))


def test_bos_replaces_the_first_token_and_keeps_the_rest(bos_tokenizer, text_file):
    bos = bos_tokenizer.bos_token_id
    old = _old_segments(bos_tokenizer, 5, 32, str(text_file), 3)
    seg = data.calibration_segments(bos_tokenizer, 5, 32, source=str(text_file), seed=3)
    assert seg.shape == old.shape and (seg[:, 0] == bos).all() and torch.equal(seg[:, 1:], old[:, 1:])
    assert torch.equal(data.calibration_segments(bos_tokenizer, 5, 32, source=str(text_file), seed=3, bos=False), old)
    tokens = data.tokenize_source(bos_tokenizer, str(text_file))
    assert (tokens != bos).all()  # the cached text stream itself carries no BOS
    win = data.eval_windows(tokens, 32, 200, bos_id=bos)
    ref = _old_windows(tokens, 32, 200)
    assert win.shape == ref.shape and (win[:, 0] == bos).all() and torch.equal(win[:, 1:], ref[:, 1:])
    assert torch.equal(tokens[:32], ref[0])  # the cached token stream was not changed in place


def test_evaluate_reports_the_protocol_and_caches_each_apart(tiny_llama, tiny_tokenizer, bos_tokenizer,
                                                             tiny_model_dir, text_file):
    kw = dict(seqlen=32, max_tokens=128, progress=False)
    plain = [evaluate(tiny_llama, tiny_tokenizer, str(text_file), bos=b, **kw) for b in (True, False)]
    assert plain[0]["bos"] is False and plain[1]["bos"] is False and plain[0]["ppl"] == plain[1]["ppl"]
    with_bos = evaluate(tiny_llama, bos_tokenizer, str(text_file), **kw)
    without = evaluate(tiny_llama, bos_tokenizer, str(text_file), bos=False, **kw)
    assert with_bos["bos"] is True and without["bos"] is False and with_bos["ppl"] != without["ppl"]
    spec = str(tiny_model_dir)
    first = cached_evaluate(tiny_llama, bos_tokenizer, spec, str(text_file), **kw)
    second = cached_evaluate(tiny_llama, bos_tokenizer, spec, str(text_file), bos=False, **kw)
    assert (first["ppl"], first["bos"]) == (with_bos["ppl"], True)
    assert (second["ppl"], second["bos"]) == (without["ppl"], False)
    assert cached_evaluate(tiny_llama, bos_tokenizer, spec, str(text_file), **kw)["ppl"] == with_bos["ppl"]


def test_no_bos_cache_key_is_the_old_one(tiny_llama, tiny_tokenizer, tiny_model_dir, text_file):
    """Entries cached before BOS handling stay valid for tokenizers without BOS (same windows, same key)."""
    import hashlib

    from peakllm.eval import _model_identity
    from peakllm.paths import cache_dir

    spec = str(tiny_model_dir)
    parts = [_model_identity(spec), str(text_file), 32, 64, "torch.float32"]
    path = cache_dir() / "evals" / f"{hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"ppl": 123.0}))
    result = cached_evaluate(tiny_llama, tiny_tokenizer, spec, str(text_file), seqlen=32, max_tokens=64, progress=False)
    assert result == {"ppl": 123.0, "bos": False}


def test_prompts_get_bos_once(tiny_tokenizer, bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    ids = prompt_ids(bos_tokenizer, "The quick", chat=False)
    assert ids[0, 0] == bos and (ids[0, 1:] != bos).all()
    assert torch.equal(prompt_ids(bos_tokenizer, "The quick", chat=False, bos=False), ids[:, 1:])
    bos_tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    try:
        chat = prompt_ids(bos_tokenizer, "The quick", chat=True)
    finally:
        bos_tokenizer.chat_template = None
    assert chat[0, 0] == bos and (chat[0, 1:] != bos).all()
    plain = prompt_ids(tiny_tokenizer, "The quick", chat=False)
    assert torch.equal(plain, tiny_tokenizer("The quick", add_special_tokens=False, return_tensors="pt")["input_ids"])


def test_cli_json_says_which_protocol_ran(capsys, tmp_path, tiny_llama, bos_tokenizer, tiny_model_dir, text_file):
    folder = tmp_path / "tiny-bos"
    tiny_llama.save_pretrained(folder)
    bos_tokenizer.save_pretrained(folder)
    common = ["--dataset", str(text_file), "--seqlen", "32", "--max-tokens", "128", "--json"]
    seen = {}
    for model, extra in ((folder, []), (folder, ["--no-bos"]), (tiny_model_dir, [])):
        assert main(["eval", "--model", str(model), *common, *extra]) == 0
        seen[(model.name, tuple(extra))] = json.loads(capsys.readouterr().out)["bos"]
    assert seen == {("tiny-bos", ()): True, ("tiny-bos", ("--no-bos",)): False, ("tiny-llama", ()): False}
    out = tmp_path / "pruned"
    argv = ["prune", "--model", str(folder), "--method", "wanda", "--calib-dataset", str(text_file), "--calib-samples",
            "2", "--calib-seqlen", "32", "--eval-tokens", "0", "--output", str(out), "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["bos"] is True
    assert json.loads((out / "peakllm_run.json").read_text())["bos"] is True
    assert main(["generate", "--model", str(folder), "--prompt", "The quick", "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bos"] is True
