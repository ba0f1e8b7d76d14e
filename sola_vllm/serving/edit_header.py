"""Opt-in `X-Sola-Edit` response header: the edit(s) that shaped a completion, `-1` for none.

A client that sends `X-Sola-Provenance: 1` with a non-streaming POST /v1/completions or
/v1/chat/completions gets `X-Sola-Edit: rome` (several edits comma-separated, when prompts of
one request routed differently) or `X-Sola-Edit: -1`. It is an ASGI middleware, not a patch of
vLLM: it holds back the response, reads its `id` and asks the worker's request log (the same
lookup as GET /v1/sola/requests/{id}), so it costs one RPC per such request, and nothing for
requests without the header. Streaming responses send their headers before any token (and so
before the routing decision): they pass unchanged; look up the `id` of their first chunk.
"""

from __future__ import annotations

import json
import logging

from .lookup import provenance
from .manager import RequestError

logger = logging.getLogger("vllm.sola_vllm")
OPT_IN = b"x-sola-provenance"
HEADER = b"x-sola-edit"
PATHS = ("/v1/completions", "/v1/chat/completions")
NO_EDIT = "-1"


def _wants_header(scope) -> bool:
    if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in PATHS:
        return False
    value = dict(scope["headers"]).get(OPT_IN, b"").strip().lower()
    return value in (b"1", b"true", b"yes")


def header_value(edit_ids: list[str]) -> str:
    return ",".join(edit_ids) if edit_ids else NO_EDIT


class EditHeaderMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if not _wants_header(scope):
            return await self.app(scope, receive, send)
        start: dict | None = None
        passthrough = False
        chunks: list[bytes] = []

        async def hold(message):
            nonlocal start, passthrough
            if message["type"] == "http.response.start":
                passthrough = not _is_json(message)  # streaming or an error: unchanged
                if passthrough:
                    return await send(message)
                start = message
                return None
            if passthrough or start is None or message["type"] != "http.response.body":
                return await send(message)
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                await _send_with_header(scope, start, b"".join(chunks), send)
            return None

        await self.app(scope, receive, hold)


async def _send_with_header(scope, start: dict, body: bytes, send) -> None:
    value = await _edits_of(scope, body)
    if value is not None:
        start = {**start, "headers": [*start.get("headers", []),
                                      (HEADER, value.encode("latin-1"))]}
    await send(start)
    await send({"type": "http.response.body", "body": body, "more_body": False})


def _is_json(start: dict) -> bool:
    headers = dict(start.get("headers", []))
    return (start.get("status") == 200
            and headers.get(b"content-type", b"").startswith(b"application/json"))


async def _edits_of(scope, body: bytes) -> str | None:
    """The header's value, or None (no header) when it cannot be known."""
    manager = getattr(scope["app"].state, "sola_edits", None)
    try:
        response_id = json.loads(body)["id"]
    except (ValueError, KeyError, TypeError):
        return None
    if manager is None:
        return None
    try:
        return header_value((await provenance(manager, response_id))["edits"])
    except RequestError as exc:  # e.g. already dropped from a very small request log
        logger.warning("sola-vllm: no X-Sola-Edit for %s: %s", response_id, exc.message)
        return None
