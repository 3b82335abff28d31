"""bench: the byte count per decode step, the result keys, and the CLI wiring on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from peakllm.runtime.bench import bench, weight_bytes_per_step
from peakllm.runtime.model import RuntimeModel

KEYS = {"prefill_tok_s", "decode_tok_s", "ttft_s", "peak_rss_bytes", "weight_bytes", "roofline_fraction",
        "threads", "batch", "bandwidth_gb_s"}


def _tiny(**overrides):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def _expected_bytes(cfg, batch, elem, tied):
    # Counted by hand from the config: per layer q,o [d,d], k,v [kv*hd, d], gate/up/down, two norms.
    d, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kvd = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    per_layer = 2 * d * d + 2 * kvd * d + 3 * d * i + 2 * d
    head = v * d
    return elem * (cfg.num_hidden_layers * per_layer + d + head + batch * d)


@pytest.mark.parametrize("tied", [True, False])
def test_weight_bytes_count_each_tensor_read_once(tied):
    hf = _tiny(tie_word_embeddings=tied)
    expect = _expected_bytes(hf.config, 3, 4, tied)
    assert weight_bytes_per_step(hf, batch=3) == expect
    assert weight_bytes_per_step(RuntimeModel.from_hf(hf), batch=3) == expect
    assert weight_bytes_per_step(RuntimeModel.from_hf(hf, torch.bfloat16), batch=3) == expect // 2


class _Packed(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.register_buffer("w", linear.weight.detach().clone())
        self.register_buffer("w_copy", linear.weight.detach().clone())  # a helper copy one step never reads

    def packed_nbytes(self):
        return 123

    def forward(self, x):
        return x @ self.w.t()


def test_weight_bytes_use_packed_nbytes():
    hf = _tiny()
    base = weight_bytes_per_step(hf)
    lin = hf.model.layers[0].mlp.up_proj
    hf.model.layers[0].mlp.up_proj = _Packed(lin)
    assert weight_bytes_per_step(RuntimeModel.from_hf(hf)) == base - lin.weight.numel() * 4 + 123


@pytest.mark.parametrize("probe_weights", [False, True])
@pytest.mark.parametrize("engine", ["peakllm", "transformers"])
def test_bench_result_is_consistent(engine, probe_weights, monkeypatch):
    if probe_weights:  # read the model's own weights as the bandwidth probe (real models are big enough)
        monkeypatch.setattr("peakllm.runtime.bench.PROBE_MIN_BYTES", 0)
    hf = _tiny()
    result = bench(hf, prompt_tokens=6, new_tokens=4, batch=2, repeats=1, engine=engine,
                   bandwidth_bytes=1 << 24)
    assert KEYS <= set(result)
    assert result["batch"] == 2 and result["threads"] == torch.get_num_threads()
    assert result["weight_bytes"] == _expected_bytes(hf.config, 2, 4, True)
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "bandwidth_gb_s"):
        assert result[key] > 0
    expect = result["decode_tok_s"] / 2 * result["weight_bytes"] / (result["bandwidth_gb_s"] * 1e9)
    assert result["roofline_fraction"] == pytest.approx(expect)


def test_bench_rejects_bad_sizes():
    from peakllm.errors import PeakError

    with pytest.raises(PeakError):
        bench(_tiny(), prompt_tokens=4, new_tokens=1)
    with pytest.raises(PeakError):
        bench(_tiny(), prompt_tokens=250, new_tokens=10)  # beyond max_position_embeddings


def test_cli_bench_json(monkeypatch, capsys, tiny_tokenizer):
    import peakllm.models
    from peakllm.cli import main

    hf = _tiny()
    monkeypatch.setattr(peakllm.models, "load_model", lambda spec: (hf, tiny_tokenizer))
    monkeypatch.setattr("peakllm.runtime.bench.read_bandwidth_gb_s", lambda size: 40.0)  # wiring, not memory
    code = main(["bench", "--model", "tiny", "--prompt-tokens", "5", "--new-tokens", "3", "--repeats", "1",
                 "--threads", "1", "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert KEYS | {"model"} <= set(result) and result["model"] == "tiny" and result["threads"] == 1
    assert result["bandwidth_gb_s"] == 40.0
    assert main(["bench", "--new-tokens", "1"]) == 2  # a user error, one line on stderr


def test_a_fraction_above_one_says_the_probe_was_low(monkeypatch):
    monkeypatch.setattr("peakllm.runtime.bench.read_bandwidth_gb_s", lambda size: 1e-6)  # an absurdly low probe
    result = bench(_tiny(), prompt_tokens=4, new_tokens=3, repeats=1)
    assert result["roofline_fraction"] > 1 and "probe was low" in result["roofline_note"]
    assert "buffer" in result["bandwidth_method"]
    monkeypatch.setattr("peakllm.runtime.bench.read_bandwidth_gb_s", lambda size: 1e6)
    result = bench(_tiny(), prompt_tokens=4, new_tokens=3, repeats=1)
    assert result["roofline_fraction"] < 1 and "roofline_note" not in result


def test_weight_bytes_of_moe_count_only_routed_experts():
    from peakllm.models.moe import PeakMoeConfig, PeakMoeForCausalLM

    cfg = PeakMoeConfig(vocab_size=300, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_experts=4, num_experts_per_tok=1, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=64)
    hf = PeakMoeForCausalLM(cfg).eval()
    experts = sum(p.numel() * 4 for layer in hf.model.layers for p in layer.mlp.experts.parameters())
    everything = sum(p.numel() * 4 for p in hf.parameters())  # tied: the embedding is counted once
    for batch in (1, 2):
        read = 1 - (1 - 1 / 4) ** batch  # share of experts that `batch` uniformly routed tokens touch
        expect = everything - experts + int(experts * read) + batch * 64 * 4
        assert abs(weight_bytes_per_step(hf, batch=batch) - expect) <= 2
        assert abs(weight_bytes_per_step(RuntimeModel.from_hf(hf), batch=batch) - expect) <= 2
