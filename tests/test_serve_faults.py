"""`peakllm serve` when something breaks while requests run: a fault in the runner for one request of a
batch, and a fault after a streamed answer has started. The faulty request gets an error, the others in
its batch their whole greedy answer, no client waits forever, and the server goes on serving."""

from __future__ import annotations

import copy
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from peakllm.runtime.model import RuntimeModel
from peakllm.serve.engine import Engine
from peakllm.serve.protocol import TextOut, encode
from peakllm.serve.sequence import SamplingParams
from serve_util import NAME, check_text, greedy_reference, openai_client, served_engine, trusted_len
from test_runtime_model import _tiny

FAULT = "injected fault"


@pytest.fixture(scope="module")
def served(tiny_tokenizer):
    """(hf model, tokenizer, engine, base url): 32 KV blocks of 8 (no preemption here), batch 4."""
    hf = _tiny("llama")
    tok = copy.deepcopy(tiny_tokenizer)
    with served_engine(hf, tok, num_blocks=32, block_size=8, max_batch=4, max_step_tokens=32) as (engine, url):
        yield hf, tok, engine, url


def _faulty_forward(engine, poison: list[int], after: int, batches: list[int]):
    """The runner's forward, failing whenever the sequence with prompt `poison` is in the step and has
    generated `after` tokens or more; `batches` gets the size of each step that failed."""
    forward = engine.runner.forward

    def run(work):
        if any(w.seq.prompt == poison and w.seq.num_generated >= after for w in work):
            batches.append(len(work))
            raise RuntimeError(FAULT)
        return forward(work)
    return run


def _errors(engine) -> int:
    return engine.metrics.finished.get("error", 0)


def _wait_idle(engine, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (engine.scheduler.has_work() or engine.blocks.num_used) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.scheduler.has_work() and engine.blocks.num_used == 0


def test_engine_fault_in_one_sequence_leaves_its_batch_mates_exact():
    """Without HTTP: three sequences decode together, the runner fails for one of them at its 3rd token;
    that one ends with ("error", message) after 3 tokens, the other two give the greedy reference."""
    hf = _tiny("llama")

    class NoTok:
        eos_token_id = 0

    engine = Engine(RuntimeModel.from_hf(hf, torch.float32, max_seq=128), NoTok(), num_blocks=32, block_size=4,
                    max_batch=4, max_step_tokens=32)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(1, 300, (n,), generator=g).tolist() for n in (7, 5, 9)]
    failed_batches: list[int] = []
    engine.runner.forward = _faulty_forward(engine, prompts[1], 3, failed_batches)
    tokens = {i: [] for i in range(3)}
    ends, done = {}, {i: threading.Event() for i in range(3)}

    def emit_for(i):
        def emit(kind, value):
            if kind == "token":
                tokens[i].append(value)
            else:
                ends[i] = (kind, value)
                done[i].set()
        return emit

    for i, p in enumerate(prompts):  # all three are in the engine before its thread starts: one batch
        engine.submit(p, SamplingParams(max_tokens=10, stop_at_eos=False), emit_for(i))
    engine.start()
    try:
        assert all(done[i].wait(60) for i in done)
    finally:
        engine.stop()
    assert failed_batches[0] == 3  # the fault hit a step that held all three sequences
    assert ends[1] == ("error", f"RuntimeError: {FAULT}") and len(tokens[1]) == 3
    for i in (0, 2):
        ref, margins = greedy_reference(hf, prompts[i], 10, set())
        n = trusted_len(margins)
        assert n >= 4 and tokens[i][:n] == ref[:n] and len(tokens[i]) == 10
        assert ends[i] == ("done", "length")
    assert engine.blocks.num_used == 0 and not engine.scheduler.has_work()
    assert engine.metrics.finished == {"error": 1, "length": 2}


def test_runner_error_mid_batch_fails_only_that_request(served, monkeypatch):
    hf, tok, engine, url = served
    prompts = [encode(tok, p) for p in ("Sphinx of black", "How vexingly", "Pack my box with five dozen")]
    failed_batches: list[int] = []
    forward = engine.runner.forward
    faulty = _faulty_forward(engine, prompts[1], 3, failed_batches)
    gate = threading.Event()  # hold the engine until all three requests are in it, so they run as one batch
    monkeypatch.setattr(engine.runner, "forward", lambda work: (gate.wait(60), faulty(work))[1])
    errors_before = _errors(engine)
    answers, failures = {}, {}

    def ask(i):
        try:
            answers[i] = openai_client(url).completions.create(
                model=NAME, prompt=prompts[i], max_tokens=12, temperature=0,
                extra_body={"ignore_eos": True}).choices[0].text
        except Exception as exc:  # noqa: BLE001 - checked below
            failures[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while engine._queued + len(engine.scheduler.waiting) + len(engine.scheduler.running) < 3:
        assert time.monotonic() < deadline, "the requests did not reach the engine"
        time.sleep(0.01)
    gate.set()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client is still waiting"
    assert failed_batches and failed_batches[0] == 3
    assert set(failures) == {1} and set(answers) == {0, 2}, failures
    err = failures[1]
    assert isinstance(err, openai.InternalServerError) and err.status_code == 500
    assert FAULT in err.message and err.body["type"] == "server_error"
    for i in (0, 2):
        ref, margins = greedy_reference(hf, prompts[i], 12, set())
        assert check_text(answers[i], tok, ref, margins) >= 4
    assert _errors(engine) == errors_before + 1
    _wait_idle(engine)
    # the server goes on answering, the faulty prompt too once the fault is gone
    monkeypatch.setattr(engine.runner, "forward", forward)
    ref, margins = greedy_reference(hf, prompts[1], 6, set())
    again = openai_client(url).completions.create(model=NAME, prompt=prompts[1], max_tokens=6, temperature=0,
                                            extra_body={"ignore_eos": True})
    assert check_text(again.choices[0].text, tok, ref, margins) >= 3 and again.usage.completion_tokens == 6


def _sse_events(url: str, body: dict) -> list:
    """The data events of a streamed answer, read until the server ends the response (60 s at most)."""
    events = []
    with httpx.stream("POST", f"{url}/completions", json=body, trust_env=False, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_runner_error_after_the_stream_started_ends_it_with_an_error_event(served, monkeypatch):
    hf, tok, engine, url = served
    prompt = encode(tok, "The quick brown fox")
    failed_batches: list[int] = []
    monkeypatch.setattr(engine.runner, "forward", _faulty_forward(engine, prompt, 4, failed_batches))
    ref, margins = greedy_reference(hf, prompt, 4, set())
    errors_before = _errors(engine)
    body = {"model": NAME, "prompt": prompt, "max_tokens": 20, "temperature": 0, "ignore_eos": True, "stream": True}
    events = _sse_events(url, body)
    assert failed_batches, "the fault was not reached"
    *chunks, error, done = events
    assert done == "[DONE]" and error["error"]["type"] == "server_error" and FAULT in error["error"]["message"]
    assert chunks and all(c["choices"][0]["finish_reason"] is None for c in chunks)
    check_text("".join(c["choices"][0]["text"] for c in chunks), tok, ref, margins)  # what came before the fault
    # the openai client turns the error event into an exception after the chunks that came before it
    got = []
    with pytest.raises(openai.APIError, match=FAULT):
        for chunk in openai_client(url).completions.create(model=NAME, prompt=prompt, max_tokens=20, temperature=0,
                                                     stream=True, extra_body={"ignore_eos": True}):
            got.append(chunk.choices[0].text)
    assert "".join(got) == "".join(c["choices"][0]["text"] for c in chunks)
    assert _errors(engine) == errors_before + 2
    _wait_idle(engine)
    resp = openai_client(url).completions.create(model=NAME, prompt="Pack my box", max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 5


def test_http_side_error_after_the_stream_started_ends_it_and_frees_the_sequence(served, monkeypatch):
    """A fault in this request's own text decoding, after some text went out: the stream ends with an
    error event (not a cut connection, not a hang) and the engine cancels the sequence, freeing its blocks."""
    _, tok, engine, url = served
    full = openai_client(url).completions.create(model=NAME, prompt="Sphinx of", max_tokens=30, temperature=0,
                                           extra_body={"ignore_eos": True}).choices[0].text
    push = TextOut.push

    def faulty_push(self, token):
        if self.sent > 0:  # text was sent already
            raise ValueError(FAULT)
        return push(self, token)

    monkeypatch.setattr(TextOut, "push", faulty_push)
    cancelled = engine.metrics.finished.get("cancelled", 0)
    body = {"model": NAME, "prompt": "Sphinx of", "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}
    events = _sse_events(url, body)
    *chunks, error, done = events
    assert done == "[DONE]" and error["error"]["type"] == "server_error" and FAULT in error["error"]["message"]
    sent = "".join(c["choices"][0]["text"] for c in chunks)
    assert chunks and sent and full.startswith(sent)
    _wait_idle(engine)
    assert engine.metrics.finished.get("cancelled", 0) == cancelled + 1  # it did not run its 100 tokens
    monkeypatch.setattr(TextOut, "push", push)
    resp = openai_client(url).completions.create(model=NAME, prompt="Sphinx of", max_tokens=5, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert resp.usage.completion_tokens == 5
