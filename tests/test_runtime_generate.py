"""The generation loop: greedy equals HF greedy, seeded sampling is reproducible, top-p bounds the support."""

from __future__ import annotations

import torch

from peakllm.runtime.generate import generate
from peakllm.runtime.sampling import sample
from peakllm.runtime.model import RuntimeModel


def _random_llama(seed=0, **overrides):
    from transformers import LlamaForCausalLM

    from conftest import tiny_llama_config

    torch.manual_seed(seed)
    hf = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)  # sharper logits than the default init: greedy paths are not flat
    return hf


def test_greedy_equals_hf_greedy_batch():
    hf = _random_llama()
    prompt = torch.randint(1, 300, (3, 6), generator=torch.Generator().manual_seed(1))
    ref = hf.generate(prompt, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)[:, 6:]
    out = generate(RuntimeModel.from_hf(hf), None, prompt, 24, stop_at_eos=False)
    assert torch.equal(out, ref)


def test_greedy_stops_at_eos_and_streams_text(tiny_tokenizer):
    hf = _random_llama()
    rt = RuntimeModel.from_hf(hf)
    prompt = tiny_tokenizer("The quick brown fox", return_tensors="pt")["input_ids"][0]
    full = generate(rt, tiny_tokenizer, prompt, 30, stop_at_eos=False)[0]
    eos = tiny_tokenizer.eos_token_id
    # Make a token that greedy decoding produces at step 5 the EOS, by asking which id it is.
    hf.config.eos_token_id = int(full[5])
    rt.config.eos_token_id = int(full[5])
    pieces = []
    out = generate(rt, tiny_tokenizer, prompt, 30, stream=pieces.append)[0]
    first_stop = next(i for i, t in enumerate(full.tolist()) if t in (eos, int(full[5])))
    assert out.tolist() == full[: first_stop + 1].tolist()
    assert "".join(pieces) == tiny_tokenizer.decode(full[:first_stop], skip_special_tokens=True)


def test_sampling_is_deterministic_with_seed_and_varies_without():
    rt = RuntimeModel.from_hf(_random_llama())
    prompt = torch.randint(1, 300, (1, 5), generator=torch.Generator().manual_seed(2))
    a = generate(rt, None, prompt, 20, temperature=1.0, top_p=0.95, seed=11, stop_at_eos=False)
    b = generate(rt, None, prompt, 20, temperature=1.0, top_p=0.95, seed=11, stop_at_eos=False)
    c = generate(rt, None, prompt, 20, temperature=1.0, top_p=0.95, seed=12, stop_at_eos=False)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_top_p_restricts_support_to_the_nucleus():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 50, generator=g) * 3
    top_p = 0.6
    draws = torch.stack([sample(logits, 1.0, top_p, g) for _ in range(400)])  # [400, 2]
    probs = torch.softmax(logits, -1)
    for row in range(2):
        # Reference nucleus, the obvious way: add tokens in order of probability until the mass reaches top_p.
        order = probs[row].argsort(descending=True).tolist()
        nucleus, mass = set(), 0.0
        for t in order:
            nucleus.add(t)
            mass += probs[row, t].item()
            if mass >= top_p:
                break
        seen = set(draws[:, row].tolist())
        assert seen <= nucleus
        assert len(seen) >= min(2, len(nucleus))  # it samples, not only argmax
    # top_p tiny: only the argmax survives; temperature 0: greedy
    assert torch.equal(sample(logits, 1.0, 1e-6, g), logits.argmax(-1))
    assert torch.equal(sample(logits, 0.0, 1.0, g), logits.argmax(-1))


def test_timings_and_shapes():
    rt = RuntimeModel.from_hf(_random_llama())
    timings = {}
    out = generate(rt, None, [5, 6, 7], 8, stop_at_eos=False, timings=timings)
    assert out.shape == (1, 8)
    assert timings["steps"] == 7 and timings["prefill_s"] > 0 and timings["decode_s"] > 0


def test_generate_text_matches_hf_loop(tiny_tokenizer):
    from peakllm.runtime.generate import generate_text
    from peakllm.runtime.hf_loop import hf_generate_text

    hf = _random_llama()
    ids = tiny_tokenizer("Sphinx of black quartz", return_tensors="pt")["input_ids"]
    pieces = []
    text, n = generate_text(hf, tiny_tokenizer, ids, 12, stream=pieces.append)
    ref_text, ref_n = hf_generate_text(hf, tiny_tokenizer, ids, 12)
    assert (text, n) == (ref_text, ref_n)
    assert "".join(pieces) == text
