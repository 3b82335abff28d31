"""Generation through a Hugging Face model's own forward with its KV cache.

The fallback for architectures the lean runtime (`runtime/model.py`) does not implement: one forward
per token with `past_key_values`, streaming decoded text as it grows. Sampling and streaming are the
lean runtime's own (`runtime/sampling.py`), so both paths pick and print tokens the same way.
"""

from __future__ import annotations

import inspect

import torch

from peakllm.runtime.sampling import sample, TextStream


@torch.inference_mode()
def hf_generate_text(model, tokenizer, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = 0, stream=None) -> tuple[str, int]:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = tokenizer.eos_token_id
    text = TextStream(tokenizer, stream) if stream is not None else None
    new_ids: list[int] = []
    # transformers 5.x names the KV cache `cache` (argument and output); `past_key_values`, what 4.x calls it,
    # is deprecated there and goes in 5.40
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PEFT model passes it on
    key = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    result = model(input_ids=ids, use_cache=True)
    past = getattr(result, key)
    for _ in range(max_new_tokens):
        token = sample(result.logits[:, -1, :], temperature, top_p, gen)
        if eos is not None and int(token[0]) == eos:
            break
        new_ids.append(int(token[0]))
        if text is not None:
            text.push(new_ids[-1])
        result = model(input_ids=token.view(1, 1), use_cache=True, **{key: past})
        past = getattr(result, key)
    return tokenizer.decode(new_ids, skip_special_tokens=True), len(new_ids)
