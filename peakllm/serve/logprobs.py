"""Log-probabilities in OpenAI's two shapes: the completions one (parallel lists, text offsets) and the chat one
(a list of {token, logprob, bytes, top_logprobs})."""

from __future__ import annotations

import re


def _piece(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def _byte_level_map() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable character that stands for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_LEVEL = _byte_level_map()
_SP_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer, token: int, text: str) -> list[int]:
    """A token's own bytes, also when it is part of a character (its text then decodes to U+FFFD): from the
    byte-level alphabet (GPT-2-style BPE) or a sentencepiece byte token (<0xE2>); else the text's UTF-8."""
    if "\ufffd" in text:
        raw = tokenizer.convert_ids_to_tokens(token)
        match = _SP_BYTE.fullmatch(raw or "")
        if match:
            return [int(match.group(1), 16)]
        if raw and all(c in _BYTE_LEVEL for c in raw):
            return [_BYTE_LEVEL[c] for c in raw]
    return list(text.encode())


def chat_logprobs(tokenizer, entries: list[tuple[int, float, list]]) -> dict:
    def one(token, logprob):
        text = _piece(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": token_bytes(tokenizer, token, text)}

    return {"content": [{**one(token, lp), "top_logprobs": [one(t, v) for t, v in top]} for token, lp, top in entries],
            "refusal": None}


class CompletionLogprobs:
    """One choice's completions-style logprobs; `add` gives the part for the entries it is handed (a stream's
    chunk, or the whole answer), with text offsets that run on across chunks."""

    def __init__(self, tokenizer):
        self.tokenizer, self.offset = tokenizer, 0

    def add(self, entries: list[tuple[int, float, list]]) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token, lp, top in entries:
            text = _piece(self.tokenizer, token)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append({_piece(self.tokenizer, t): v for t, v in top})
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out
