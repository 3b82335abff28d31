"""The HTTP side: FastAPI routes in the OpenAI shape over an `Engine`.

Each request submits its prompt to the engine with a callback that hands the engine thread's events
to this request's asyncio queue. Streaming answers are server-sent events (`data: {...}` lines, then
`data: [DONE]`); a client that goes away cancels its sequence, which frees its KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import time
import traceback
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from peakllm.errors import PeakError
from peakllm.serve.engine import Engine, QueueFull
from peakllm.serve.guard import Guard
from peakllm.serve.logprobs import CompletionLogprobs, chat_logprobs
from peakllm.serve.protocol import (ApiError, ChatRequest, CompletionRequest, TextOut, chat_prompt, check_common,
                                    check_max_tokens, completion_prompt, top_logprobs)
from peakllm.serve.sequence import SamplingParams

DISCONNECT_POLL_S = 0.25


class _Stream:
    """One request's view of its sequence: submit, then iterate (text piece, finish reason or None)."""

    def __init__(self, engine: Engine, tokenizer, ids: list[int], params: SamplingParams, stops: list[str]):
        self.engine, self.queue = engine, asyncio.Queue()
        self.text = TextOut(tokenizer, engine.eos, stops)
        self.num_prompt, self.num_generated, self.done = len(ids), 0, False
        self.logprobs: list[tuple[int, float, list]] = []  # (token, logprob, top) not yet handed out
        self._pending = None
        loop = asyncio.get_running_loop()

        def emit(kind, value):  # called from the engine thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
            except RuntimeError:  # the event loop is gone (server shutting down)
                pass

        try:
            self.seq_id = engine.submit(ids, params, emit)
        except QueueFull as exc:
            raise ApiError(429, str(exc), code="queue_full", kind="rate_limit_error") from None
        except PeakError as exc:  # the prompt and max_tokens do not fit the context
            context = "context" in str(exc)
            raise ApiError(400, str(exc), param="max_tokens" if context else "prompt",
                           code="context_length_exceeded" if context else None) from None

    async def __aiter__(self):
        try:
            while True:
                kind, value = await self.queue.get()
                if kind == "logprobs":  # comes just before its token
                    self._pending = value
                    continue
                if kind == "token":
                    self.num_generated += 1
                    if self._pending is not None and value not in self.text.eos:
                        self.logprobs.append((value, *self._pending))
                    self._pending = None
                    piece, stopped = self.text.push(value)
                    if stopped:
                        self.close()  # the engine would go on generating
                        yield piece, "stop"
                        return
                    if piece:
                        yield piece, None
                elif kind == "done":
                    self.done = True
                    piece, stopped = self.text.finish()
                    yield piece, "stop" if stopped else value
                    return
                else:
                    self.done = True
                    raise ApiError(500, f"the engine failed on this request: {value}", kind="server_error")
        finally:
            self.close()

    def close(self) -> None:
        """Cancel the sequence unless it ended: the client went away, or the task was cancelled."""
        if not self.done:
            self.done = True
            self.engine.cancel(self.seq_id)

    def take_logprobs(self) -> list[tuple[int, float, list]]:
        out, self.logprobs = self.logprobs, []
        return out


def _usage(streams: list[_Stream]) -> dict:
    done = sum(s.num_generated for s in streams)
    prompt = streams[0].num_prompt
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


def _open(engine, tokenizer, ids, params: SamplingParams, stops, n: int) -> list[_Stream]:
    """n sequences for one request (choice i seeded with seed + i when the request has a seed)."""
    streams = []
    try:
        for i in range(n):
            seed = None if params.seed is None else params.seed + i
            streams.append(_Stream(engine, tokenizer, ids, SamplingParams(**{**vars(params), "seed": seed}), stops))
    except ApiError:
        for stream in streams:
            stream.close()
        raise
    return streams


async def _merged(streams: list[_Stream]):
    """(choice index, text piece, finish reason or None, its tokens' logprobs) from all the streams as they come."""
    if len(streams) == 1:
        async for piece, reason in streams[0]:
            yield 0, piece, reason, streams[0].take_logprobs()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for piece, reason in stream:
                await queue.put((i, piece, reason, stream.take_logprobs()))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()


async def _collect(streams: list[_Stream], request: Request) -> list[tuple[str, str, list]]:
    """All the text of a non-streamed answer (per choice: text, finish reason, logprobs); gives up (and cancels)
    if the client disconnects."""
    async def run():
        out = [([], None, []) for _ in streams]
        async for i, piece, reason, lps in _merged(streams):
            out[i][0].append(piece)
            out[i][2].extend(lps)
            out[i] = (out[i][0], reason, out[i][2])
        return [("".join(pieces), reason, lps) for pieces, reason, lps in out]

    task = asyncio.ensure_future(run())
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
    return task.result()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def build_app(engine: Engine, tokenizer, model_name: str, *, api_key: str | None = None,
              max_request_bytes: int | None = 1 << 20, max_tokens_limit: int | None = None, max_n: int = 8):
    """The ASGI app: the OpenAI routes behind the guard (API key, body size). `max_tokens_limit`: the most
    tokens one completion may ask for (default: the context)."""
    app = FastAPI(title="peakllm serve")
    created = int(time.time())
    vocab = engine.runner.model.lm_head.out_features
    context = engine.max_model_len
    token_limit = min(max_tokens_limit or context, context)

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or None
        if err.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = f"{where or 'body'}: {err.get('msg', 'invalid request')}"
        return JSONResponse(ApiError(400, message, param=where).body(), status_code=400)

    def check_model(name: str) -> None:
        if name != model_name:
            raise ApiError(404, f"the model '{name}' does not exist; this server serves '{model_name}'",
                           param="model", code="model_not_found")

    def open_streams(req, ids: list[int], requested: int | None, default: int, param: str, prompt_param: str):
        stops = check_common(req, max_n)
        k = top_logprobs(req)
        if len(ids) >= context:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this server's context is {context} tokens, "
                           "with room for at least one more", param=prompt_param, code="context_length_exceeded")
        max_tokens = check_max_tokens(requested, default, token_limit, param)
        params = SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                                stop_at_eos=not req.ignore_eos, top_k=max(req.top_k, 0), logprobs=k,
                                presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty)
        return _open(engine, tokenizer, ids, params, stops, req.n)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "peakllm", "max_model_len": context}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(engine.gauges()), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        ids = completion_prompt(tokenizer, req, vocab)
        streams = open_streams(req, ids, req.max_tokens, 16, "max_tokens", "prompt")
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        logs = [CompletionLogprobs(tokenizer) for _ in streams] if req.logprobs is not None else None

        def choice(i, text, reason, lps):
            return {"index": i, "text": text, "finish_reason": reason, "logprobs": logs[i].add(lps) if logs else None}

        if not req.stream:
            done = await _collect(streams, request)
            return {**head, "choices": [choice(i, *c) for i, c in enumerate(done)], "usage": _usage(streams)}
        return _sse_response(streams, head, lambda i, piece, reason, lps: [choice(i, piece, reason, lps)], None, req)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        ids = chat_prompt(tokenizer, req)
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        streams = open_streams(req, ids, requested, max(1, context - len(ids)), param, "messages")
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        logs = (lambda lps: chat_logprobs(tokenizer, lps)) if req.logprobs else (lambda lps: None)
        if not req.stream:
            done = await _collect(streams, request)
            return {**head, "object": "chat.completion", "usage": _usage(streams),
                    "choices": [{"index": i, "message": {"role": "assistant", "content": text},
                                 "finish_reason": reason, "logprobs": logs(lps)}
                                for i, (text, reason, lps) in enumerate(done)]}

        def choices(i, piece, reason, lps):
            delta = {"content": piece} if piece or reason is None else {}
            return [{"index": i, "delta": delta, "finish_reason": reason, "logprobs": logs(lps)}]

        first = [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                 for i in range(len(streams))]
        return _sse_response(streams, {**head, "object": "chat.completion.chunk"}, choices, first, req)

    return Guard(app, api_key=api_key, max_request_bytes=max_request_bytes)


def _sse_response(streams: list[_Stream], head: dict, choices, first, req) -> StreamingResponse:
    include_usage = bool((req.stream_options or {}).get("include_usage"))

    async def events():
        if first is not None:
            yield _sse({**head, "choices": first})
        try:
            async for i, piece, reason, lps in _merged(streams):
                yield _sse({**head, "choices": choices(i, piece, reason, lps)})
        except ApiError as exc:  # the status line is sent already: the error goes in the stream
            yield _sse(exc.body())
        except Exception as exc:  # noqa: BLE001 - a fault on this side: an error event, not a cut connection
            traceback.print_exc()
            yield _sse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").body())
        if include_usage:
            yield _sse({**head, "choices": [], "usage": _usage(streams)})
        yield "data: [DONE]\n\n"

    return _EventStream(streams, events())


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their sequences however the response ends, also when the client is
    gone before the first event (then the event generator never starts, so its own cleanup never runs)."""

    def __init__(self, streams: list[_Stream], events):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            for stream in self.streams:
                stream.close()
