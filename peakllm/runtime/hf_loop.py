"""Generation through a Hugging Face model's own forward with its KV cache.

The fallback for architectures the lean runtime (`runtime/model.py`) does not implement: one forward
per token with `past_key_values`, streaming decoded text as it grows.
"""

from __future__ import annotations

import torch


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from last-position logits [B, V]: greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # smallest prefix whose mass reaches top_p
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class TextStream:
    """Turns a growing list of token ids into newly completed text pieces (no half-decoded characters)."""

    def __init__(self, tokenizer, callback):
        self.tokenizer, self.callback, self.ids, self.printed = tokenizer, callback, [], 0

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.callback and not text.endswith("\ufffd"):
            self.callback(text[self.printed:])
            self.printed = len(text)

    @property
    def text(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=True)


@torch.inference_mode()
def hf_generate_text(model, tokenizer, ids: torch.Tensor, max_new_tokens: int, *, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int | None = 0, stream=None) -> tuple[str, int]:
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    eos = tokenizer.eos_token_id
    out = TextStream(tokenizer, stream)
    result = model(input_ids=ids, use_cache=True)
    past = result.past_key_values
    for _ in range(max_new_tokens):
        token = sample_next(result.logits[:, -1, :], temperature, top_p, gen)
        if eos is not None and int(token[0]) == eos:
            break
        out.push(int(token[0]))
        result = model(input_ids=token.view(1, 1), past_key_values=past, use_cache=True)
        past = result.past_key_values
    return out.text, len(out.ids)
