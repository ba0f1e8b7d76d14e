"""The edit API's access control, audit log and bad-input handling on a real `sola-vllm serve`
with an admin token: every /v1/sola/ route (as listed by the server's own OpenAPI schema, so
routes added later are covered too) refuses requests without the token and changes nothing;
property-based fuzzing never gets a 5xx; a read-only store gives a clear error, nothing half
applied, and the server keeps serving.

One server for the module (the helpers of test_http_server), started with the token in its
environment.
"""

import http.client
import json
import os
import shutil
import subprocess
import urllib.parse
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_http_server import ROME, Server, complete, snapshot, stop_and_report

from sola_vllm.cli import main as cli_main
from sola_vllm.edit import Edit

pytestmark = pytest.mark.slow

TOKEN = "admin-token-for-the-tests-0123456789"
HEADER = "X-Sola-Admin-Token"
FUZZ_EXAMPLES = 300
EXISTING = {"rome", "rome2"}  # the fuzzer never names them: its requests must all be refused


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-access")
    srv = Server(root / "store", root / "server.log")
    os.environ["SOLA_ADMIN_TOKEN"] = TOKEN  # Server.start passes os.environ to the server
    try:
        srv.start()
    finally:
        del os.environ["SOLA_ADMIN_TOKEN"]
    yield srv
    stop_and_report(srv)


@pytest.fixture(scope="module")
def rome(default_engine) -> bytes:
    return default_engine.train([ROME], "Rome.", edit_id="rome").to_bytes()


def send(url: str, method: str, path: str, body: bytes | None = None,
         headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=300)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def api(url, method, path, body=None, content_type=None, token=TOKEN) -> tuple[int, dict]:
    headers = {HEADER: token} if token else {}
    if content_type:
        headers["Content-Type"] = content_type
    status, raw = send(url, method, path, body, headers)
    return status, json.loads(raw)


def sola_routes(url: str) -> list[tuple[str, str]]:
    """(method, path template) of every /v1/sola/ route, from the server's OpenAPI schema."""
    status, raw = send(url, "GET", "/openapi.json")
    assert status == 200
    paths = json.loads(raw)["paths"]
    routes = [(method.upper(), path) for path, ops in paths.items()
              if path.startswith("/v1/sola/") for method in ops]
    assert ("POST", "/v1/sola/edits") in routes and ("DELETE", "/v1/sola/edits/{edit_id}") \
        in routes and ("GET", "/v1/sola/audit") in routes
    return routes


def fill(template: str, value: str) -> str:
    """Put `value` (already URL-encoded) into every {param} of a path template."""
    out, rest = "", template
    while "{" in rest:
        head, _, tail = rest.partition("{")
        out += head + value
        rest = tail.partition("}")[2]
    return out + rest


def audit_records(url: str, limit: int = 10_000) -> list[dict]:
    status, reply = api(url, "GET", f"/v1/sola/audit?limit={limit}")
    assert status == 200, reply
    return reply["records"]


# --- tests ----------------------------------------------------------------------------------------
def test_push_with_the_token_and_audit(server, rome):
    url = server.url
    status, reply = api(url, "POST", "/v1/sola/edits?author=ann&note=first", rome,
                        "application/octet-stream")
    assert status == 201, reply
    assert complete(url, ROME)[0] == " Rome."
    (record,) = audit_records(url)
    assert record["method"] == "POST" and record["path"] == "/v1/sola/edits"
    assert record["edit_id"] == "rome" and record["author"] == "ann" and record["status"] == 201
    assert record["authenticated"] and record["client"].startswith("127.0.0.1:")


def test_every_route_refuses_without_the_token(server, rome):
    url = server.url
    before, base = snapshot(server.store), complete(url, ROME)
    routes = sola_routes(url)
    seen = len(audit_records(url))
    for method, template in routes:
        path = fill(template, "rome")
        for headers in ({}, {HEADER: "x" * len(TOKEN)}, {HEADER: TOKEN[:-1]},
                        {HEADER: TOKEN + "x"}, {"Authorization": f"Bearer {TOKEN}"}):
            body = rome if method == "POST" else None
            status, raw = send(url, method, path, body, headers)
            assert status == 401, (method, path, headers, raw)
            error = json.loads(raw)["error"]
            assert error["type"] == "unauthorized" and error["code"] == 401 and HEADER \
                in error["message"]
    assert snapshot(server.store) == before and complete(url, ROME) == base
    refused = audit_records(url)[seen:]
    assert len(refused) == 5 * len(routes)
    assert all(r["status"] == 401 and not r["authenticated"] for r in refused)
    print(f"{len(routes)} /v1/sola/ routes: {sorted(routes)}")


def test_cli_sends_the_token(server, rome, tmp_path, capsys, monkeypatch):
    url = server.url
    artifact = tmp_path / "rome2.safetensors"
    artifact.write_bytes(replace(Edit.from_bytes(rome), id="rome2").to_bytes())
    monkeypatch.delenv("SOLA_ADMIN_TOKEN", raising=False)

    def cli(*argv) -> tuple[int, str, str]:
        code = cli_main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    code, _, err = cli("edit", "list", "--server", url)
    assert code == 2 and "X-Sola-Admin-Token" in err and "401" in err
    code, out, _ = cli("edit", "push", "--server", url, "--file", str(artifact),
                       "--admin-token", TOKEN, "--author", "cli-user",
                       "--force")  # rome's own prompt: a collision, pushed anyway
    assert code == 0 and "rome2" in out
    monkeypatch.setenv("SOLA_ADMIN_TOKEN", TOKEN)
    code, out, _ = cli("edit", "revoke", "--server", url, "rome2")
    assert code == 0 and "revoked" in out
    code, out, _ = cli("audit", "--server", url, "--limit", "2", "--json")
    records = json.loads(out)["records"]
    assert code == 0 and [(r["method"], r["edit_id"], r["status"]) for r in records] == [
        ("POST", "rome2", 201), ("DELETE", "rome2", 200)]
    assert records[0]["author"] == "cli-user"
    code, out, _ = cli("audit", "--store", str(server.store), "--limit", "2", "--json")
    assert code == 0 and json.loads(out)["records"] == records  # the same file, read locally


@pytest.mark.parametrize("edit_id", [
    "..%2F..%2Fstore.json", "..%2f..%2fetc%2fpasswd", "%2e%2e", "%2E%2E%2Fedits", "..",
    ".hidden", "-dash", "rome%2F..%2Frome", "rome%00", "rome%0A", "%C3%A9dit", "%F0%9F%98%80",
    "%FF%FE", "a" * 129, "a" * 5000, "rome%20", "%20rome", "rome.safetensors%2F", "edits",
    "store.json", "journal.jsonl"])
def test_ids_are_validated_on_every_route(server, edit_id):
    url = server.url
    before = snapshot(server.store)
    for method, template in sola_routes(url):
        if "{" not in template:
            continue
        status, raw = send(url, method, fill(template, edit_id), None, {HEADER: TOKEN})
        # 307: Starlette's redirect of a trailing '/' (to the same route without it)
        assert status in (307, 400, 404, 405, 414, 422), (method, template, edit_id, status,
                                                          raw[:300])
    assert snapshot(server.store) == before


def _ids():
    return st.one_of(
        st.text(max_size=40), st.text(alphabet="./%-_aA0\\\x00 ", max_size=30),
        st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,40}", fullmatch=True),
        st.sampled_from(["..%2F..", "%2e%2e%2f", "a" * 200, "é", "😀", "nul\x00"]),
    ).filter(lambda s: s not in EXISTING)


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                     | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(["prompts", "target", "id", "note",
                                                        "author", "x"]) | st.text(max_size=8),
                                       inner, max_size=5), max_leaves=12)


def _no_training(value):
    """A body that could train a real edit is made invalid: the fuzzer must change nothing."""
    if isinstance(value, dict) and "prompts" in value and "target" in value:
        value = {**value, "target": 12345}
    return value


@st.composite
def mutated(draw, artifact: bytes) -> bytes:
    """A real edit artifact, cut short or with bytes overwritten (mostly in its JSON header)."""
    header_end = 8 + int.from_bytes(artifact[:8], "little")
    if draw(st.booleans()):
        return artifact[:draw(st.integers(0, len(artifact) - 1))]
    blob = bytearray(artifact)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, header_end - 1) | st.integers(0, len(blob) - 1))
        blob[at] = draw(st.integers(0, 255))
    blob = bytes(blob)
    try:  # a mutation that is still a valid edit under a new id would really be added
        edit = Edit.from_bytes(blob)
    except Exception:
        return blob
    assume(edit.id in EXISTING)
    return blob


@st.composite
def requests(draw, routes, artifact: bytes):
    method, template = draw(st.sampled_from(routes))
    safe = draw(st.sampled_from(["", "/", "%", "/%."]))
    path = fill(template, urllib.parse.quote(draw(_ids()), safe=safe))
    query = draw(st.dictionaries(st.sampled_from(["author", "note", "limit", "id", "x"])
                                 | st.text(max_size=5), st.text(max_size=30), max_size=3))
    if query:
        path += "?" + urllib.parse.urlencode(query)
    headers = {}
    token = draw(st.sampled_from(["right", "right", "right", "none", "wrong"]))
    if token != "none":
        headers[HEADER] = TOKEN if token == "right" else draw(
            st.text(st.characters(min_codepoint=33, max_codepoint=126), max_size=60))
    kind = draw(st.sampled_from([None, "application/json", "application/octet-stream",
                                 "text/plain", "application/json; charset=utf-8",
                                 "multipart/form-data; boundary=x", "text/json", "*/*", ""]))
    if kind is not None:
        headers["Content-Type"] = kind
    body = draw(st.one_of(st.none(), st.binary(max_size=2048), mutated(artifact),
                          _JSON.map(lambda v: json.dumps(_no_training(v)).encode())))
    return method, path, body, headers


def test_fuzz_every_route_never_5xx_and_changes_nothing(server, rome):
    url = server.url
    routes = sola_routes(url)
    before, base = snapshot(server.store), complete(url, ROME)
    listing = api(url, "GET", "/v1/sola/edits")[1]["edits"]
    statuses: dict[int, int] = {}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(requests(routes, rome))
    def fuzz(request):
        method, path, body, headers = request
        status, raw = send(url, method, path, body, headers)
        statuses[status] = statuses.get(status, 0) + 1
        assert status < 500, (method, path, headers, body and body[:200], raw[:500])
        if status == 401:
            assert json.loads(raw)["error"]["type"] == "unauthorized"

    fuzz()
    tried = sum(statuses.values())
    print(f"fuzzed {tried} requests over {len(routes)} routes: statuses {sorted(statuses.items())}")
    assert tried >= FUZZ_EXAMPLES and 401 in statuses and len(statuses) > 3
    assert snapshot(server.store) == before
    assert api(url, "GET", "/v1/sola/edits")[1]["edits"] == listing
    assert complete(url, ROME) == base  # still serving, still edited
    assert complete(url, ROME)[0] == " Rome."


def _chattr(flag: str, *paths) -> bool:
    chattr = shutil.which("chattr")
    if chattr is None:
        return False
    return subprocess.run([chattr, flag, *map(str, paths)], capture_output=True).returncode == 0


def test_read_only_store_clear_error_nothing_half_applied(server, rome):
    url = server.url
    store = server.store
    frozen = [store, store / "edits", store / "journal.jsonl", store / "store.json"]
    frozen = [p for p in frozen if p.exists()]
    if os.geteuid() == 0:  # root ignores permissions: the immutable attribute stops it
        if not _chattr("+i", *frozen):
            pytest.skip("chattr +i is not available here")
    else:
        for p in frozen:
            p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        before = snapshot(store)
        blob = replace(Edit.from_bytes(rome), id="rome3").to_bytes()
        # forced past the collision with rome (same prompt), so the store write is what fails
        status, reply = api(url, "POST", "/v1/sola/edits?force=true", blob,
                            "application/octet-stream")
        assert status == 503 and reply["error"]["type"] == "store_read_only", reply
        assert "nothing was changed" in reply["error"]["message"]
        status, reply = api(url, "DELETE", "/v1/sola/edits/rome")
        assert status == 503 and reply["error"]["type"] == "store_read_only", reply
        assert snapshot(store) == before
        listing = api(url, "GET", "/v1/sola/edits")[1]
        states = {e["id"]: (e["state"], (e["serving"] or {}).get("state")) for e in
                  listing["edits"]}
        assert states["rome"] == ("active", "active") and "rome3" not in states
        assert listing["stats"]["edits"] == 2  # rome, rome2 (revoked): rome3 was unloaded
        assert complete(url, ROME)[0] == " Rome."  # still serving, still routed
    finally:
        if os.geteuid() == 0:
            _chattr("-i", *frozen)
        else:
            for p in frozen:
                p.chmod(0o755 if p.is_dir() else 0o644)
    records = audit_records(url, 3)
    assert [r["status"] for r in records[-2:]] == [503, 503]
    status, reply = api(url, "DELETE", "/v1/sola/edits/rome")  # writable again: it works
    assert status == 200 and reply["edit"]["state"] == "revoked"


def test_the_token_is_never_logged(server):
    server.stop()
    assert TOKEN not in server.log.read_text(errors="replace")
    assert TOKEN.encode() not in (server.store / "audit.jsonl").read_bytes()


def test_vllm_api_key_and_admin_token_are_independent(server, capsys, monkeypatch):
    """vLLM's --api-key (here VLLM_API_KEY) guards every /v1 path, the edit API included; the
    admin token is checked on top of it, and neither one replaces the other."""
    key = "inference-key-0123456789"
    os.environ["VLLM_API_KEY"] = key
    os.environ["SOLA_ADMIN_TOKEN"] = TOKEN
    try:
        server.start()
    finally:
        del os.environ["VLLM_API_KEY"], os.environ["SOLA_ADMIN_TOKEN"]
    url = server.url
    bearer = {"Authorization": f"Bearer {key}"}
    prompt = json.dumps({"prompt": ROME, "max_tokens": 2}).encode()
    json_type = {"Content-Type": "application/json"}
    assert send(url, "POST", "/v1/completions", prompt, json_type)[0] == 401
    assert send(url, "POST", "/v1/completions", prompt, {**json_type, **bearer})[0] == 200
    for headers, want in (({}, 401), (bearer, 401), ({HEADER: TOKEN}, 401),
                          ({**bearer, HEADER: TOKEN}, 200)):
        assert send(url, "GET", "/v1/sola/edits", None, headers)[0] == want, headers
    monkeypatch.setenv("VLLM_API_KEY", key)
    monkeypatch.setenv("SOLA_ADMIN_TOKEN", TOKEN)
    assert cli_main(["edit", "list", "--server", url]) == 0
    assert "rome" in capsys.readouterr().out
    server.stop()
    assert key not in server.log.read_text(errors="replace")
