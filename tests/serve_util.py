"""Helpers for the serve tests: a served tiny model, a greedy reference with its margins, and the prefix it can
vouch for."""

from __future__ import annotations

from contextlib import contextmanager

import openai
import torch

from peakllm.runtime.model import RuntimeModel
from peakllm.serve.api import build_app
from peakllm.serve.engine import Engine
from peakllm.serve.server import ServerThread

NAME = "tiny"


def openai_client(base_url: str, api_key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=api_key or "unused", max_retries=0, timeout=60)


@contextmanager
def served_engine(hf, tokenizer, app_kw=None, **engine_kw):
    """(engine, base url) of `hf` behind the HTTP app on a free loopback port, warmed up (kernels built before any
    test or timing); stopped on exit. `engine_kw`: the Engine's pool and batch sizes; `app_kw`: build_app's
    limits and API key."""
    model = RuntimeModel.from_hf(hf, torch.float32, max_seq=128)
    engine = Engine(model, tokenizer, max_model_len=128, **engine_kw)
    engine.start()
    app_kw = app_kw or {}
    server = ServerThread(build_app(engine, tokenizer, NAME, **app_kw)).start()
    url = f"http://127.0.0.1:{server.port}/v1"
    try:
        openai_client(url, app_kw.get("api_key")).completions.create(model=NAME, prompt="warm", max_tokens=2)
        yield engine, url
    finally:
        server.stop()
        engine.stop()

NEAR_TIE = 1e-3  # top-1 minus top-2 logit below this: batched and single float sums may pick either


@torch.no_grad()
def greedy_reference(hf, prompt: list[int], max_new: int, eos: set[int]) -> tuple[list[int], list[float]]:
    """HF greedy continuation (full forward each step) and the top-1/top-2 logit margin of each step."""
    ids, tokens, margins = list(prompt), [], []
    for _ in range(max_new):
        logits = hf(torch.tensor([ids])).logits[0, -1].float()
        top = logits.topk(2).values
        token = int(logits.argmax())
        tokens.append(token)
        margins.append(float(top[0] - top[1]))
        ids.append(token)
        if token in eos:
            break
    return tokens, margins


def trusted_len(margins: list[float]) -> int:
    """How many leading tokens no float-summation difference can flip: up to the first near tie, inclusive
    of nothing after it (the token at a near tie may differ, and everything after depends on it)."""
    for i, m in enumerate(margins):
        if m < NEAR_TIE:
            return i
    return len(margins)


def check_text(text: str, tok, ref: list[int], margins: list[float]) -> int:
    """A served answer's text is the greedy reference's as far as no near tie could flip a token (EOS, id 0,
    is not text); returns how many tokens that vouches for."""
    n = trusted_len(margins)
    expected = tok.decode([t for t in ref[:n] if t != 0], skip_special_tokens=True)
    if n == len(ref):
        assert text == expected
    else:
        assert text.startswith(expected.rstrip("\ufffd"))
    return n
