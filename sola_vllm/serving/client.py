"""A small client of the edit API of `sola-vllm serve` (urllib only), for the CLI.

Every call takes `token`, the server's admin token (sent as `X-Sola-Admin-Token`; default
`$SOLA_ADMIN_TOKEN`). When the server also has vLLM's `--api-key`, which guards every `/v1`
path, these included, the key is read from `$VLLM_API_KEY` and sent as a Bearer token.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request

TRAIN_TIMEOUT = 900.0  # seconds: a JSON push trains the edit on the server
TIMEOUT = 120.0
TOKEN_HEADER = "X-Sola-Admin-Token"  # as `access.TOKEN_HEADER` (not imported: no fastapi here)


class ServerError(ValueError):
    """The server refused a request, or could not be reached; the message says why."""


def _url(server: str, path: str, query: dict | None = None) -> str:
    base = server if "://" in server else f"http://{server}"
    url = base.rstrip("/") + path
    query = {k: v for k, v in (query or {}).items() if v}
    return f"{url}?{urllib.parse.urlencode(query)}" if query else url


def _message(exc: urllib.error.HTTPError) -> str:
    raw = exc.read()
    try:
        return f"{json.loads(raw)['error']['message']} (HTTP {exc.code})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.code} {exc.reason}: {raw[:200].decode(errors='replace')}"


def _add_auth(req: urllib.request.Request, token: str | None) -> None:
    token = token or os.environ.get("SOLA_ADMIN_TOKEN")
    if token:
        req.add_header(TOKEN_HEADER, token)
    if os.environ.get("VLLM_API_KEY"):
        req.add_header("Authorization", f"Bearer {os.environ['VLLM_API_KEY']}")


def request(server: str, method: str, path: str, body: bytes | None = None,
            content_type: str | None = None, query: dict | None = None,
            timeout: float = TIMEOUT, token: str | None = None) -> dict:
    req = urllib.request.Request(_url(server, path, query), data=body, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    _add_auth(req, token)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as exc:
        raise ServerError(_message(exc)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ServerError(f"cannot reach the sola-vllm server at {server}: {reason}") from None


def _edit_path(edit_id: str) -> str:
    return "/v1/sola/edits/" + urllib.parse.quote(edit_id, safe="")


def push_artifact(server: str, blob: bytes, author: str = "", note: str = "",
                  state: str = "active", force: bool = False,
                  token: str | None = None) -> dict:
    return request(server, "POST", "/v1/sola/edits", blob, "application/octet-stream",
                   {"author": author, "note": note, "state": state,
                    "force": "true" if force else ""}, token=token)


def push_training(server: str, prompts: list[str], target: str, edit_id: str | None = None,
                  author: str = "", note: str = "", state: str = "active", force: bool = False,
                  probes: list[str] | None = None, token: str | None = None) -> dict:
    """Train an edit on the server, as its config says."""
    data = {"prompts": prompts, "target": target, "author": author, "note": note,
            "state": state, "force": force}
    if edit_id is not None:
        data["id"] = edit_id
    if probes:
        data["probes"] = probes
    return request(server, "POST", "/v1/sola/edits", json.dumps(data).encode(),
                   "application/json", timeout=TRAIN_TIMEOUT, token=token)


def check(server: str, prompts: list[str], probes: list[str] | None = None,
          edit_id: str | None = None, token: str | None = None) -> dict:
    """The server's pre-flight check of an edit with these prompts; nothing is added."""
    data: dict = {"prompts": prompts}
    if probes:
        data["probes"] = probes
    if edit_id is not None:
        data["id"] = edit_id
    return request(server, "POST", "/v1/sola/edits/check", json.dumps(data).encode(),
                   "application/json", token=token)


def transition(server: str, edit_id: str, op: str, author: str = "", note: str = "",
               token: str | None = None) -> dict:
    """A lifecycle step: revoke is DELETE /v1/sola/edits/{id}, the others POST .../{op}."""
    query = {"author": author, "note": note}
    if op == "revoke":
        return request(server, "DELETE", _edit_path(edit_id), query=query, token=token)
    return request(server, "POST", f"{_edit_path(edit_id)}/{op}", query=query, token=token)


def revoke(server: str, edit_id: str, token: str | None = None) -> dict:
    return transition(server, edit_id, "revoke", token=token)


def restore(server: str, edit_id: str, token: str | None = None) -> dict:
    return transition(server, edit_id, "restore", token=token)


def list_edits(server: str, token: str | None = None) -> dict:
    return request(server, "GET", "/v1/sola/edits", token=token)


def audit(server: str, limit: int, token: str | None = None) -> dict:
    return request(server, "GET", "/v1/sola/audit", query={"limit": str(limit)}, token=token)
