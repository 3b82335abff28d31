"""The generation loop: one prefill, then one model step per token on the static KV cache.

No HF `generate`, no dynamic cache: per token the loop calls the model once, picks the next token
(greedy, or temperature + top-p sampling from a seeded generator) and checks for EOS. With `speculate`
= k > 0 (one sequence, the whole-step engine holding the model) a drafter proposes k tokens per step and
the target verifies them in one pass (runtime/speculate.py): greedy output is the same token for token,
sampled output has the same distribution.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

import torch

from peakllm.errors import PeakError
from peakllm.runtime.families import check_config
from peakllm.runtime.hf_loop import hf_generate_text
from peakllm.runtime.model import RuntimeModel
from peakllm.runtime.sampling import eos_ids, sample, TextStream
from peakllm.runtime.speculate import DraftModel, PromptLookup, speculative_generate


def generate(model, tokenizer, prompt_ids, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
             seed: int | None = None, stream: Callable[[str], None] | None = None, stop_at_eos: bool = True,
             timings: dict | None = None, speculate: int = 0, draft=None,
             draft_threads: int | None = None) -> torch.Tensor:
    """Generate up to `max_new_tokens` after `prompt_ids` ([T] or [B, T] ids); returns the new ids [B, n].

    Stops when every sequence has produced EOS (sequences that finished early are padded with EOS).
    `stream(text)` receives the decoded text of sequence 0 as it grows. If `timings` is a dict it is
    filled with `prefill_s` (prompt forward + first token), `decode_s` (all later steps) and `steps`.
    `speculate` = k > 0: k tokens drafted per step by `draft` (a RuntimeModel of the same vocabulary) or,
    without one, by prompt lookup; only for one sequence on the whole-step engine (else plain decoding;
    `timings["speculative"]` says which ran). `draft_threads`: the draft's engine threads (default torch's).
    """
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
    if prompt.dim() == 1:
        prompt = prompt[None]
    B, T = prompt.shape
    if T == 0:
        raise PeakError("the prompt is empty")
    if max_new_tokens < 1:
        return torch.empty(B, 0, dtype=torch.long)
    if speculate < 0:
        raise PeakError(f"speculate must be >= 0 tokens, got {speculate}")
    model.setup_cache(B, T + max_new_tokens)
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    eos = eos_ids(model, tokenizer) if stop_at_eos else set()
    eos_t = torch.tensor(sorted(eos), dtype=torch.long)
    text = TextStream(tokenizer, stream) if stream is not None else None
    speculative = speculate > 0 and B == 1 and model.can_decode_tokens()
    if timings is not None:
        timings["speculative"] = speculative
    if speculative:
        drafter = PromptLookup() if draft is None else DraftModel(draft, draft_threads)
        return speculative_generate(model, drafter, prompt, max_new_tokens, speculate, temperature=temperature,
                                    top_p=top_p, generator=generator, eos=eos,
                                    push=None if text is None else text.push, timings=timings)

    out = torch.empty(B, max_new_tokens, dtype=torch.long)
    done = torch.zeros(B, dtype=torch.bool)
    t0 = time.perf_counter()
    with torch.inference_mode():
        logits = model(prompt, 0, last_only=True)
        token = sample(logits[:, -1], temperature, top_p, generator)
        t1 = time.perf_counter()
        n = 0
        for n in range(max_new_tokens):
            if eos:
                token = torch.where(done, eos_t[0], token)
                done |= torch.isin(token, eos_t)
            out[:, n] = token
            if text is not None and not (eos and int(token[0]) in eos):
                text.push(int(token[0]))
            if (eos and bool(done.all())) or n + 1 == max_new_tokens:
                break
            logits = model(token[:, None], T + n, last_only=True)
            token = sample(logits[:, -1], temperature, top_p, generator)
    t2 = time.perf_counter()
    if timings is not None:
        timings.update(prefill_s=t1 - t0, decode_s=t2 - t1, steps=n)
    return out[:, : n + 1]


def check_draft(hf_model, draft_model) -> None:
    """A draft must speak the target's vocabulary (same size, same ids) and be runnable by the lean runtime."""
    vt, vd = hf_model.config.vocab_size, draft_model.config.vocab_size
    if vt != vd:
        raise PeakError(f"the draft model's vocabulary ({vd} tokens) is not the target's ({vt})")
    check_config(draft_model.config)


def generate_text(hf_model, tokenizer, ids, max_new_tokens: int, *, temperature: float = 0.0, top_p: float = 1.0,
                  seed: int | None = 0, stream: Callable[[str], None] | None = None,
                  dtype: torch.dtype = torch.float32, max_memory: int | None = None, speculate: int = 0,
                  draft_model=None, timings: dict | None = None) -> tuple[str, int]:
    """(text, number of new tokens) for an HF model: through the lean runtime when it supports the
    architecture, else through `runtime.hf_loop` (same signature as `hf_generate_text`). max_memory (bytes):
    the whole process held to it, weights streamed as needed (runtime/offload.py; the lean runtime only). speculate / draft_model (an
    HF model of the same vocabulary): speculative decoding (see `generate`), the lean runtime only."""
    try:
        check_config(hf_model.config)
    except PeakError as exc:  # a family or feature the runtime lacks: transformers runs it, said in one line
        if max_memory is not None:
            raise PeakError(f"--max-memory needs peakllm's runtime, which cannot run this model: {exc}") from None
        print(f"peakllm: {exc}; generating with transformers instead (slower)", file=sys.stderr)
        return hf_generate_text(hf_model, tokenizer, ids, max_new_tokens, temperature=temperature, top_p=top_p,
                                seed=seed, stream=stream)
    prompt = torch.as_tensor(ids, dtype=torch.long)
    max_seq = prompt.shape[-1] + max_new_tokens
    model = RuntimeModel.from_hf(hf_model, dtype, max_seq=max_seq)
    model.set_max_memory(max_memory, whole_process=True)
    draft = None
    if draft_model is not None and speculate > 0:
        check_draft(hf_model, draft_model)
        draft = RuntimeModel.from_hf(draft_model, dtype, max_seq=max_seq)
    timings = {} if timings is None else timings
    out = generate(model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                   stream=stream, speculate=speculate, draft=draft, timings=timings)[0]
    if speculate > 0 and not timings.get("speculative"):
        print("peakllm: speculative decoding needs the whole-step engine for every layer (no --max-memory, no "
              "MoE); decoding one token per step", file=sys.stderr)
    eos = eos_ids(model, tokenizer)
    kept = [t for t in out.tolist() if t not in eos]
    return tokenizer.decode(kept, skip_special_tokens=True), len(out)
