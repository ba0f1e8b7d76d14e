"""HTTP API for edits on vLLM's OpenAI-compatible server: a vLLM endpoint plugin.

Entry point `vllm.endpoint_plugins: sola_api`; vLLM loads it only when `VLLM_PLUGINS` names it
(`sola-vllm serve` sets `VLLM_PLUGINS=sola,sola_api`). Routes:

    POST   /v1/sola/edits                 push an edit: the artifact's bytes (application/
                                          octet-stream; `?author=&note=` for the journal), or
                                          JSON {"prompts": [...], "target": "...", "id"?,
                                          "note"?, "author"?} trained here -> 201
    GET    /v1/sola/edits                 every edit of the store, its serving state, stats
    GET    /v1/sola/edits/{id}            one edit, its journal history, its serving state
    DELETE /v1/sola/edits/{id}            revoke: the exact base model again for new requests
    POST   /v1/sola/edits/{id}/restore    route to a revoked edit again
    GET    /v1/sola/requests/{id}         which edit (if any) shaped a completion: `id` as
                                          the client saw it (cmpl-..., chatcmpl-...); see
                                          `lookup.py`

With `X-Sola-Provenance: 1`, a non-streaming completion answers with `X-Sola-Edit: <edit id(s)>`
or `X-Sola-Edit: -1` (`edit_header.py`). vLLM's `/metrics` also carries the sola_* series
(hits per edit, routed vs not; `metrics.py`).

Errors are JSON `{"error": {"message", "type", "code"}}`: 400 malformed JSON or invalid id,
401 missing or wrong admin token, 404 unknown id, 409 duplicate id or already revoked /
active, 413 body too large, 415 other
content types, 422 invalid artifact (shapes, dtypes, NaN/Inf), an edit for another base model
or layer set, rank or capacity exceeded, 503 a read-only store, 507 a full disk (nothing is
changed then). The store (the source of truth) is written before a change is acknowledged;
see `manager.EditManager`.

Every route under /v1/sola/ goes through `guard.SolaGuard`: with an admin token configured
(`SOLA_ADMIN_TOKEN`) each request must carry it in `X-Sola-Admin-Token` (else 401); without
one the plugin refuses to start unless the server listens on loopback (`access`). Every change
attempt, refused or not, is recorded in the audit log (`audit`), which
`GET /v1/sola/audit?limit=N` reads (the last N records, default 100).

Settings come from the environment, set by `sola-vllm serve`:

    SOLA_VLLM_STORE           edit store directory (required)
    SOLA_VLLM_MODEL           model folder for server-side training (default: vLLM's --model)
    SOLA_VLLM_CONFIG          SolaConfig as JSON ({"edit", "router", "train"}; default: defaults)
    SOLA_ADMIN_TOKEN          the admin token of the /v1/sola/ routes (none: loopback only)
    SOLA_VLLM_AUDIT_LOG       the audit log (default: STORE/audit.jsonl)
    SOLA_VLLM_MAX_BODY_BYTES  largest accepted request body (default 64 MiB)
    SOLA_VLLM_METRICS_INTERVAL  seconds between the snapshots behind the sola_* series of
                              /metrics (default 1; `metrics.py`)

The serving options (layers, fingerprints, capacity) are read from the engine's own
`hf_overrides["sola"]`. At start-up (`init_state`, which vLLM awaits before it accepts
requests) every active edit of the store is loaded and routed; revoked edits stay in the store
and are loaded when restored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response

from ..edit import Edit, EditFormatError
from . import guard
from .access import AccessConfig
from .audit import MAX_TAIL, AuditLog, audit_path
from .config import ServingConfig
from .edit_header import EditHeaderMiddleware
from .lookup import provenance
from .manager import EditManager, RequestError, Settings, checked_id
from .metrics import install_metrics

logger = logging.getLogger("vllm.sola_vllm")  # under vLLM's logger: its handlers and format
router = APIRouter()
_JSON_FIELDS = {"prompts", "target", "id", "note", "author"}


# --- responses ----------------------------------------------------------------------------------
def _finite(value: Any) -> Any:
    """JSON cannot carry NaN/Inf (e.g. in an artifact's free-form train_info): send null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json(content: Any, status: int = 200) -> Response:
    body = json.dumps(_finite(content), default=str, allow_nan=False)
    return Response(body, status_code=status, media_type="application/json")


def _error(exc: RequestError) -> Response:
    return _json({"error": {"message": exc.message, "type": exc.kind, "code": exc.status}},
                 exc.status)


async def _reply(work, status: int = 200) -> Response:
    try:
        return _json(await work, status)
    except RequestError as exc:
        if exc.status >= 500:
            logger.error("sola-vllm: %s", exc.message)
        return _error(exc)


def _manager(request: Request) -> EditManager:
    manager = getattr(request.app.state, "sola_edits", None)
    if manager is None:
        raise RequestError(503, "unavailable", "the sola-vllm edit API is not initialized "
                           "(see the server log)")
    return manager


# --- request bodies -----------------------------------------------------------------------------
async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (by Content-Length or by what arrives)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise RequestError(400, "invalid_request", f"bad Content-Length {declared!r}")
        if int(declared) > limit:
            raise RequestError(413, "body_too_large", f"request body of {declared} bytes is "
                               f"over the limit of {limit} bytes (SOLA_VLLM_MAX_BODY_BYTES)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, "body_too_large", f"request body is over the limit of "
                               f"{limit} bytes (SOLA_VLLM_MAX_BODY_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_artifact(body: bytes) -> Edit:
    if not body:
        raise RequestError(400, "invalid_request", "empty body: send an edit artifact or JSON")
    try:
        return Edit.from_bytes(body)
    except EditFormatError as exc:
        raise RequestError(422, "invalid_edit", str(exc)) from exc
    except Exception as exc:  # whatever else a crafted header triggers is still bad input
        raise RequestError(422, "invalid_edit", f"malformed edit artifact: {exc}") from exc


def _text(data: dict, name: str) -> str:
    value = data.get(name, "")
    if not isinstance(value, str):
        raise RequestError(422, "invalid_request", f"{name!r} must be a string")
    return value


def parse_train_request(body: bytes) -> dict:
    """{"prompts": [str, ...] | str, "target": str, "id"?, "note"?, "author"?} -> kwargs."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"malformed JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RequestError(422, "invalid_request", "the body must be a JSON object")
    unknown = sorted(set(data) - _JSON_FIELDS)
    if unknown:
        raise RequestError(422, "invalid_request", f"unknown field(s) {unknown}; expected "
                           f"{sorted(_JSON_FIELDS)}")
    prompts = data.get("prompts")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not (isinstance(prompts, list) and prompts
            and all(isinstance(p, str) and p.strip() for p in prompts)):
        raise RequestError(422, "invalid_request", "'prompts' must be a non-empty list of "
                           "non-empty strings")
    target = data.get("target")
    if not isinstance(target, str) or not target.strip():
        raise RequestError(422, "invalid_request", "'target' must be a non-empty string")
    edit_id = data.get("id")
    return {"prompts": prompts, "target": target,
            "edit_id": None if edit_id is None else checked_id(edit_id),
            "author": _text(data, "author"), "note": _text(data, "note")}


# --- routes -------------------------------------------------------------------------------------
async def _push(request: Request) -> dict:
    manager = _manager(request)
    body = await read_body(request, manager.settings.max_body_bytes)
    kind = request.headers.get("content-type", "application/octet-stream").split(";")[0]
    if kind.strip().lower() in ("application/json", "text/json"):
        train = parse_train_request(body)
        edit = await manager.train(**train)
        return await manager.add(edit, author=train["author"], note=train["note"])
    if kind.strip().lower() != "application/octet-stream":
        raise RequestError(415, "unsupported_media_type", f"Content-Type {kind!r}: send "
                           "application/octet-stream (an edit artifact) or application/json")
    edit = parse_artifact(body)
    params = request.query_params
    return await manager.add(edit, author=params.get("author", ""), note=params.get("note", ""))


@router.post("/v1/sola/edits")
async def push_edit(request: Request) -> Response:
    return await _reply(_push(request), status=201)


@router.get("/v1/sola/edits")
async def list_edits(request: Request) -> Response:
    async def work() -> dict:
        return await _manager(request).list()

    return await _reply(work())


@router.get("/v1/sola/audit")
async def read_audit(request: Request) -> Response:
    async def work() -> dict:
        raw = request.query_params.get("limit", "100")
        if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= MAX_TAIL:
            raise RequestError(400, "invalid_request", f"limit must be a whole number "
                               f"1..{MAX_TAIL}, got {raw[:40]!r}")
        audit = getattr(request.app.state, "sola_audit", None)
        return await asyncio.to_thread(audit.tail, int(raw))

    return await _reply(work())


@router.get("/v1/sola/edits/{edit_id}")
async def get_edit(edit_id: str, request: Request) -> Response:
    async def work() -> dict:
        return await _manager(request).describe(edit_id)

    return await _reply(work())


async def _set_state(edit_id: str, request: Request, active: bool) -> Response:
    async def work() -> dict:  # _manager may refuse: inside the work, so _reply answers it
        params = request.query_params
        return await _manager(request).set_state(edit_id, active, params.get("author", ""),
                                                 params.get("note", ""))

    return await _reply(work())


@router.delete("/v1/sola/edits/{edit_id}")
async def revoke_edit(edit_id: str, request: Request) -> Response:
    return await _set_state(edit_id, request, active=False)


@router.post("/v1/sola/edits/{edit_id}/restore")
async def restore_edit(edit_id: str, request: Request) -> Response:
    return await _set_state(edit_id, request, active=True)


@router.get("/v1/sola/requests/{request_id}")
async def get_request(request_id: str, request: Request) -> Response:
    async def work() -> dict:
        return await provenance(_manager(request), request_id)

    return await _reply(work())


# --- the plugin ---------------------------------------------------------------------------------
def init_access(state, args) -> AccessConfig:
    """The admin token and the loopback rule, checked before anything else starts."""
    state.sola_access = AccessConfig.from_env(host=getattr(args, "host", None),
                                              unix_socket=bool(getattr(args, "uds", None)))
    return state.sola_access


class SolaEndpointPlugin:
    """Zero-argument factory of the `vllm.endpoint_plugins` entry point `sola_api`."""

    name = "sola_api"
    required_tasks = ("generate",)

    def attach_router(self, app: FastAPI) -> None:
        app.add_middleware(guard.SolaGuard)  # token check and audit for every /v1/sola/ route
        app.include_router(router)
        app.add_middleware(EditHeaderMiddleware)  # opt-in X-Sola-Edit on completions

    async def init_state(self, engine_client, state, args) -> None:
        access = init_access(state, args)
        if engine_client is None:  # vLLM's render-only server has no engine
            return
        sola = getattr(engine_client.model_config.hf_config, "sola", None)
        if sola is None:
            raise ValueError("the sola_api endpoint plugin needs a model built with the "
                             "sola-vllm plugin: start the server with `sola-vllm serve`")
        serving = ServingConfig.from_dict(dict(sola))
        settings = Settings.from_env(default_model=getattr(args, "model", None))
        state.sola_audit = AuditLog(audit_path(settings.store))  # or SOLA_VLLM_AUDIT_LOG
        logger.info("sola-vllm: edit API %s; audit log %s", "without an admin token: loopback "
                    "only" if access.open else "requires the admin token", state.sola_audit.path)
        manager = EditManager(engine_client, serving, settings)
        await manager.load_store()
        state.sola_edits = manager
        state.sola_metrics = install_metrics(manager.rpc)  # sola_* series on /metrics
        logger.info("sola-vllm: edit API on /v1/sola/edits (store %s, up to %d edits, "
                    "%d keys)", settings.store, serving.max_edits, serving.max_keys)
