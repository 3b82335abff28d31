"""`peakllm serve` on the real default model, dense and int4: greedy answers, sent concurrently over HTTP,
are the same text as `peakllm generate` gives for each prompt alone."""

from __future__ import annotations

import threading

import openai
import pytest
import torch

from peakllm.cli import main as peakllm
from peakllm.cli.generate_cmd import prompt_ids
from peakllm.runtime.generate import generate_text
from peakllm.serve.api import build_app
from peakllm.serve.server import ServerThread, build_engine

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "The three laws of robotics are",
           "Photosynthesis is", "My favourite recipe for pancakes"]
CHAT = "Name three colours."
NEW = 24


def _serve_and_compare(model_arg: str):
    engine, tok = build_engine(model_arg, num_blocks=64, block_size=16, max_batch=4, max_step_tokens=32)
    from peakllm.models import load_model

    hf, _ = load_model(model_arg)
    expected = [generate_text(hf, tok, prompt_ids(tok, p, False), NEW)[0] for p in PROMPTS]
    expected_chat = generate_text(hf, tok, prompt_ids(tok, CHAT, True), NEW)[0]
    engine.start()
    server = ServerThread(build_app(engine, tok, "m")).start()
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused", max_retries=0,
                           timeout=300)
    got, errors = {}, []

    def ask(i):
        try:
            if i == len(PROMPTS):
                got[i] = client.chat.completions.create(model="m", messages=[{"role": "user", "content": CHAT}],
                                                        max_tokens=NEW, temperature=0).choices[0].message.content
            else:
                chunks = client.completions.create(model="m", prompt=PROMPTS[i], max_tokens=NEW, temperature=0,
                                                   stream=i % 2 == 0)
                got[i] = "".join(c.choices[0].text for c in chunks) if i % 2 == 0 else chunks.choices[0].text
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    try:
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(PROMPTS) + 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    finally:
        server.stop()
        engine.stop()
    assert not errors
    assert [got[i] for i in range(len(PROMPTS))] == expected
    assert got[len(PROMPTS)] == expected_chat
    assert engine.blocks.num_used == 0


@pytest.mark.slow
def test_default_model_dense_matches_generate():
    torch.manual_seed(0)
    _serve_and_compare("default")


@pytest.mark.slow
def test_default_model_int4_matches_generate(tmp_path):
    out = tmp_path / "int4"
    assert peakllm(["quantize", "--model", "default", "--method", "rtn", "--bits", "4", "--group-size", "32",
                    "--eval-tokens", "0", "--output", str(out), "--json"]) == 0  # its perplexity is not the point here
    _serve_and_compare(str(out))
