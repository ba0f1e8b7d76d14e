"""The guard in front of every `/v1/sola/` route: admin-token check and audit record.

A pure ASGI middleware, added by the endpoint plugin, so that it covers every route under the
prefix, those added later included, without any route having to call it. It reads the
`AccessConfig` and `AuditLog` that the plugin's `init_state` puts on `app.state`; until then
(or when that failed) the routes answer 503.

* Reads and changes both need the token: the listing reveals every edit's prompts and target.
* Every request with a changing method (POST, PUT, PATCH, DELETE), and every request refused
  for its token, gets one audit record after its answer: time, client address, authenticated,
  method, path, edit id, the author it declared, status and error type.

vLLM's own `--api-key` middleware (if set) runs before this one: it guards every `/v1` path,
these included, so a client then sends both `Authorization: Bearer KEY` and the admin token
(requests it refuses never get here, so they are not audited).
"""

from __future__ import annotations

import asyncio
import json
import logging
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .access import TOKEN_HEADER
from .audit import now

logger = logging.getLogger("vllm.sola_vllm")

PREFIX = "/v1/sola"
CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_PEEK = 64 * 1024  # bytes of a request / response body kept to find the author and edit id
_HEADER = TOKEN_HEADER.lower().encode()


def _guarded(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def _error_body(status: int, kind: str, message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": status}}).encode()


async def _answer(send: Send, status: int, kind: str, message: str) -> None:
    body = _error_body(status, kind, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _json_or_none(data: bytes) -> dict | None:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None


class _Exchange:
    """What the audit record needs from one request and its answer (bounded copies)."""

    def __init__(self, scope: Scope, receive: Receive, send: Send):
        self.scope, self._receive, self._send = scope, receive, send
        self.status, self.request, self.response = 500, b"", b""

    async def receive(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request" and len(self.request) < _PEEK:
            self.request += message.get("body", b"")[:_PEEK - len(self.request)]
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
        elif message["type"] == "http.response.body" and len(self.response) < _PEEK:
            self.response += message.get("body", b"")[:_PEEK - len(self.response)]
        await self._send(message)

    def details(self) -> dict:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        sent, answer = _json_or_none(self.request) or {}, _json_or_none(self.response) or {}
        edit = answer.get("edit") if isinstance(answer.get("edit"), dict) else {}
        error = answer.get("error") if isinstance(answer.get("error"), dict) else {}
        edit_id = (self.scope.get("path_params", {}).get("edit_id") or _text(edit.get("id"))
                   or _text(sent.get("id")))
        author = (query.get("author") or [None])[0] or _text(sent.get("author"))
        return {"edit_id": edit_id, "author": author or None, "status": self.status,
                "error": _text(error.get("type"))}


class SolaGuard:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if not _guarded(path):
            return await self.app(scope, receive, send)
        state = scope["app"].state
        access, audit = getattr(state, "sola_access", None), getattr(state, "sola_audit", None)
        if scope["type"] == "websocket":  # none today; a later one must not bypass the token
            if access is not None and access.allows(
                    [v for k, v in scope["headers"] if k == _HEADER]):
                return await self.app(scope, receive, send)
            return await send({"type": "websocket.close", "code": 1008})
        if access is None or audit is None:
            return await _answer(send, 503, "unavailable", "the sola-vllm edit API is not "
                                 "initialized (see the server log)")
        allowed = access.allows([v for k, v in scope["headers"] if k == _HEADER])
        auth = "refused" if not allowed else "open" if access.open else "token"
        record = {"time": now(), "client": self._client(scope), "method": scope["method"],
                  "path": path, "authenticated": auth == "token", "auth": auth}
        if not allowed:
            await _answer(send, 401, "unauthorized", f"missing or wrong {TOKEN_HEADER} "
                          "header: the edit API needs the server's admin token")
            await asyncio.to_thread(audit.append, {**record, "edit_id": None, "author": None,
                                                   "status": 401, "error": "unauthorized"})
            return None
        if scope["method"] not in CHANGING:
            return await self.app(scope, receive, send)
        exchange = _Exchange(scope, receive, send)
        try:
            await self.app(scope, exchange.receive, exchange.send)
        finally:  # an unhandled error is recorded as the 500 the client gets
            await asyncio.to_thread(audit.append, {**record, **exchange.details()})
        return None

    @staticmethod
    def _client(scope: Scope) -> str | None:
        client = scope.get("client")
        return f"{client[0]}:{client[1]}" if client else None
