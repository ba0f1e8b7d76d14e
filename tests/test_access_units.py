"""Access control and audit of the edit API without a model: the token and loopback rule, the
guard middleware on a bare FastAPI app, the audit log file, full / read-only disk errors."""

import asyncio
import errno
import json
import os
import stat
from argparse import Namespace

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.testclient import TestClient
from helpers import make_synthetic_edit

from sola_vllm import fsutil
from sola_vllm.serving.access import ADMIN_TOKEN_ENV, AccessConfig, is_loopback
from sola_vllm.serving.api import SolaEndpointPlugin, router
from sola_vllm.serving.audit import AuditLog
from sola_vllm.serving.manager import _store_error
from sola_vllm.store import EditStore, StoreError

TOKEN = "t0ken-for-the-tests-0123456789"


# --- the token and the loopback rule --------------------------------------------------------------
@pytest.mark.parametrize("host,loopback", [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("LOCALHOST", True), ("0.0.0.0", False), ("::", False),
    ("10.0.0.1", False), ("example.com", False), ("", False), (None, False)])
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback
    if loopback:
        assert AccessConfig(None, host).open
    else:
        with pytest.raises(ValueError, match="without an admin token"):
            AccessConfig(None, host)
    assert not AccessConfig(TOKEN, host).open  # with a token any host is fine


def test_unix_socket_without_token_is_allowed():
    assert AccessConfig(None, "0.0.0.0", unix_socket=True).open


@pytest.mark.parametrize("bad", ["short", "x" * 1025, "has a space-0123456789",
                                 "tab\tinside-0123456789", "ünïcode-0123456789abc"])
def test_bad_tokens_are_refused_without_showing_them(bad):
    with pytest.raises(ValueError) as info:
        AccessConfig(bad, "127.0.0.1")
    assert bad not in str(info.value)


def test_token_check():
    access = AccessConfig(TOKEN, "0.0.0.0")
    assert access.allows([TOKEN.encode()])
    assert not access.allows([])
    assert not access.allows([TOKEN.encode() + b"x"])
    assert not access.allows([TOKEN[:-1].encode()])
    assert not access.allows([TOKEN.encode(), TOKEN.encode()])  # ambiguous: refused
    assert not access.allows([b"\xff" * 40])
    assert TOKEN not in repr(access) and TOKEN not in str(access)


def test_plugin_refuses_an_open_api_on_a_public_host(monkeypatch):
    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    state = Namespace()
    # the access check comes first: the engine (here: nothing usable) is never touched
    with pytest.raises(ValueError, match="without an admin token"):
        asyncio.run(SolaEndpointPlugin().init_state(object(), state, Namespace(host="0.0.0.0")))
    with pytest.raises(ValueError, match="without an admin token"):
        asyncio.run(SolaEndpointPlugin().init_state(object(), state, Namespace(host=None)))


def test_serve_refuses_a_public_host_without_token(tmp_path, monkeypatch):
    from sola_vllm.cli import build_parser
    from sola_vllm.cli import main as cli_main
    from sola_vllm.serving.serve import prepare

    monkeypatch.delenv(ADMIN_TOKEN_ENV, raising=False)
    store = str(tmp_path / "s")
    parse = build_parser().parse_known_args
    for host in ("0.0.0.0", "::", "192.168.1.20", "myhost.example"):
        args, extra = parse(["serve", "--store", store, "--host", host])
        with pytest.raises(ValueError, match="without an admin token"):
            prepare(args, extra)
        assert cli_main(["serve", "--store", store, "--host", host]) == 2
    assert not (tmp_path / "s").exists()  # refused before anything was made

    args, extra = parse(["serve", "--store", store, "--host", "0.0.0.0", "--admin-token", TOKEN,
                         "--audit-log", str(tmp_path / "a.jsonl")])
    cmd, env = prepare(args, extra)
    assert env[ADMIN_TOKEN_ENV] == TOKEN and not any(TOKEN in a for a in cmd)
    assert env["SOLA_VLLM_AUDIT_LOG"] == str(tmp_path / "a.jsonl")
    monkeypatch.setenv(ADMIN_TOKEN_ENV, TOKEN)
    args, extra = parse(["serve", "--store", store, "--host", "0.0.0.0"])
    cmd, env = prepare(args, extra)
    assert env[ADMIN_TOKEN_ENV] == TOKEN and not any(TOKEN in a for a in cmd)
    monkeypatch.setenv(ADMIN_TOKEN_ENV, "")  # empty: no token, so loopback only
    args, extra = parse(["serve", "--store", store])
    assert ADMIN_TOKEN_ENV not in prepare(args, extra)[1]


# --- the guard on a bare app ----------------------------------------------------------------------
def _app(tmp_path, token: str | None) -> TestClient:
    app = FastAPI()
    SolaEndpointPlugin().attach_router(app)

    @app.post("/v1/sola/later/{edit_id}")  # a route added after the plugin: guarded too
    async def later(edit_id: str, request: Request) -> Response:
        return Response(json.dumps({"edit": {"id": edit_id}}), 200,
                        media_type="application/json")

    app.state.sola_access = AccessConfig(token, "127.0.0.1")
    app.state.sola_audit = AuditLog(tmp_path / "audit.jsonl")
    return TestClient(app)


def _audit(tmp_path) -> list[dict]:
    return AuditLog(tmp_path / "audit.jsonl").tail(1000)["records"]


def test_guard_refuses_without_the_token_and_records_it(tmp_path):
    client = _app(tmp_path, TOKEN)
    wrong = {"X-Sola-Admin-Token": "wrong-token-0123456789"}
    for method, path in [("GET", "/v1/sola/edits"), ("POST", "/v1/sola/edits"),
                         ("DELETE", "/v1/sola/edits/x"), ("POST", "/v1/sola/edits/x/restore"),
                         ("GET", "/v1/sola/audit"), ("POST", "/v1/sola/later/x"),
                         ("GET", "/v1/sola/nothing-here"), ("GET", "/v1/sola")]:
        for headers in ({}, wrong):
            reply = client.request(method, path, headers=headers)
            assert reply.status_code == 401, (method, path)
            assert reply.json()["error"]["type"] == "unauthorized"
    records = _audit(tmp_path)
    assert len(records) == 16 and {r["status"] for r in records} == {401}
    assert not any(r["authenticated"] for r in records)
    assert client.request("GET", "/health").status_code == 404  # outside the prefix: untouched


def test_guard_covers_websockets(tmp_path):
    from starlette.websockets import WebSocket, WebSocketDisconnect

    client = _app(tmp_path, TOKEN)

    @client.app.websocket("/v1/sola/ws")
    async def ws(socket: WebSocket) -> None:
        await socket.accept()
        await socket.send_text("in")
        await socket.close()

    with pytest.raises(WebSocketDisconnect), client.websocket_connect("/v1/sola/ws"):
        pass
    with client.websocket_connect("/v1/sola/ws", headers={"X-Sola-Admin-Token": TOKEN}) as s:
        assert s.receive_text() == "in"


def test_guard_with_the_token_records_changes(tmp_path):
    client = _app(tmp_path, TOKEN)
    ok = {"X-Sola-Admin-Token": TOKEN}
    reply = client.post("/v1/sola/later/e1?author=ann", headers=ok)
    assert reply.status_code == 200 and reply.json() == {"edit": {"id": "e1"}}
    reply = client.get("/v1/sola/edits", headers=ok)  # no manager: 503, but past the guard
    assert reply.status_code == 503
    reply = client.delete("/v1/sola/edits/e2?author=bob", headers=ok)
    assert reply.status_code == 503
    (first, second) = _audit(tmp_path)  # the GET is not a change: not recorded
    assert first["edit_id"] == "e1" and first["author"] == "ann" and first["status"] == 200
    assert first["authenticated"] and first["client"].startswith("testclient:")
    assert second["method"] == "DELETE" and second["edit_id"] == "e2" and second["status"] == 503
    assert second["error"] == "unavailable"
    raw = (tmp_path / "audit.jsonl").read_bytes()
    assert TOKEN.encode() not in raw
    assert stat.S_IMODE(os.stat(tmp_path / "audit.jsonl").st_mode) == 0o600
    reply = client.get("/v1/sola/audit?limit=1", headers=ok)
    assert reply.status_code == 200 and reply.json()["records"] == [second]
    for bad in ("0", "-1", "x", "10001", "1e3", "١"):
        assert client.get(f"/v1/sola/audit?limit={bad}", headers=ok).status_code == 400


def test_guard_without_a_token_is_open_but_audited(tmp_path):
    client = _app(tmp_path, None)
    assert client.post("/v1/sola/later/e1").status_code == 200
    (record,) = _audit(tmp_path)
    assert record["auth"] == "open" and not record["authenticated"]


def test_guard_before_init_answers_503(tmp_path):
    app = FastAPI()
    SolaEndpointPlugin().attach_router(app)
    reply = TestClient(app).get("/v1/sola/edits", headers={"X-Sola-Admin-Token": TOKEN})
    assert reply.status_code == 503 and reply.json()["error"]["type"] == "unavailable"
    assert any(getattr(r, "path", "") == "/v1/sola/audit" for r in router.routes)


# --- the audit log file ---------------------------------------------------------------------------
def test_audit_tail_skips_torn_lines_and_clips_fields(tmp_path):
    log = AuditLog(tmp_path / "sub" / "audit.jsonl")
    assert log.tail(5)["records"] == []
    for i in range(300):
        assert log.append({"i": i, "path": "x" * 1000 if i == 299 else "/"})
    with open(log.path, "ab") as f:
        f.write(b'{"i": "torn')  # a crash in the middle of a write
    tail = log.tail(3)
    assert [r["i"] for r in tail["records"]] == [298, 299] and tail["unreadable_lines"] == 1
    assert len(tail["records"][-1]["path"]) < 300
    assert [r["i"] for r in log.tail(10_000)["records"]] == list(range(300))
    with pytest.raises(ValueError):
        log.tail(0)


def test_audit_write_failure_is_logged_not_raised(tmp_path, caplog):
    (tmp_path / "dir").mkdir()
    log = AuditLog(tmp_path / "dir")  # a directory: cannot be opened for appending
    assert log.append({"what": "x"}) is False
    assert "cannot write the audit log" in caplog.text and '"what": "x"' in caplog.text


def test_local_cli_changes_are_audited(tmp_path, capsys):
    from sola_vllm.cli import main as cli_main

    store = EditStore(tmp_path / "store")
    store.add(make_synthetic_edit("e1"))
    assert cli_main(["edit", "revoke", "--store", str(store.path), "e1"]) == 0
    assert cli_main(["edit", "revoke", "--store", str(store.path), "e1"]) == 2
    capsys.readouterr()
    assert cli_main(["audit", "--store", str(store.path), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)["records"]
    assert [(r["path"], r["edit_id"], r["status"]) for r in records] == [
        ("sola-vllm edit revoke", "e1", "ok"), ("sola-vllm edit revoke", "e1", "failed")]


# --- a full or read-only disk ---------------------------------------------------------------------
def _store_with_edit(tmp_path) -> EditStore:
    store = EditStore(tmp_path / "store")
    store.add(make_synthetic_edit("e1"))
    return store


def _files(store: EditStore) -> dict:
    return {p.name: p.read_bytes() for p in store.path.rglob("*") if p.is_file()
            and p.name != ".lock"}


def test_full_disk_mid_journal_write_changes_nothing(tmp_path, monkeypatch):
    store = _store_with_edit(tmp_path)
    history = store.history("e1")
    real_write, calls = os.write, []

    def half_then_full(fd, data):  # the first write gets half in, then the disk is full
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[:len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "write", half_then_full)
    with pytest.raises(StoreError) as info:
        store.revoke("e1")
    monkeypatch.undo()
    error = _store_error(info.value)
    assert error.status == 507 and "nothing was changed" in error.message
    assert store.get("e1").state == "active" and store.history("e1") == history
    store.revoke("e1")  # the torn tail is dropped by the next write
    assert [h["op"] for h in store.history("e1")] == ["add", "revoke"]


def test_full_disk_on_add_leaves_no_artifact(tmp_path, monkeypatch):
    store = _store_with_edit(tmp_path)
    before = _files(store)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fsutil.os, "fsync", full)
    with pytest.raises(StoreError) as info:
        store.add(make_synthetic_edit("e2"))
    monkeypatch.undo()
    assert _store_error(info.value).status == 507
    assert _files(store) == before and [e.id for e in store.all()] == ["e1"]


def test_read_only_errors_map_to_503():
    for code in (errno.EROFS, errno.EACCES, errno.EPERM):
        try:
            raise StoreError("cannot write") from OSError(code, os.strerror(code))
        except StoreError as exc:
            error = _store_error(exc)
        assert error.status == 503 and error.kind == "store_read_only"
    assert _store_error(StoreError("something else")).status == 500
