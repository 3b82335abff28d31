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
from peakllm.serve.protocol import (ApiError, ChatRequest, CompletionRequest, TextOut, chat_prompt, check_common,
                                    check_max_tokens, completion_prompt)
from peakllm.serve.sequence import SamplingParams

DISCONNECT_POLL_S = 0.25


class _Stream:
    """One request's view of its sequence: submit, then iterate (text piece, finish reason or None)."""

    def __init__(self, engine: Engine, tokenizer, ids: list[int], params: SamplingParams, stops: list[str]):
        self.engine, self.queue = engine, asyncio.Queue()
        self.text = TextOut(tokenizer, engine.eos, stops)
        self.num_prompt, self.num_generated, self.done = len(ids), 0, False
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
                if kind == "token":
                    self.num_generated += 1
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

    def usage(self) -> dict:
        return {"prompt_tokens": self.num_prompt, "completion_tokens": self.num_generated,
                "total_tokens": self.num_prompt + self.num_generated}


async def _collect(stream: _Stream, request: Request) -> tuple[str, str]:
    """All the text of a non-streamed answer; gives up (and cancels) if the client disconnects."""
    async def run():
        pieces, reason = [], None
        async for piece, reason in stream:
            pieces.append(piece)
        return "".join(pieces), reason

    task = asyncio.ensure_future(run())
    while not task.done():
        await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if not task.done() and await request.is_disconnected():
            task.cancel()
    return task.result()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def build_app(engine: Engine, tokenizer, model_name: str) -> FastAPI:
    app = FastAPI(title="peakllm serve")
    created = int(time.time())
    vocab = engine.runner.model.lm_head.out_features

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

    def params_for(req, max_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                              stop_at_eos=not req.ignore_eos)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "peakllm", "max_model_len": engine.max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.metrics.render(engine.gauges()), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_model(req.model)
        stops = check_common(req)
        ids = completion_prompt(tokenizer, req, vocab)
        stream = _Stream(engine, tokenizer, ids, params_for(req, check_max_tokens(req.max_tokens, 16)), stops)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}

        def choice(text, reason):
            return {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}

        if not req.stream:
            text, reason = await _collect(stream, request)
            return {**head, "choices": [choice(text, reason)], "usage": stream.usage()}
        return _sse_response(stream, head, lambda piece, reason: [choice(piece, reason)], None, req)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        check_model(req.model)
        stops = check_common(req)
        ids = chat_prompt(tokenizer, req)
        default = max(1, engine.max_model_len - len(ids))
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        stream = _Stream(engine, tokenizer, ids, params_for(req, check_max_tokens(limit, default)), stops)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_name}
        if not req.stream:
            text, reason = await _collect(stream, request)
            message = {"role": "assistant", "content": text}
            return {**head, "object": "chat.completion", "usage": stream.usage(),
                    "choices": [{"index": 0, "message": message, "finish_reason": reason, "logprobs": None}]}

        def choices(piece, reason):
            delta = {"content": piece} if piece or reason is None else {}
            return [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]

        first = [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
        return _sse_response(stream, {**head, "object": "chat.completion.chunk"}, choices, first, req)

    return app


def _sse_response(stream: _Stream, head: dict, choices, first, req) -> StreamingResponse:
    include_usage = bool((req.stream_options or {}).get("include_usage"))

    async def events():
        if first is not None:
            yield _sse({**head, "choices": first})
        try:
            async for piece, reason in stream:
                yield _sse({**head, "choices": choices(piece, reason)})
        except ApiError as exc:  # the status line is sent already: the error goes in the stream
            yield _sse(exc.body())
        except Exception as exc:  # noqa: BLE001 - a fault on this side: an error event, not a cut connection
            traceback.print_exc()
            yield _sse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").body())
        if include_usage:
            yield _sse({**head, "choices": [], "usage": stream.usage()})
        yield "data: [DONE]\n\n"

    return _EventStream(stream, events())


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their sequence however the response ends, also when the client is
    gone before the first event (then the event generator never starts, so its own cleanup never runs)."""

    def __init__(self, stream: _Stream, events):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.stream.close()
