"""The OpenAI wire format: request bodies, their checks, prompts as token ids, text out of tokens."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict
from peakllm.data import protocol_bos



class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# Fields accepted and ignored because they do not change the output; any other field this server does not act
# on gets a 400 naming it unless it is null or empty (a client sending "tools": [] asks for nothing).
HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key", "safety_identifier"}
MAX_TOP_LOGPROBS = 20


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # checked by `check_common`: unknown fields are refused
    model: str
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # not OpenAI's (vLLM and llama-server have it); 0 or -1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False  # not OpenAI's (vLLM has it): generate max_tokens tokens, for load tests


class CompletionRequest(_Request):
    prompt: str | list[int] | list[str]
    logprobs: int | None = None  # the top k alternatives per token (0: only the chosen token's)
    echo: bool = False
    best_of: int | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


def check_common(req: _Request, max_n: int) -> list[str]:
    """Refuse what this server does not do; returns the stop strings."""
    for name, value in (req.model_extra or {}).items():
        if name not in HARMLESS and value not in (None, [], {}, False, ""):
            raise ApiError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")
    if not 1 <= req.n <= max_n:
        raise ApiError(400, f"n must be in 1..{max_n} (this server's --max-n), got {req.n}", param="n")
    if req.temperature < 0 or req.temperature > 2:
        raise ApiError(400, f"temperature must be in [0, 2], got {req.temperature}", param="temperature")
    if not 0 < req.top_p <= 1:
        raise ApiError(400, f"top_p must be in (0, 1], got {req.top_p}", param="top_p")
    if req.top_k < -1:
        raise ApiError(400, f"top_k must be >= 1, or 0 or -1 for off; got {req.top_k}", param="top_k")
    for name in ("presence_penalty", "frequency_penalty"):
        if not -2 <= getattr(req, name) <= 2:
            raise ApiError(400, f"{name} must be in [-2, 2], got {getattr(req, name)}", param=name)
    for name, value in (req.stream_options or {}).items():
        if name != "include_usage" and value:
            raise ApiError(400, f"stream_options.{name} is not supported", param=f"stream_options.{name}")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")
    return stops


def top_logprobs(req) -> int | None:
    """How many alternatives per token the request asks for (None: no logprobs at all)."""
    if isinstance(req, ChatRequest):
        if req.top_logprobs and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        k, param = (req.top_logprobs or 0) if req.logprobs else None, "top_logprobs"
    else:
        k, param = req.logprobs, "logprobs"
    if k is not None and not 0 <= k <= MAX_TOP_LOGPROBS:
        raise ApiError(400, f"{param} must be in 0..{MAX_TOP_LOGPROBS}, got {k}", param=param)
    return k


def check_max_tokens(value: int | None, default: int, limit: int, param: str = "max_tokens") -> int:
    """The request's completion length: at least 1, at most `limit` (--max-tokens-limit or the context)."""
    if value is None:
        return min(default, limit)
    if value < 1:
        raise ApiError(400, f"{param} must be at least 1, got {value}", param=param)
    if value > limit:
        raise ApiError(400, f"{param} must be at most {limit} on this server, got {value}", param=param,
                       code="max_tokens_exceeded")
    return value


def encode(tokenizer, text: str, bos: bool = True) -> list[int]:
    """Prompt ids as `peakllm generate` makes them: no special tokens added by the tokenizer, then BOS
    in front when the tokenizer uses one and the text does not start with it already."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos_id = protocol_bos(tokenizer, bos)
    if ids and bos_id is not None and ids[0] != bos_id:
        ids = [bos_id] + ids
    return ids


def completion_prompt(tokenizer, req: CompletionRequest, vocab: int) -> list[int]:
    if req.echo or (req.best_of or 1) > 1:
        raise ApiError(400, "echo and best_of are not supported", param="echo" if req.echo else "best_of")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "one prompt per request (send several requests: they are batched)", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = encode(tokenizer, prompt)
    else:
        ids = list(prompt)
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"token ids must lie in [0, {vocab})", param="prompt")
    if not ids:
        raise ApiError(400, "the prompt is empty", param="prompt")
    return ids


def chat_prompt(tokenizer, req: ChatRequest) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
    if not req.messages:
        raise ApiError(400, "messages must not be empty", param="messages")
    messages = []
    for m in req.messages:
        content = m.content
        if isinstance(content, list):  # content parts: only text ones
            if any(part.get("type") != "text" for part in content):
                raise ApiError(400, "only text content parts are supported", param="messages")
            content = "".join(str(part.get("text", "")) for part in content)
        messages.append({"role": m.role, "content": content or ""})
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # noqa: BLE001 - a template may reject a role order; that is the client's input
        raise ApiError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
    return encode(tokenizer, text)


class TextOut:
    """Token ids in, text pieces out: EOS ids are not text, a piece ending in a partial UTF-8 character
    waits for the next token, and text that could be the start of a stop string is held back."""

    def __init__(self, tokenizer, eos: set[int], stops: list[str]):
        self.tokenizer, self.eos, self.stops = tokenizer, eos, stops
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token: int) -> tuple[str, bool]:
        """(new text to send, whether a stop string was reached)."""
        if token in self.eos:
            return "", False
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return "", False
        return self._update(text)

    def _update(self, text: str) -> tuple[str, bool]:
        self.text = text
        for stop in self.stops:
            at = text.find(stop)
            if at >= 0:
                self.text = text[:max(at, self.sent)]
                return self.flush(), True
        return self._take(len(text) - self.hold), False

    def finish(self) -> tuple[str, bool]:
        """(the rest of the text once the sequence ended, a trailing partial character included as
        `peakllm generate` prints it; whether a stop string turned up in it)."""
        piece, stopped = self._update(self.tokenizer.decode(self.ids, skip_special_tokens=True))
        return (piece, True) if stopped else (piece + self.flush(), False)

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def flush(self) -> str:
        return self._take(len(self.text))
