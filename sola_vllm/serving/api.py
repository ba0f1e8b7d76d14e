"""HTTP API for edits on vLLM's OpenAI-compatible server: a vLLM endpoint plugin.

Entry point `vllm.endpoint_plugins: sola_api`; vLLM loads it only when `VLLM_PLUGINS` names it
(`sola-vllm serve` sets `VLLM_PLUGINS=sola,sola_api`). Routes:

    POST   /v1/sola/edits                 push an edit: the artifact's bytes (application/
                                          octet-stream; `?author=&note=` for the journal,
                                          `?state=staged|canary|active`, `?force=true`), or
                                          JSON {"prompts": [...], "target": "...", "id"?,
                                          "note"?, "author"?, "state"?, "force"?, "probes"?}
                                          trained here -> 201, with the pre-flight "check"
                                          (with chat forms when the config's
                                          train.chat_form says so)
    POST   /v1/sola/edits/check           pre-flight check without adding: JSON {"prompts":
                                          [...], "probes"?: [...], "id"?} -> the report
    GET    /v1/sola/edits                 every edit of the store, its serving state, stats
    GET    /v1/sola/edits/{id}            one edit, its journal history, its serving state
    DELETE /v1/sola/edits/{id}            revoke: the exact base model again for new requests
    POST   /v1/sola/edits/{id}/restore    route to a revoked edit again
    POST   /v1/sola/edits/{id}/stage      stored, not routed
    POST   /v1/sola/edits/{id}/canary     routed only for requests that opt in with
                                          `"vllm_xargs": {"sola_canary": true}`
    POST   /v1/sola/edits/{id}/promote    routed for every request (active)
    GET    /v1/sola/requests/{id}         which edit (if any) shaped a completion: `id` as
                                          the client saw it (cmpl-..., chatcmpl-...); see
                                          `lookup.py`

Transitions take `?author=&note=` for the journal. With `X-Sola-Provenance: 1`, a non-streaming
completion answers with `X-Sola-Edit: <edit id(s)>` or `X-Sola-Edit: -1` (`edit_header.py`).
vLLM's `/metrics` also carries the sola_* series (hits per edit, routed vs not; `metrics.py`).

Errors are JSON `{"error": {"message", "type", "code"}}`: 400 malformed JSON or invalid id,
401 missing or wrong admin token, 404 unknown id, 409 duplicate id, a transition the edit's
state does not allow (the message names the state), or a key collision with a routed edit
(type "edit_collision"; the error's "check" names the other edit, the distance and the
prompts; `force` adds it anyway), 413 body too large, 415 other content types, 422 invalid
artifact (shapes, dtypes, NaN/Inf), an edit for another base model or layer set, rank or
capacity exceeded, 503 a read-only store, 507 a full disk (nothing is changed then). The store
(the source of truth) is written before a change is acknowledged; see `manager.EditManager`.

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
from ..journal import INITIAL_STATES
from ..preflight import parse_probe_prompts
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
_JSON_FIELDS = {"prompts", "target", "id", "note", "author", "state", "force", "probes"}
_CHECK_FIELDS = {"prompts", "probes", "id"}


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
    error = {"message": exc.message, "type": exc.kind, "code": exc.status}
    if exc.detail is not None:
        error["check"] = exc.detail
    return _json({"error": error}, exc.status)


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


def _json_object(body: bytes, fields: set[str]) -> dict:
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, "invalid_json", f"malformed JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RequestError(422, "invalid_request", "the body must be a JSON object")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise RequestError(422, "invalid_request", f"unknown field(s) {unknown}; expected "
                           f"{sorted(fields)}")
    return data


def _prompts(data: dict) -> list[str]:
    prompts = data.get("prompts")
    prompts = [prompts] if isinstance(prompts, str) else prompts
    if not (isinstance(prompts, list) and prompts
            and all(isinstance(p, str) and p.strip() for p in prompts)):
        raise RequestError(422, "invalid_request", "'prompts' must be a non-empty list of "
                           "non-empty strings")
    return prompts


def _probes(data: dict) -> list[str] | None:
    if data.get("probes") is None:
        return None
    try:
        return parse_probe_prompts(data["probes"], "'probes'")
    except ValueError as exc:
        raise RequestError(422, "invalid_request", str(exc)) from None


def add_options(state: object = None, force: object = None) -> dict:
    """The initial state (default active) and `force`, from JSON or the query string."""
    state = "active" if state is None else state
    if state not in INITIAL_STATES:
        raise RequestError(422, "invalid_request", f"'state' must be one of "
                           f"{list(INITIAL_STATES)}, got {state!r}")
    flags = {None: False, False: False, True: True, "": False, "false": False, "0": False,
             "true": True, "1": True}
    if not isinstance(force, bool | str | None) or force not in flags:
        raise RequestError(422, "invalid_request", f"'force' must be true or false, got "
                           f"{force!r}")
    return {"state": state, "force": flags[force]}


def parse_check_request(body: bytes) -> dict:
    """{"prompts": [str, ...] | str, "probes"?: [str, ...], "id"?} -> `EditManager.check`."""
    data = _json_object(body, _CHECK_FIELDS)
    edit_id = data.get("id")
    return {"prompts": _prompts(data), "probes": _probes(data),
            "name": "new edit" if edit_id is None else checked_id(edit_id)}


def parse_train_request(body: bytes) -> dict:
    """{"prompts": [str, ...] | str, "target": str, "id"?, "note"?, "author"?, "state"?,
    "force"?, "probes"?} -> kwargs (the last three under "add")."""
    data = _json_object(body, _JSON_FIELDS)
    prompts = _prompts(data)
    target = data.get("target")
    if not isinstance(target, str) or not target.strip():
        raise RequestError(422, "invalid_request", "'target' must be a non-empty string")
    edit_id = data.get("id")
    return {"prompts": prompts, "target": target,
            "edit_id": None if edit_id is None else checked_id(edit_id),
            "author": _text(data, "author"), "note": _text(data, "note"),
            "add": {**add_options(data.get("state"), data.get("force")),
                    "probes": _probes(data)}}


# --- routes -------------------------------------------------------------------------------------
async def _push(request: Request) -> dict:
    manager = _manager(request)
    body = await read_body(request, manager.settings.max_body_bytes)
    kind = request.headers.get("content-type", "application/octet-stream").split(";")[0]
    if kind.strip().lower() in ("application/json", "text/json"):
        train = parse_train_request(body)
        options = train.pop("add")
        edit = await manager.train(**train)
        return await manager.add(edit, author=train["author"], note=train["note"], **options)
    if kind.strip().lower() != "application/octet-stream":
        raise RequestError(415, "unsupported_media_type", f"Content-Type {kind!r}: send "
                           "application/octet-stream (an edit artifact) or application/json")
    params = request.query_params
    options = add_options(params.get("state"), params.get("force"))
    edit = parse_artifact(body)
    return await manager.add(edit, author=params.get("author", ""), note=params.get("note", ""),
                             **options)


@router.post("/v1/sola/edits")
async def push_edit(request: Request) -> Response:
    return await _reply(_push(request), status=201)


@router.post("/v1/sola/edits/check")
async def check_edit(request: Request) -> Response:
    async def work() -> dict:
        manager = _manager(request)
        body = await read_body(request, manager.settings.max_body_bytes)
        return await manager.check(**parse_check_request(body))

    return await _reply(work())


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


async def _transition(edit_id: str, op: str, request: Request) -> Response:
    async def work() -> dict:  # _manager may refuse: inside the work, so _reply answers it
        params = request.query_params
        return await _manager(request).transition(edit_id, op, params.get("author", ""),
                                                  params.get("note", ""))

    return await _reply(work())


@router.delete("/v1/sola/edits/{edit_id}")
async def revoke_edit(edit_id: str, request: Request) -> Response:
    return await _transition(edit_id, "revoke", request)


@router.post("/v1/sola/edits/{edit_id}/restore")
async def restore_edit(edit_id: str, request: Request) -> Response:
    return await _transition(edit_id, "restore", request)


@router.post("/v1/sola/edits/{edit_id}/{op}")
async def transition_edit(edit_id: str, op: str, request: Request) -> Response:
    """stage / canary / promote (any other step name is a 404 naming the steps)."""
    return await _transition(edit_id, op, request)


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
