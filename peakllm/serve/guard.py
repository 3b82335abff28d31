"""The server's front gate, as plain ASGI middleware: a bearer API key on every path but /health (401 in OpenAI's
error shape without it, as vLLM and llama-server answer), and a cap on the request body's size (413)."""

from __future__ import annotations

import hmac
import json

OPEN_PATHS = {"/health"}


async def _send_error(send, status: int, message: str, kind: str, code: str, headers=()) -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    def __init__(self, app, *, api_key: str | None = None, max_request_bytes: int | None = None):
        self.app, self.max_bytes = app, max_request_bytes
        self.key = api_key.encode() if api_key else None

    def _authorized(self, scope) -> bool:
        if self.key is None or scope["path"] in OPEN_PATHS:
            return True
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)
        return False

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if not self._authorized(scope):
            return await _send_error(send, 401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                                     "authentication_error", "invalid_api_key",
                                     [(b"www-authenticate", b"Bearer")])
        if self.max_bytes is None:
            return await self.app(scope, receive, send)
        limit = self.max_bytes
        too_large = f"the request body is larger than this server's limit of {limit} bytes (--max-request-bytes)"
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return await _send_error(send, 413, too_large, "invalid_request_error", "request_too_large")
        chunks, seen = [], 0  # a chunked body has no content-length: read it all (up to the limit) first
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > limit:
                return await _send_error(send, 413, too_large, "invalid_request_error", "request_too_large")
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then http.disconnect, which the app polls for

        await self.app(scope, replay, send)
