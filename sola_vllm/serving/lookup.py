"""Provenance lookups on the API server: which edit (if any) shaped a completion.

`GET /v1/sola/requests/{id}` takes the `id` of an OpenAI completion or chat completion
response (`cmpl-...`, `chatcmpl-...`) or a vLLM engine request id, asks the worker's
`RequestLog` (RPC `sola_provenance`) and answers

    {"id": ..., "edits": [edit ids that shaped it; [] = the base model answered],
     "requests": [{"engine_request_id", "edit" (null = none), "slot" (-1 = none),
                   "distance" (to the nearest active key; null when none was active),
                   "decided_at" (unix time), "finished"}, ...]}

one entry per engine request (several for several prompts or `n > 1`). The worker keeps the
last `request_log` routing decisions (`sola-vllm serve --request-log`, default 10,000): an
older or unknown id gets 404, and so does a request that has not reached its routing decision
yet (still queued or in prefill).
"""

from __future__ import annotations

import re

from .manager import EditManager, RequestError

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@+=~-]{0,255}")


def checked_request_id(request_id: object) -> str:
    if not isinstance(request_id, str) or not _ID_RE.fullmatch(request_id):
        raise RequestError(400, "invalid_id", f"request id {str(request_id)[:80]!r} is "
                           "invalid: use 1-256 characters from [A-Za-z0-9._:@+=~-], starting "
                           "with a letter or digit")
    return request_id


def provenance_view(request_id: str, records: list[dict]) -> dict:
    edits = sorted({r["edit"] for r in records if r["edit"] is not None})
    return {"id": request_id, "edits": edits, "requests": records}


async def provenance(manager: EditManager, request_id: object) -> dict:
    request_id = checked_request_id(request_id)
    records = await manager.rpc("sola_provenance", request_id)
    if not records:
        raise RequestError(404, "not_found", f"no routed request {request_id!r} among the "
                           f"last {manager.serving.request_log} routing decisions (unknown, "
                           "expired, or not yet past its prompt)")
    return provenance_view(request_id, records)
