"""The request fields, API key and limits of `peakllm serve`, through the real `openai` client, on a tiny random Llama:
each field changes the output as it should (against slow references on the model's logits), unsupported ones get a
400 naming them, a wrong or missing key a 401, oversized requests a 4xx."""

from __future__ import annotations

import copy

import httpx
import openai
import pytest
import torch

from peakllm.cli.serve_cmd import is_loopback
from peakllm.serve.logprobs import token_bytes
from peakllm.serve.protocol import encode
from serve_util import NAME, check_text, greedy_reference, openai_client, served_engine, trusted_len
from test_runtime_model import _tiny

KEY = "sekret-key"
LIMITS = {"api_key": KEY, "max_request_bytes": 4000, "max_tokens_limit": 40, "max_n": 3}
PROMPT = "Sphinx of black"


@pytest.fixture(scope="module")
def served(tiny_tokenizer):
    hf = _tiny("llama")
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    with served_engine(hf, tok, app_kw=LIMITS, num_blocks=32, block_size=8, max_batch=4,
                       max_step_tokens=32, threads=1) as (engine, url):  # one thread: no spin-waits on a busy box
        yield hf, tok, engine, url, openai_client(url, KEY)


@pytest.fixture(autouse=True)
def _one_thread():
    """The slow references (full HF forwards of a tiny model) on one thread: many threads only spin on a busy box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _text(client, **kw):
    kw = {"model": NAME, "prompt": PROMPT, "max_tokens": 16, "extra_body": {"ignore_eos": True}, **kw}
    return client.completions.create(**kw).choices[0].text


def test_seed_makes_sampling_repeatable_and_n_gives_seed_plus_i(served):
    *_, client = served
    a, b = (_text(client, temperature=1.0, seed=7) for _ in range(2))
    assert a == b
    others = {_text(client, temperature=1.0, seed=s) for s in (8, 9, 10)}
    assert len(others | {a}) > 1  # the seed matters
    resp = client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7, n=3,
                                     extra_body={"ignore_eos": True})
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert [c.text for c in resp.choices] == [a] + [_text(client, temperature=1.0, seed=s) for s in (8, 9)]
    assert resp.usage.completion_tokens == 3 * 16
    chunks = list(client.completions.create(model=NAME, prompt=PROMPT, max_tokens=16, temperature=1.0, seed=7, n=2,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    streamed = ["".join(c.choices[0].text for c in chunks if c.choices and c.choices[0].index == i) for i in (0, 1)]
    assert streamed == [c.text for c in resp.choices[:2]]
    assert chunks[-1].usage.completion_tokens == 2 * 16


def test_top_k_one_is_greedy_at_any_temperature(served):
    hf, tok, _, _, client = served
    ref, margins = greedy_reference(hf, encode(tok, PROMPT), 16, set())
    text = _text(client, temperature=2.0, seed=3, extra_body={"ignore_eos": True, "top_k": 1})
    assert check_text(text, tok, ref, margins) >= 4
    hot = _text(client, temperature=2.0, seed=3)  # without top_k the same seed samples away from greedy
    assert hot != text


@torch.no_grad()
def _penalized_reference(hf, prompt, n, presence, frequency):
    """Greedy on logits - frequency * count - presence * (count > 0) over the generated tokens, full forward
    each step, with the top-1/top-2 margins."""
    ids, out, margins = list(prompt), [], []
    for _ in range(n):
        logits = hf(torch.tensor([ids])).logits[0, -1].float()
        for t in set(out):
            logits[t] -= frequency * out.count(t) + presence
        top = logits.topk(2).values
        margins.append(float(top[0] - top[1]))
        out.append(int(logits.argmax()))
        ids.append(out[-1])
    return out, margins


@pytest.mark.parametrize("presence, frequency", [(0.0, -0.6), (-0.6, 0.0)])
def test_penalties_follow_the_reference(served, presence, frequency):
    # negative penalties: a random model seldom repeats a token, so only rewarding repeats changes its output
    # (the two cases differ from each other too: frequency scales with the count, presence does not)
    hf, tok, _, _, client = served
    prompt = encode(tok, PROMPT)
    plain, _ = greedy_reference(hf, prompt, 24, set())
    ref, margins = _penalized_reference(hf, prompt, 24, presence, frequency)
    n = trusted_len(margins)
    assert n >= 8 and tok.decode(ref[:n]) != tok.decode(plain[:n])  # so the test can fail
    text = _text(client, max_tokens=24, temperature=0, presence_penalty=presence, frequency_penalty=frequency)
    assert check_text(text, tok, ref, margins) >= 8


def test_logprobs_are_the_models_log_softmax(served):
    hf, tok, _, _, client = served
    prompt = encode(tok, PROMPT)
    ref, margins = greedy_reference(hf, prompt, 8, set())
    n = trusted_len(margins)
    assert n >= 3
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([prompt + ref])).logits[0].float(), dim=-1)
    resp = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, temperature=0, logprobs=3,
                                     extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    assert len(lp.token_logprobs) == 8 and lp.text_offset[0] == 0
    for i in range(n):
        row = logp[len(prompt) - 1 + i]
        assert lp.token_logprobs[i] == pytest.approx(float(row[ref[i]]), abs=1e-3)
        top = sorted(lp.top_logprobs[i].values(), reverse=True)
        if len(top) == 3:  # (fewer when two of the ids print alike)
            assert top == pytest.approx(row.topk(3).values.tolist(), abs=1e-3)
        assert lp.tokens[i] == tok.decode([ref[i]])
    # sampled tokens report their logprob under the model, before temperature
    hot = client.completions.create(model=NAME, prompt=prompt, max_tokens=1, temperature=2.0, seed=5, logprobs=0)
    token = tok.encode(hot.choices[0].text, add_special_tokens=False)
    if len(token) == 1:
        assert hot.choices[0].logprobs.token_logprobs[0] == pytest.approx(float(logp[len(prompt) - 1][token[0]]),
                                                                         abs=1e-3)


def test_chat_logprobs_and_template(served):
    hf, tok, *_, client = served
    messages = [{"role": "user", "content": "Pack my box"}]
    resp = client.chat.completions.create(model=NAME, messages=messages, max_tokens=5, temperature=0,
                                          logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    ids = encode(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    assert resp.usage.prompt_tokens == len(ids)
    ref, margins = greedy_reference(hf, ids, 5, set())
    check_text(resp.choices[0].message.content, tok, ref, margins)
    content = resp.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 2 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    if "\ufffd" not in "".join(e.token for e in content):
        assert "".join(e.token for e in content) == resp.choices[0].message.content


@pytest.mark.parametrize("field, value", [("logit_bias", {"5": 10}), ("response_format", {"type": "json_object"}),
                                          ("tools", [{"type": "function", "function": {"name": "f"}}]),
                                          ("min_p", 0.1), ("best_of", 2), ("echo", True)])
def test_unsupported_fields_get_400_naming_them(served, field, value):
    *_, client = served
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=NAME, prompt="hi", max_tokens=2, extra_body={field: value})
    assert exc.value.param == field and field in exc.value.message


def test_harmless_and_empty_fields_are_accepted(served):
    *_, client = served
    resp = client.completions.create(model=NAME, prompt="hi", max_tokens=2, user="u1",
                                     extra_body={"logit_bias": {}, "tools": None})
    assert resp.usage.completion_tokens >= 1


def test_api_key_is_required_except_for_health(served):
    *_, url, client = served
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.post(f"{url}/completions", json={"model": NAME, "prompt": "hi", "max_tokens": 2}, headers=headers,
                       trust_env=False)
        assert r.status_code == 401
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        assert r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/models", trust_env=False).status_code == 401
    assert httpx.get(f"{url.removesuffix('/v1')}/health", trust_env=False).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai_client(url, "wrong").completions.create(model=NAME, prompt="hi", max_tokens=2)
    assert client.models.list().data[0].id == NAME


def test_limits_give_clear_4xx(served):
    *_, engine, url, client = served
    auth = {"Authorization": f"Bearer {KEY}"}
    big = {"model": NAME, "prompt": "x" * 5000, "max_tokens": 2}
    r = httpx.post(f"{url}/completions", json=big, headers=auth, trust_env=False)
    assert r.status_code == 413 and "--max-request-bytes" in r.json()["error"]["message"]
    chunks = (b'{"model": "tiny", "prompt": "' + b"x" * 1000 for _ in range(5))  # chunked: no content-length
    r = httpx.post(f"{url}/completions", content=chunks, headers={**auth, "content-type": "application/json"},
                   trust_env=False)
    assert r.status_code == 413
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=NAME, prompt="hi", max_tokens=41)
    assert exc.value.param == "max_tokens" and "40" in exc.value.message
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=NAME, prompt=[5] * engine.max_model_len, max_tokens=1)
    assert exc.value.param == "prompt" and exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=NAME, prompt="hi", max_tokens=2, n=4)
    assert exc.value.param == "n"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=NAME, prompt="hi", max_tokens=2, logprobs=21)
    assert exc.value.param == "logprobs"
    assert engine.blocks.num_used == 0


def test_loopback_hosts():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2") and not is_loopback("myhost")


def test_logprob_bytes_of_a_partial_character(tiny_tokenizer):
    tok = tiny_tokenizer
    for text in ("é", "€"):  # byte-level BPE: the pieces of one character each decode to U+FFFD alone
        ids = tok.encode(text, add_special_tokens=False)
        pieces = [token_bytes(tok, t, tok.decode([t])) for t in ids]
        assert len(ids) > 1 and sum(pieces, []) == list(text.encode())
