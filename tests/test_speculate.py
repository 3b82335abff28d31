"""Speculative decoding (runtime/speculate.py, sampling.accept_drafts, the engine's multi-token step).

- the engine's T-token step gives each row the logits of decoding its token alone, bit for bit;
- greedy output with either drafter equals plain decoding, token for token;
- sampled output keeps the target's distribution: the rule alone on fixed p, q (and three wrong rules that the
  same chi-square threshold rejects, so the test can fail), and end to end on a tiny model, the joint
  distributions of the first three tokens against their exact values.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import _randomize, tiny_family, tiny_llama_config
from peakllm.cli import main
from peakllm.kernels import decode
from peakllm.runtime.generate import generate
from peakllm.runtime.linear import IntKLinear
from peakllm.runtime.model import RuntimeModel
from peakllm.runtime.sampling import accept_drafts, distribution
from peakllm.runtime.speculate import DraftModel, PromptLookup
from test_cli import run_cli
from test_kernels_decode import _packed_tiny

pytestmark = pytest.mark.skipif(not decode.available(torch.float32), reason="decode engine not built")


def _models():
    yield "llama", tiny_family("llama"), torch.float32
    yield "gemma3-window", tiny_family("gemma3"), torch.float32  # 5-token windows, per-layer RoPE
    yield "qwen3-bf16", tiny_family("qwen3"), torch.bfloat16
    for int8 in (False, True):
        hf = _packed_tiny()
        for m in hf.modules():
            if isinstance(m, IntKLinear):
                m.set_int8_act(int8)
        yield f"int-k {'int8' if int8 else 'f32'} act", hf, torch.float32


def test_multi_token_step_equals_one_token_steps():
    ids = torch.randint(1, 300, (1, 22), generator=torch.Generator().manual_seed(3))
    for name, hf, dtype in _models():
        rt = RuntimeModel.from_hf(hf, dtype)
        rt.setup_cache(1, 32)
        rt(ids[:, :6], 0)
        single = torch.cat([rt(ids[:, t:t + 1], t) for t in range(6, 22)], 1)
        assert rt.can_decode_tokens()
        rt.setup_cache(1, 32)
        rt(ids[:, :6], 0)
        parts, t = [], 6
        for T in (1, 4, 2, 5, 1, 3):
            parts.append(rt.decode_tokens(ids[:, t:t + T], t))
            t += T
        assert torch.equal(torch.cat(parts, 1), single), name


def test_prompt_lookup_takes_the_latest_longest_match():
    look = PromptLookup(max_ngram=3)
    seq = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert look.propose(seq, 2)[0] == [7, 8]  # "2 3" last seen before 7 8 (the 3-gram "5 2 3" never)
    seq += [4]
    assert look.propose(seq, 3)[0] == []  # 4 never seen before
    seq += [1, 2, 3]
    assert look.propose(seq, 4)[0] == [7, 8, 5, 2]  # "1 2 3": latest at position 5
    assert PromptLookup().propose([5], 3)[0] == []


def _prompts():
    g = torch.Generator().manual_seed(0)
    for n in range(4):
        base = torch.randint(1, 300, (5 + n,), generator=g)
        yield torch.cat([base, base, base[:3]])  # repeats: prompt lookup finds drafts
    yield torch.randint(1, 300, (9,), generator=g)


def test_greedy_speculative_equals_plain_decoding():
    target = RuntimeModel.from_hf(tiny_family("llama"))
    drafts = [None, RuntimeModel.from_hf(tiny_family("llama", num_hidden_layers=1)),
              RuntimeModel.from_hf(tiny_family("llama"))]  # the last one agrees always: every draft accepted
    kept = 0
    for prompt in _prompts():
        plain = generate(target, None, prompt, 30, stop_at_eos=False)
        for draft in drafts:
            for k in (1, 3, 5):
                timings: dict = {}
                out = generate(target, None, prompt, 30, stop_at_eos=False, speculate=k, draft=draft,
                               timings=timings)
                assert timings["speculative"] and torch.equal(out, plain)
                kept += timings["accepted"]
                if draft is drafts[2]:
                    assert timings["accepted"] == timings["drafted"] and timings["steps"] < 29
    assert kept > 100  # drafts were taken, so the equality tested the verification, not one-token steps


# ---- sampling: the output distribution is the target's ------------------------------------------------

Z_1E4 = 3.719  # one-sided standard normal quantile of 1 - 1e-4


def chi2_limit(df: int) -> float:
    """The chi-square quantile 1 - 1e-4 (Wilson-Hilferty): a correct rule passes with fixed seeds, a wrong one
    is far above it."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + Z_1E4 * math.sqrt(c)) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of counts against probs, categories with an expected count under 5 pooled."""
    n = counts.sum().item()
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts[~small].double(), counts[small].double().sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert obs.sum() == n and abs(exp.sum().item() - n) < 1e-6 * n + 1e-3
    return float(((obs - exp) ** 2 / exp).sum()), len(exp) - 1


def _always_accept(logits, drafts, q, temperature, top_p, g):
    return list(drafts) + [int(torch.multinomial(distribution(logits[-1], temperature, top_p), 1, generator=g))]


def _residual_is_p(logits, drafts, q, temperature, top_p, g):  # resamples from p, not max(0, p - q)
    p = distribution(logits, temperature, top_p)
    u = float(torch.rand((), generator=g))
    qd = 1.0 if q is None else float(q[0, drafts[0]])
    if u * qd < float(p[0, drafts[0]]):
        return [drafts[0]]
    return [int(torch.multinomial(p[0], 1, generator=g))]


def _ratio_inverted(logits, drafts, q, temperature, top_p, g):  # min(1, q/p)
    p = distribution(logits, temperature, top_p)
    u = float(torch.rand((), generator=g))
    qd = 1.0 if q is None else float(q[0, drafts[0]])
    if u * float(p[0, drafts[0]]) < qd:
        return [drafts[0]]
    residual = (p[0] - (torch.zeros_like(p[0]).index_fill_(0, torch.tensor([drafts[0]]), 1.0) if q is None
                        else q[0])).clamp(min=0)
    return [int(torch.multinomial(residual, 1, generator=g))]


def _first_tokens(rule, p_logits, q, point_mass, n, seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(p_logits.shape[-1], dtype=torch.long)
    for _ in range(n):
        if point_mass:
            d = 2  # prompt lookup's fixed guess
            qs = None
        else:
            d = int(torch.multinomial(q, 1, generator=g))
            qs = q[None]
        counts[rule(p_logits, [d], qs, 1.0, 1.0, g)[0]] += 1
    return counts


@pytest.mark.parametrize("point_mass", [False, True], ids=["draft-model", "prompt-lookup"])
def test_acceptance_rule_keeps_the_target_distribution(point_mass):
    # p over 8 tokens, a draft q that disagrees with it (too sure of some tokens, blind to others)
    p_logits = torch.tensor([[1.0, 0.2, 1.5, -1.0, 0.5, 0.0, -0.5, 0.8]] * 2)
    p = distribution(p_logits[0], 1.0)
    q = torch.tensor([0.05, 0.30, 0.05, 0.25, 0.0, 0.15, 0.10, 0.10])
    n = 4000
    stat, df = chi2(_first_tokens(accept_drafts, p_logits, q, point_mass, n, seed=1), p)
    assert stat < chi2_limit(df)
    for wrong in (_always_accept, _residual_is_p, _ratio_inverted):  # the same threshold rejects each wrong rule
        stat, df = chi2(_first_tokens(wrong, p_logits, q, point_mass, n, seed=1), p)
        assert stat > chi2_limit(df), wrong.__name__


def _exact_joints(hf, prompt, temperature, vocab):
    """P(first, second new token) and P(second, third) [vocab * vocab] when sampling from hf alone."""
    with torch.no_grad():
        p1 = distribution(hf(prompt[None]).logits[0, -1], temperature)
        ctx = torch.cat([prompt.expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        p2 = distribution(hf(ctx).logits[:, -1], temperature)  # [t1, t2]
        ctx3 = torch.cat([ctx.repeat_interleave(vocab, 0), torch.arange(vocab).repeat(vocab)[:, None]], 1)
        p3 = distribution(hf(ctx3).logits[:, -1], temperature).view(vocab, vocab, vocab)
    return (p1[:, None] * p2).flatten(), (p1[:, None, None] * p2[:, :, None] * p3).sum(0).flatten()


@pytest.mark.parametrize("drafter", ["prompt-lookup", "draft-model"])
def test_speculative_sampling_matches_the_model_distribution(drafter):
    """Three tokens sampled with k = 2 (the second and third come from one verification): the joint counts of
    (1st, 2nd) and (2nd, 3rd) over 1500 seeds against the exact joints. While developing, a rule resampling
    from p instead of max(0, p - q) gave statistics of 170-260 against limits of 66 and 89 here; the correct
    rule 25-66."""
    import transformers

    vocab, temperature, n = 16, 0.7, 1500
    hf = _randomize(transformers.LlamaForCausalLM(tiny_llama_config(vocab_size=vocab)), 5)
    target = RuntimeModel.from_hf(hf)
    # every token occurs in the prompt, so prompt lookup drafts after any first token
    prompt = torch.cat([torch.randperm(vocab, generator=torch.Generator().manual_seed(2)), torch.tensor([3, 7])])
    draft = None
    if drafter == "draft-model":
        draft = RuntimeModel.from_hf(_randomize(transformers.LlamaForCausalLM(
            tiny_llama_config(vocab_size=vocab, num_hidden_layers=1)), 6))
    exact = _exact_joints(hf, prompt, temperature, vocab)
    counts = torch.zeros(2, vocab * vocab, dtype=torch.long)
    drafted = 0
    for seed in range(n):
        timings: dict = {}
        out = generate(target, None, prompt, 3, temperature=temperature, seed=seed, stop_at_eos=False,
                       speculate=2, draft=draft, timings=timings)[0].tolist()
        counts[0, out[0] * vocab + out[1]] += 1
        counts[1, out[1] * vocab + out[2]] += 1
        drafted += timings["drafted"]
    assert drafted >= n  # every run verified drafts
    for c, joint in zip(counts, exact):
        stat, df = chi2(c, joint)
        assert stat < chi2_limit(df)


# ---- the command line -----------------------------------------------------------------------------------

def test_generate_with_a_2bit_draft_folder_and_prompt_lookup(capsys, tmp_path, tiny_model_dir, text_file):
    draft = tmp_path / "draft"
    code = main(["quantize", "--bits", "2", "--group-size", "32", "--model", str(tiny_model_dir), "--calib-dataset",
                 str(text_file), "--calib-samples", "2", "--calib-seqlen", "32", "--eval-tokens", "0", "--output",
                 str(draft), "--json"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    texts = []
    for extra in ([], ["--speculate", "3"], ["--draft", str(draft)], ["--draft", str(draft), "--speculate", "2"]):
        code, out, _ = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--prompt",
                               "The quick brown fox. The quick brown", "--max-new-tokens", "12", "--json", *extra)
        result = json.loads(out)
        assert code == 0 and ("speculate" in result) == bool(extra)
        if "--draft" in extra:
            assert result["draft"] == str(draft) and result["drafted"] > 0
        texts.append(result["text"])
    assert len(set(texts)) == 1  # greedy: the same text with and without speculation


@pytest.mark.parametrize("extra,message", [
    (["--speculate", "-1"], "--speculate"),
    (["--draft", "DRAFT", "--speculate", "0"], "--draft needs"),
    (["--speculate", "2", "--max-memory", "1G"], "--max-memory"),
])
def test_speculate_bad_input_one_line_error(capsys, tiny_model_dir, extra, message):
    capsys.readouterr()
    extra = [str(tiny_model_dir) if a == "DRAFT" else a for a in extra]
    code, out, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), *extra)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err


def test_draft_of_another_vocabulary_is_refused(tiny_llama):
    from peakllm.errors import PeakError
    from peakllm.runtime.generate import check_draft

    other = tiny_family("llama", vocab_size=310)
    with pytest.raises(PeakError, match="vocabulary"):
        check_draft(tiny_llama, other)
    check_draft(tiny_llama, tiny_family("llama", num_hidden_layers=1))


def test_draft_model_keeps_its_cache_for_accepted_drafts():
    model = RuntimeModel.from_hf(tiny_family("llama", num_hidden_layers=1))
    drafter = DraftModel(model)
    drafter.setup(40)
    seq = [5, 9, 13, 2]
    drafts, _ = drafter.propose(seq, 3)
    assert drafter.cached == seq + drafts[:2]
    seq = seq + drafts[:1] + [7]  # one draft kept, then another token
    drafter.propose(seq, 3)
    assert drafter.cached[:len(seq)] == seq


def test_distribution_is_what_sample_draws_from():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, 3.0]])
    p = distribution(logits, 0.8, top_p=0.7)[0]
    full = torch.softmax(logits[0] / 0.8, -1)
    kept = full >= full.sort(descending=True).values[1]  # the two most likely reach 0.7 of the mass
    assert torch.allclose(p[kept], full[kept] / full[kept].sum()) and (p[~kept] == 0).all()
    from peakllm.runtime.sampling import sample

    g = torch.Generator().manual_seed(0)
    drawn = torch.stack([sample(logits, 0.8, 0.7, g) for _ in range(3000)]).flatten()
    stat, df = chi2(torch.bincount(drawn, minlength=6), p)
    assert stat < chi2_limit(df)


@pytest.mark.slow
def test_default_model_greedy_speculative_equals_plain(default_model):
    """The real model (dense fp32) on code (bench_speculate.py's prompt): prompt lookup keeps drafts and the output is plain
    decoding's, token for token."""
    import json.encoder
    from pathlib import Path

    hf, tok = default_model
    ids = tok(Path(json.encoder.__file__).read_text(), return_tensors="pt")["input_ids"][0, :256]
    target = RuntimeModel.from_hf(hf, max_seq=ids.numel() + 40)
    plain = generate(target, tok, ids, 40, stop_at_eos=False)
    timings: dict = {}
    spec = generate(target, tok, ids, 40, stop_at_eos=False, speculate=4, timings=timings)
    assert timings["accepted"] > 10 and torch.equal(spec, plain)
