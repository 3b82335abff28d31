"""Log-probabilities in OpenAI's two shapes: the completions one (parallel lists, text offsets) and the chat one
(a list of {token, logprob, bytes, top_logprobs})."""

from __future__ import annotations


def _piece(tokenizer, token: int) -> str:
    return tokenizer.decode([token], skip_special_tokens=False)


def chat_logprobs(tokenizer, entries: list[tuple[int, float, list]]) -> dict:
    def one(token, logprob):
        text = _piece(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

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
