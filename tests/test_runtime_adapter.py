"""A PEFT LoRA adapter run by the lean runtime beside the linears, unmerged (`--adapter`): the same logits as PEFT's
forward on the dequantized model, for a packed int-4 base and a dense one, in prefill, in the whole-step decode
engine's steps and on the op-by-op path; greedy tokens from generate, bench and serve; every bad adapter one clear
error before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from peakllm.cli import main
from peakllm.errors import PeakError
from peakllm.kernels import decode
from peakllm.models import load_model
from peakllm.runtime.adapter import attach_adapter, read_adapter
from peakllm.runtime.generate import generate
from peakllm.runtime.model import RuntimeModel

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 61, 7, 130, 88, 12, 201]])


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_tokenizer):
    """A tiny random Llama (HF folder), its int-4 peakllm folder (RTN, g32), and a rank-8 LoRA adapter with random
    non-zero A and B (PEFT's own layout, saved by PEFT) on every linear of the decoder."""
    from conftest import TINY_TEXT, _randomize, tiny_llama_config
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("adapter")
    _randomize(LlamaForCausalLM(tiny_llama_config()), 0).save_pretrained(root / "dense")
    tiny_tokenizer.save_pretrained(root / "dense")
    text = root / "text.txt"
    text.write_text(TINY_TEXT, encoding="utf-8")
    assert main(["quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", "--model", str(root / "dense"),
                 "--calib-dataset", str(text), "--calib-samples", "2", "--calib-seqlen", "32", "--eval-tokens", "0",
                 "--output", str(root / "int4"), "--json"]) == 0
    base = LlamaForCausalLM.from_pretrained(root / "dense")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, use_rslora=True)
    peft_model = get_peft_model(base, config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    peft_model.save_pretrained(root / "lora")
    return root


def peft_reference(folder, adapter_dir):
    """PEFT's own LoRA on the model dequantized to dense fp32."""
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(str(folder), packed="dequantize")[0], str(adapter_dir)).eval()


def runtime_with_adapter(folder, adapter_dir, weights_dtype=torch.float32, max_seq=64):
    model = load_model(str(folder))[0]
    assert attach_adapter(model, read_adapter(adapter_dir, weights_dtype)) == 2 * len(TARGETS)
    runtime = RuntimeModel.from_hf(model, torch.float32, max_seq=max_seq)
    runtime.setup_cache(1, max_seq)
    return runtime


def logits_by_steps(runtime, ids, prefill: int) -> torch.Tensor:
    """Logits of a prefill of `prefill` tokens, then of one decode step per remaining token."""
    runtime.setup_cache(1, runtime.max_seq)
    rows = [runtime(ids[:, :prefill], 0)[0]]
    rows += [runtime(ids[:, i:i + 1], i)[0] for i in range(prefill, ids.shape[1])]
    return torch.cat(rows)


@pytest.mark.parametrize("base", ["int4", "dense"])
def test_prefill_and_engine_steps_equal_peft(folders, base):
    with torch.no_grad():
        ref = peft_reference(folders / base, folders / "lora")(input_ids=PROMPT).logits[0]
        plain = load_model(str(folders / base), packed="dequantize")[0](input_ids=PROMPT).logits[0]
    effect = (ref - plain).abs().max()
    assert effect > 0.5  # the adapter changes the logits by far more than the tolerance below
    runtime = runtime_with_adapter(folders / base, folders / "lora")
    if base == "int4":
        assert any(type(m).__name__ == "IntKLinear" for m in runtime.modules())  # the base stays packed
    assert isinstance(runtime._step, decode.Step)  # every decode step below is one engine call
    torch.testing.assert_close(logits_by_steps(runtime, PROMPT, PROMPT.shape[1]), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits_by_steps(runtime, PROMPT, 4), ref, rtol=1e-4, atol=1e-4)
    runtime.use_step_engine = False  # the op-by-op decode path
    torch.testing.assert_close(logits_by_steps(runtime, PROMPT, 4), ref, rtol=1e-4, atol=1e-4)
    # bf16 A and B (the command's default): off by the rounding of the adapter's term only (~0.4% of it, grown
    # through two random layers to a few % of the logits' change)
    half = runtime_with_adapter(folders / base, folders / "lora", torch.bfloat16)
    assert (logits_by_steps(half, PROMPT, 4) - ref).abs().max() < 0.1 * effect


def test_engine_with_row_claims_and_int8_activations_equals_op_by_op(folders, monkeypatch):
    """int8-activation int-k rows may be computed by another thread (RowClaim): each adds the adapter's term to
    the rows it computed, so two threads give the op-by-op path's logits."""
    monkeypatch.setenv("PEAKLLM_INTK_ACT", "int8")
    runtime = runtime_with_adapter(folders / "int4", folders / "lora", torch.bfloat16)
    runtime.engine_threads = 2
    engine = logits_by_steps(runtime, PROMPT, 4)
    runtime.use_step_engine = False
    torch.testing.assert_close(engine, logits_by_steps(runtime, PROMPT, 4), rtol=1e-4, atol=1e-4)


def test_greedy_tokens_equal_peft_in_generate_speculate_bench_and_serve(folders, tiny_tokenizer, capsys):
    from conftest import hf_greedy
    from peakllm.serve.block_manager import BlockManager
    from peakllm.serve.scheduler import Scheduler
    from peakllm.serve.sequence import SamplingParams, Sequence
    from peakllm.serve.server import build_engine
    from test_serve import _drive

    expected = hf_greedy(peft_reference(folders / "int4", folders / "lora"), PROMPT, 16)
    runtime = runtime_with_adapter(folders / "int4", folders / "lora", max_seq=PROMPT.shape[1] + 16)
    assert torch.equal(generate(runtime, tiny_tokenizer, PROMPT, 16, stop_at_eos=False), expected)
    timings: dict = {}  # speculative verification: several tokens per engine pass, each row with its adapter term
    ours = generate(runtime, tiny_tokenizer, PROMPT, 16, stop_at_eos=False, speculate=3, timings=timings)
    assert timings["speculative"] and torch.equal(ours, expected)

    capsys.readouterr()
    assert main(["generate", "--model", str(folders / "int4"), "--adapter", str(folders / "lora"), "--adapter-dtype",
                 "fp32", "--prompt", "The quick brown", "--max-new-tokens", "12", "--speculate", "2", "--json"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    ids = tiny_tokenizer("The quick brown", return_tensors="pt")["input_ids"]
    assert text == tiny_tokenizer.decode(hf_greedy(peft_reference(folders / "int4", folders / "lora"), ids, 12)[0])
    assert main(["bench", "--model", str(folders / "int4"), "--adapter", str(folders / "lora"), "--prompt-tokens", "8",
                 "--new-tokens", "4", "--repeats", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["adapter_layers"] == 2 * len(TARGETS) and result["adapter_rank"] == 8

    engine, _ = build_engine(str(folders / "int4"), max_model_len=64, num_blocks=16, block_size=4, max_batch=2,
                             adapter=read_adapter(folders / "lora", torch.float32))
    blocks = BlockManager(16, 4)
    seq = Sequence(PROMPT[0].tolist(), SamplingParams(), print)
    got = _drive(engine.runner, Scheduler(blocks, max_batch=2, max_step_tokens=8), [seq], max_new=16)
    assert [int(row.argmax()) for row in got[seq.seq_id]] == expected[0].tolist()


def _copy_adapter(folders, name, config=None, tensors=None):
    out = folders / name
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folders / "lora", out)
    if config is not None:
        cfg = json.loads((out / "adapter_config.json").read_text())
        (out / "adapter_config.json").write_text(json.dumps({**cfg, **config}))
    if tensors is not None:
        save_file(tensors(load_file(out / "adapter_model.safetensors")), out / "adapter_model.safetensors")
    return out


def test_bad_adapters_are_one_clear_error(folders, tiny_tokenizer, capsys):
    from conftest import tiny_llama_config
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    q0 = "base_model.model.model.layers.0.self_attn.q_proj"
    read_only = [  # refused by reading the folder, before the model is loaded
        (folders / "missing", "no such folder"),
        (_copy_adapter(folders, "not-lora", {"peft_type": "IA3"}), "IA3 adapter"),
        (_copy_adapter(folders, "dora", {"use_dora": True}), "DoRA"),
        (_copy_adapter(folders, "saves", {"modules_to_save": ["lm_head"]}), "modules_to_save"),
        (_copy_adapter(folders, "bias", {"bias": "all"}), "trained biases"),
        (_copy_adapter(folders, "pattern", {"rank_pattern": {"q_proj": 4}}), "rank_pattern"),
        (_copy_adapter(folders, "extra", tensors=lambda t: {**t, f"{q0}.lora_magnitude_vector": torch.ones(64)}),
         "not a LoRA A or B"),
        (_copy_adapter(folders, "half", tensors=lambda t: {k: v for k, v in t.items() if k != f"{q0}.lora_B.weight"}),
         "lora_A but not"),
        (_copy_adapter(folders, "rank", {"r": 4}), "rank r=4"),
    ]
    (folders / "no-config").mkdir(exist_ok=True)
    read_only.append((folders / "no-config", "no adapter_config.json"))
    for path, message in read_only:
        with pytest.raises(PeakError, match=message):
            read_adapter(path)
    # the same errors from the commands, exit 2 with one line
    assert main(["bench", "--model", "no-such-model", "--adapter", str(folders / "dora")]) == 2
    assert "DoRA" in capsys.readouterr().err

    # refused against the model, before anything is changed in it
    other = LlamaForCausalLM(tiny_llama_config(hidden_size=32, intermediate_size=64))
    get_peft_model(other, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).save_pretrained(folders / "other")
    deeper = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=3))
    get_peft_model(deeper, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS)).save_pretrained(folders / "deeper")
    renamed = _copy_adapter(folders, "renamed", tensors=lambda t: {k.replace("q_proj", "qq_proj"): v for k, v in t.items()})
    against_model = [
        (folders / "other", "features, the adapter.s A and B are"),
        (folders / "deeper", "no module model.layers.2"),
        (renamed, "no module model.layers.0.self_attn.qq_proj"),
        (_copy_adapter(folders, "target", {"target_modules": TARGETS + ["w_proj"]}), "'w_proj' names no linear"),
        (_copy_adapter(folders, "embed", {"target_modules": ["embed_tokens"]},
                       tensors=lambda t: {**t, "base_model.model.model.embed_tokens.lora_A.weight": torch.ones(8, 300),
                                          "base_model.model.model.embed_tokens.lora_B.weight": torch.ones(64, 8)}),
         "Embedding, not a linear"),
        (_copy_adapter(folders, "fewer", tensors=lambda t: {k: v for k, v in t.items() if "layers.1." not in k}),
         "no weights for 7 of the layers"),
    ]
    for path, message in against_model:
        model = load_model(str(folders / "int4"))[0]
        before = [type(m).__name__ for m in model.modules()]
        with pytest.raises(PeakError, match=message):
            attach_adapter(model, read_adapter(path))
        assert [type(m).__name__ for m in model.modules()] == before
    assert main(["generate", "--model", str(folders / "int4"), "--adapter", str(folders / "other")]) == 2
    assert "features" in capsys.readouterr().err
    assert main(["generate", "--model", str(folders / "int4"), "--adapter", str(folders / "lora"), "--max-memory",
                 "1GB"]) == 2
    assert "--adapter with --max-memory" in capsys.readouterr().err
