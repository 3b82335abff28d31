"""`peakllm serve` over HTTP with the real `openai` client, on 127.0.0.1, against a tiny random Llama."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from peakllm.runtime.model import RuntimeModel
from peakllm.serve.api import build_app
from peakllm.serve.engine import Engine
from peakllm.serve.protocol import encode
from peakllm.serve.server import ServerThread
from serve_util import NAME, check_text, greedy_reference, openai_client, served_engine, trusted_len
from test_runtime_model import _tiny

CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def served(tiny_tokenizer):
    """(hf model, tokenizer, engine, base url): 16 KV blocks of 8 tokens, batch 4, 16 tokens a step."""
    hf = _tiny("llama")
    tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = CHAT_TEMPLATE
    with served_engine(hf, tok, num_blocks=16, block_size=8, max_batch=4, max_step_tokens=16) as (engine, url):
        yield hf, tok, engine, url


@pytest.mark.parametrize("stream", [False, True])
def test_completion_is_the_greedy_continuation(served, stream):
    hf, tok, _, url = served
    prompt = "The quick brown fox"
    ref, margins = greedy_reference(hf, encode(tok, prompt), 12, {0})
    client = openai_client(url)
    if stream:
        chunks = list(client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True))
        text = "".join(c.choices[0].text for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        resp = client.completions.create(model=NAME, prompt=prompt, max_tokens=12, temperature=0)
        text, reason = resp.choices[0].text, resp.choices[0].finish_reason
        assert resp.usage.prompt_tokens == len(encode(tok, prompt))
    assert check_text(text, tok, ref, margins) >= 4
    if trusted_len(margins) == len(ref):
        assert reason == ("stop" if ref[-1] == 0 else "length")


@pytest.mark.parametrize("stream", [False, True])
def test_chat_uses_the_template(served, stream):
    hf, tok, _, url = served
    messages = [{"role": "system", "content": "Judge my vow."}, {"role": "user", "content": "Pack my box"}]
    ids = encode(tok, tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    ref, margins = greedy_reference(hf, ids, 10, {0})
    client = openai_client(url)
    if stream:
        chunks = list(client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
    else:
        resp = client.chat.completions.create(model=NAME, messages=messages, max_tokens=10, temperature=0)
        text, usage = resp.choices[0].message.content, resp.usage
        assert resp.choices[0].message.role == "assistant"
    assert usage.prompt_tokens == len(ids) and usage.completion_tokens == len(ref)
    assert check_text(text, tok, ref, margins) >= 4


def test_concurrent_requests_each_get_their_own_greedy_answer(served, monkeypatch):
    hf, tok, engine, url = served
    prompts = ["Sphinx of black", "How vexingly", "Pack my box with five dozen", "The lazy dog", "quick daft",
               "judge my vow", "brown fox jumps over", "liquor jugs"]
    answers, errors = {}, []
    preempted = engine.scheduler.preemptions
    # hold the engine until all eight requests are in it, so they run together whatever the machine's load
    gate, forward = threading.Event(), engine.runner.forward
    monkeypatch.setattr(engine.runner, "forward", lambda work: (gate.wait(60), forward(work))[1])

    def ask(i):
        try:
            answers[i] = openai_client(url).completions.create(
                model=NAME, prompt=prompts[i], max_tokens=40, temperature=0,
                extra_body={"ignore_eos": True}).choices[0].text
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while engine._queued + len(engine.scheduler.waiting) + len(engine.scheduler.running) < len(prompts):
        assert time.monotonic() < deadline, "the requests did not reach the engine"
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(120)
    assert not errors and len(answers) == len(prompts), errors
    compared = 0
    for i, p in enumerate(prompts):
        ref, margins = greedy_reference(hf, encode(tok, p), 40, set())
        compared += check_text(answers[i], tok, ref, margins)
    assert compared >= 100
    assert engine.scheduler.preemptions > preempted  # 4 running × 6 blocks each > 16 blocks
    assert engine.blocks.num_used == 0


def test_bad_requests_get_openai_shaped_4xx(served):
    _, _, _, url = served
    client = openai_client(url)
    r = httpx.post(f"{url}/completions", content=b'{"model": "tiny", "prompt": ', trust_env=False,
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    assert "JSON" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/completions", json={"model": NAME}, trust_env=False)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    with pytest.raises(openai.NotFoundError) as exc:
        client.completions.create(model="gpt-4", prompt="hi", max_tokens=2)
    assert exc.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=NAME, prompt="hi", max_tokens=-3)
    assert exc.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as exc:
        client.completions.create(model=NAME, prompt=[5] * 120, max_tokens=16)  # 136 > context of 128
    assert exc.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="--max-n") as exc:
        client.completions.create(model=NAME, prompt="hi", max_tokens=2, n=9)
    assert exc.value.param == "n"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], temperature=-1)


def _finished(engine, reason):
    return engine.metrics.finished.get(reason, 0)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_and_frees_blocks(served, monkeypatch, stream):
    _, _, engine, url = served
    forward = engine.runner.forward
    monkeypatch.setattr(engine.runner, "forward", lambda work: (time.sleep(0.02), forward(work))[1])  # a slow model
    cancelled = _finished(engine, "cancelled")
    body = {"model": NAME, "prompt": "The quick", "max_tokens": 100, "ignore_eos": True, "stream": stream}
    if stream:
        with httpx.stream("POST", f"{url}/completions", json=body, trust_env=False, timeout=60) as r:
            lines = r.iter_lines()
            assert sum(1 for _, line in zip(range(6), lines) if line.startswith("data:")) == 3
    else:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/completions", json=body, trust_env=False, timeout=0.3)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (_finished(engine, "cancelled") == cancelled or engine.blocks.num_used):
        time.sleep(0.05)
    assert _finished(engine, "cancelled") == cancelled + 1  # cancelled: it did not run its 100 tokens
    assert engine.blocks.num_used == 0 and not engine.scheduler.has_work()


def test_full_queue_gets_429(served):
    hf, tok, _, _ = served
    engine = Engine(RuntimeModel.from_hf(hf, torch.float32, max_seq=128), tok, num_blocks=16, block_size=8,
                    max_queue=1)  # not started yet: the first request waits in the queue
    server = ServerThread(build_app(engine, tok, NAME)).start()
    url = f"http://127.0.0.1:{server.port}/v1"
    first = {}
    waiter = threading.Thread(target=lambda: first.update(
        r=openai_client(url).completions.create(model=NAME, prompt="hi", max_tokens=3, temperature=0)))
    try:
        waiter.start()
        deadline = time.monotonic() + 10
        while engine._queued + len(engine.scheduler.waiting) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(openai.RateLimitError):
            openai_client(url).completions.create(model=NAME, prompt="hi", max_tokens=3)
        engine.start()
        waiter.join(60)
        assert first["r"].usage.completion_tokens >= 1
    finally:
        server.stop()
        engine.stop()


def test_models_health_metrics(served):
    _, _, engine, url = served
    client = openai_client(url)
    assert [m.id for m in client.models.list().data] == [NAME]
    base = url.removesuffix("/v1")
    assert httpx.get(f"{base}/health", trust_env=False).json() == {"status": "ok"}
    client.completions.create(model=NAME, prompt="Pack", max_tokens=2, temperature=0)
    text = httpx.get(f"{base}/metrics", trust_env=False).text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["peakllm_kv_blocks_total"] == 16 and values["peakllm_requests_running"] == 0
    assert values["peakllm_time_to_first_token_seconds_count"] >= 1
    assert values['peakllm_time_to_first_token_seconds_bucket{le="+Inf"}'] == values[
        "peakllm_time_to_first_token_seconds_count"]
    assert values["peakllm_generation_tokens_total"] >= 2 and "peakllm_prefix_reused_tokens_total" in values


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.subprocess
def test_cli_serves_a_model_folder(tiny_model_dir):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "peakllm", "serve", "--model", str(tiny_model_dir), "--port",
                             str(port), "--kv-blocks", "8", "--max-model-len", "64", "--threads", "1"],
                            cwd=Path(__file__).resolve().parents[1], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PEAKLLM_API_KEY": "k1"})
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        resp = openai_client(f"http://127.0.0.1:{port}/v1", "k1").completions.create(
            model=str(tiny_model_dir), prompt="The quick", max_tokens=4, temperature=0)
        assert resp.usage.completion_tokens >= 1 and resp.model == str(tiny_model_dir)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", trust_env=False).status_code == 401  # the env's key
    finally:
        proc.terminate()
        proc.wait(30)
    assert "KV cache 8 blocks" in proc.stderr.read()


@pytest.mark.parametrize("stream", [False, True])
def test_stop_string_ends_the_answer_before_it(served, stream):
    _, _, engine, url = served
    client = openai_client(url)
    full = client.completions.create(model=NAME, prompt="Sphinx of", max_tokens=30, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[12:15]
    assert len(full) >= 15
    cancelled = _finished(engine, "cancelled")
    resp = client.completions.create(model=NAME, prompt="Sphinx of", max_tokens=30, temperature=0, stop=[stop],
                                     stream=stream, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(resp)
        text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
    else:
        text, reason = resp.choices[0].text, resp.choices[0].finish_reason
    assert text == full[:full.find(stop)] and reason == "stop"
    deadline = time.monotonic() + 10  # the sequence was cancelled in the engine, its blocks freed
    while _finished(engine, "cancelled") == cancelled and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _finished(engine, "cancelled") == cancelled + 1
