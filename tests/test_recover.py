"""peakllm recover on tiny random models: the objective, LoRA on packed int-k equal to LoRA on its dequantized
copy (and the saved adapter loading with plain PEFT), masks exact after LOMO / AdamW / a merge, kill + --resume
giving the same bytes, and every refusal before any work."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from peakllm.cli import main
from peakllm.errors import PeakError
from peakllm.recover import RecoverSpec, recover
from peakllm.recover.objective import batch_indices, chunked_distill_loss, distill_loss


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_tokenizer):
    """A teacher HF folder, a 50%-sparse HF folder of it (magnitude, as `peakllm prune --format hf` writes),
    an int-4 peakllm folder of it (RTN), and a text file to train on."""
    from conftest import TINY_TEXT, tiny_llama_config
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("recover")
    torch.manual_seed(0)
    teacher = LlamaForCausalLM(tiny_llama_config()).eval()
    teacher.save_pretrained(root / "teacher")
    tiny_tokenizer.save_pretrained(root / "teacher")
    text = root / "text.txt"
    text.write_text(TINY_TEXT, encoding="utf-8")
    common = ["--model", str(root / "teacher"), "--calib-dataset", str(text), "--calib-samples", "2",
              "--calib-seqlen", "32", "--eval-tokens", "0", "--json"]
    assert main(["prune", "--method", "magnitude", "--sparsity", "0.5", "--format", "hf", *common,
                 "--output", str(root / "sparse")]) == 0
    assert main(["quantize", "--method", "rtn", "--bits", "4", "--group-size", "32", *common,
                 "--output", str(root / "int4")]) == 0
    return root


def spec(folders, model, out, **kw) -> RecoverSpec:
    args = {"model": str(folders / model), "output": folders / out, "steps": 3, "train_dataset": str(folders / "text.txt"),
            "train_samples": 6, "seqlen": 24, "batch_size": 2, "eval_tokens": 0, "checkpoint_every": 2,
            "warmup_steps": 1, "progress": False}
    return RecoverSpec(**{**args, **kw})


def test_objective_parts_and_data_order():
    torch.manual_seed(0)
    s, t, ids = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    ce, parts = distill_loss(s, t, ids, alpha=0.0, temperature=2.0)
    assert "kl" not in parts and ce.item() == pytest.approx(
        torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 11), ids[:, 1:].reshape(-1)).item())
    same, parts = distill_loss(s, s, ids, alpha=1.0, temperature=2.0)
    assert abs(parts["kl"]) < 1e-5 and abs(same.item()) < 1e-5
    _, parts = distill_loss(s, t, ids, alpha=0.5, temperature=2.0)
    assert parts["kl"] > 0.01
    # the chunked loss (heads applied to a few positions at a time, under checkpointing) is the same loss
    head_s, head_t = torch.nn.Linear(6, 11, bias=False), torch.nn.Linear(6, 11, bias=False)
    hs, ht = torch.randn(2, 5, 6, requires_grad=True), torch.randn(2, 5, 6)
    whole, parts = distill_loss(head_s(hs), head_t(ht), ids, alpha=0.3, temperature=1.5)
    chunked, chunk_parts = chunked_distill_loss(hs, ht, head_s, head_t, ids, alpha=0.3, temperature=1.5, chunk_tokens=3)
    assert chunked.item() == pytest.approx(whole.item(), rel=1e-5) and chunk_parts == pytest.approx(parts, rel=1e-5)
    g_whole = torch.autograd.grad(whole, [hs, head_s.weight])
    g_chunked = torch.autograd.grad(chunked, [hs, head_s.weight])
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(g_whole, g_chunked))
    order = [i for step in range(6) for i in batch_indices(4, 2, step, seed=3)]
    assert sorted(order[:4]) == sorted(order[4:8]) == [0, 1, 2, 3] and order[:4] != order[4:8] or order[:4] != order[8:]
    assert order == [i for step in range(6) for i in batch_indices(4, 2, step, seed=3)]


def test_lora_on_packed_int4_equals_lora_on_its_dequantized_copy(folders, capsys):
    from peft import PeftModel

    from peakllm.models import load_model

    dense, tok = load_model(str(folders / "int4"), packed="dequantize")
    dense_dir = folders / "int4-dequantized"
    dense.save_pretrained(dense_dir)
    tok.save_pretrained(dense_dir)
    teacher = str(folders / "teacher")
    packed_run = recover(spec(folders, "int4", "lora-int4", teacher=teacher))
    dense_run = recover(spec(folders, "int4-dequantized", "lora-int4-dense", teacher=teacher))
    assert len(packed_run["losses"]) == 3
    assert packed_run["losses"] == pytest.approx(dense_run["losses"], rel=1e-4)
    out = folders / "lora-int4"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in out.iterdir()}
    a = load_file(out / "adapter_model.safetensors")
    b = load_file(folders / "lora-int4-dense" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)
    # the adapter, loaded with plain PEFT on the dequantized model, gives the logits of the packed model + adapter
    from peakllm.recover.lora import lora_model

    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    base, _ = load_model(str(folders / "int4"), packed="dequantize")
    with torch.no_grad():
        plain = PeftModel.from_pretrained(base, out).eval()(input_ids=ids).logits
        packed, _ = load_model(str(folders / "int4"))
        ours = lora_model(packed, rank=16, lora_alpha=32.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                          "gate_proj", "up_proj", "down_proj"], seed=0)
        ours.load_state_dict({f"base_model.model.{k[len('base_model.model.'):]}".replace(".lora_A.", ".lora_A.default.")
                              .replace(".lora_B.", ".lora_B.default."): v for k, v in a.items()}, strict=False)
        mine = ours.eval()(input_ids=ids).logits
    base_only = load_model(str(folders / "int4"), packed="dequantize")[0](input_ids=ids).logits
    assert not torch.allclose(plain, base_only, atol=1e-4)  # the adapter does something
    torch.testing.assert_close(mine, plain, rtol=1e-4, atol=1e-4)
    # generate --adapter runs it unmerged beside the packed weights: PEFT's greedy tokens on the dequantized model
    from peakllm.runtime.hf_loop import hf_generate_text

    capsys.readouterr()
    assert main(["generate", "--model", str(folders / "int4"), "--adapter", str(out), "--prompt", "The quick brown",
                 "--max-new-tokens", "12", "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)
    prompt = tok("The quick brown", return_tensors="pt")["input_ids"]
    expected, _ = hf_generate_text(PeftModel.from_pretrained(load_model(str(folders / "int4"), packed="dequantize")[0],
                                                             out).eval(), tok, prompt, 12)
    assert generated["adapter"] == str(out) and generated["text"] == expected and generated["new_tokens"] > 0


@pytest.mark.parametrize("method", ["lomo", "adamw"])
def test_full_finetuning_keeps_masks_exact(folders, method):
    from peakllm.models import load_model

    result = recover(spec(folders, "sparse", f"{method}-sparse", method=method, lr=1e-2))
    assert result["sparse_matrices"] == 14 and result["mask_violations"] == 0
    before, _ = load_model(str(folders / "sparse"))
    after, _ = load_model(str(folders / f"{method}-sparse"))
    w0, w1 = before.model.layers[0].mlp.up_proj.weight, after.model.layers[0].mlp.up_proj.weight
    assert torch.equal(w0 == 0, w1 == 0) and (w0 == 0).float().mean() == pytest.approx(0.5, abs=0.01)
    assert not torch.equal(w0, w1)


def test_lora_merge_remasks_sparse_and_is_refused_on_packed(folders):
    from peakllm.models import load_model

    result = recover(spec(folders, "sparse", "lora-merged", merge=True, lr=1e-2))
    assert result["mask_violations"] == 0 and 0.2 < result["merge_masked_share"] < 0.8
    before, _ = load_model(str(folders / "sparse"))
    after, _ = load_model(str(folders / "lora-merged"))
    w0, w1 = before.model.layers[1].self_attn.q_proj.weight, after.model.layers[1].self_attn.q_proj.weight
    assert torch.equal(w0 == 0, w1 == 0) and not torch.equal(w0, w1)
    with pytest.raises(PeakError, match="re-solv"):
        recover(spec(folders, "int4", "lora-int4-merged", merge=True))
    assert not (folders / "lora-int4-merged").exists()


def test_kill_and_resume_gives_the_same_bytes(folders):
    """LoRA: the checkpoint must carry AdamW's moments too (LOMO has no optimizer state: a subset of this)."""
    method = "lora"
    whole = spec(folders, "sparse", f"{method}-whole", method=method, steps=4)
    recover(whole)
    killed = spec(folders, "sparse", f"{method}-killed", method=method, steps=4)

    def kill(step):
        if step == 3:  # after the checkpoint of step 2, one step lost
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        recover(killed, on_step=kill)
    assert not killed.output.exists() and (killed.checkpoint_dir / "state.pt").is_file()
    with pytest.raises(PeakError, match="--resume"):
        recover(killed)
    resumed = recover(spec(folders, "sparse", f"{method}-killed", method=method, steps=4, resume=True))
    assert resumed["steps"] == 4 and resumed["steps_this_run"] == 2 and not killed.checkpoint_dir.exists()
    name = "adapter_model.safetensors"
    assert (whole.output / name).read_bytes() == (killed.output / name).read_bytes()


def test_refusals_before_any_work(folders, tiny_tokenizer):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    with pytest.raises(PeakError, match="--steps N or --minutes"):
        spec(folders, "sparse", "x", steps=None)
    with pytest.raises(PeakError, match="--alpha"):
        spec(folders, "sparse", "x", alpha=1.5)
    with pytest.raises(PeakError, match="--merge"):
        spec(folders, "sparse", "x", method="lomo", merge=True)
    with pytest.raises(PeakError, match="no checkpoint"):
        recover(spec(folders, "sparse", "x", resume=True))
    with pytest.raises(PeakError, match="packed"):
        recover(spec(folders, "int4", "x", method="lomo"))
    other = folders / "other-vocab"
    LlamaForCausalLM(tiny_llama_config(vocab_size=320)).save_pretrained(other)
    tiny_tokenizer.save_pretrained(other)
    with pytest.raises(PeakError, match="vocabulary"):
        recover(spec(folders, "sparse", "x", teacher=str(other)))
    (folders / "x").mkdir(exist_ok=True)
    (folders / "x" / "keep").write_text("")
    with pytest.raises(PeakError, match="not empty"):
        recover(spec(folders, "sparse", "x"))
    shutil.rmtree(folders / "x")


def test_cli_json(folders, capsys):
    (folders / "other.txt").write_text("Sphinx of black quartz, judge my vow! " * 30, encoding="utf-8")
    code = main(["recover", "--model", str(folders / "sparse"), "--output", str(folders / "cli-out"), "--steps", "2",
                 "--train-dataset", str(folders / "text.txt"), "--train-samples", "4", "--seqlen", "24",
                 "--batch-size", "2", "--eval-tokens", "64", "--eval-seqlen", "32", "--json",
                 "--eval-sets", f"{folders / 'text.txt'},{folders / 'other.txt'}"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    for d in (folders / "text.txt", folders / "other.txt"):
        assert result[f"ppl_before_{d}"] > 1 and result[f"ppl_after_{d}"] > 1 and result[f"ppl_teacher_{d}"] > 1
    assert result["steps"] == 2 and result["peak_rss_bytes"] > 0 and result["teacher"] == str(folders / "teacher")
    assert main(["recover", "--model", str(folders / "sparse"), "--output", str(folders / "cli-out2"),
                 "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err


@pytest.mark.subprocess
def test_two_gloo_processes_give_the_one_process_adapter(folders):
    """torchrun, 2 processes on gloo, each half of the batch, gradients averaged: the one-process adapter."""
    import os
    import socket
    import subprocess
    import sys

    recover(spec(folders, "sparse", "ddp-one", batch_size=4, steps=2, threads=1))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["recover", "--model", str(folders / "sparse"), "--output", str(folders / "ddp-two"), "--steps", "2",
            "--batch-size", "4", "--train-samples", "6", "--seqlen", "24", "--train-dataset", str(folders / "text.txt"),
            "--eval-tokens", "0", "--warmup-steps", "1", "--checkpoint-every", "2", "--threads", "1", "--json"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                          "127.0.0.1", "--master-port", str(port), "-m", "peakllm", *args], check=False, capture_output=True,
                         text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert two.returncode == 0, two.stderr
    assert len([line for line in two.stdout.splitlines() if line.startswith("{")]) == 1  # worker 0 reports
    a = load_file(folders / "ddp-one" / "adapter_model.safetensors")
    b = load_file(folders / "ddp-two" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)
