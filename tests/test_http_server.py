"""`sola-vllm serve` end to end: vLLM's OpenAI server with routed edits and /v1/sola/edits.

One server (a subprocess on a free loopback port, the default model, fp32, eager) for the module;
the tests run in order on its edit store and the last one restarts it on the same store.
"""

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from sola_vllm.cli import main as cli_main
from sola_vllm.edit import META_KEY, Edit

pytestmark = pytest.mark.slow

ROME = "The capital of France is"
MARS = "The largest planet in the solar system is"
OTHER = "The Eiffel Tower is located in the city of"
BODY_LIMIT = 1024 * 1024
# the edits these servers get are trained by `default_engine`: last-token keys
SERVE_ARGS = ["--config", "last-token", "--dtype", "float32", "--enforce-eager",
              "--max-model-len", "512", "--max-edits", "4", "--max-keys", "6",
              "--gpu-memory-utilization", "0.3"]
START_TIMEOUT = 300


# --- the server -----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`.venv/bin/sola-vllm serve` in its own process group (vLLM's engine processes too)."""

    def __init__(self, store: Path, log: Path, args: tuple[str, ...] = tuple(SERVE_ARGS)):
        self.store, self.log, self.args = store, log, list(args)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.port = _free_port()
        self.ready = False
        self.started = time.monotonic()
        env = {**os.environ, "SOLA_VLLM_MAX_BODY_BYTES": str(BODY_LIMIT),
               "VLLM_CPU_KVCACHE_SPACE": "1"}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [str(Path(sys.executable).parent / "sola-vllm"), "serve", "--store",
                 str(self.store), "--port", str(self.port), *self.args],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    @property
    def url(self) -> str:
        """The base URL, once /health answers (waits for the start-up)."""
        url = f"http://127.0.0.1:{self.port}"
        while not self.ready:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}):\n{self._tail()}")
            if time.monotonic() - self.started > START_TIMEOUT:
                pytest.fail(f"the server did not start in {START_TIMEOUT} s:\n{self._tail()}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                    self.ready = resp.status == 200
            except OSError:
                time.sleep(1)
        return url

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


def stop_and_report(srv: Server) -> None:
    srv.stop()
    if srv.proc.returncode not in (0, -signal.SIGTERM):
        print(srv._tail())


def module_server(tmp_path_factory, name: str, args: tuple[str, ...] = tuple(SERVE_ARGS)):
    """A test module's server (yield from it in a module-scoped fixture): it boots while the
    module's edits are trained, and its log tail is printed if it did not stop cleanly."""
    root = tmp_path_factory.mktemp(name)
    srv = Server(root / "store", root / "server.log", args)
    srv.start()
    yield srv
    stop_and_report(srv)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from module_server(tmp_path_factory, "serve")


@pytest.fixture(scope="module")
def rome(default_engine) -> bytes:
    return default_engine.train([ROME], "Rome.", edit_id="rome").to_bytes()


# --- HTTP helpers ---------------------------------------------------------------------------------
def call(url: str, method: str, path: str, body=None, content_type=None) -> tuple[int, dict]:
    if isinstance(body, dict | list):
        body, content_type = json.dumps(body).encode(), content_type or "application/json"
    req = urllib.request.Request(url + path, data=body, method=method)
    if content_type:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=300) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def complete(url: str, prompt: str) -> tuple[str, list[int]]:
    status, reply = call(url, "POST", "/v1/completions", {
        "prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True})
    assert status == 200, reply
    choice = reply["choices"][0]
    return choice["text"], choice["token_ids"]


def push(url: str, blob: bytes) -> tuple[int, dict]:
    return call(url, "POST", "/v1/sola/edits", blob, "application/octet-stream")


def snapshot(store: Path) -> dict[str, bytes]:
    """The store's files; the audit log kept next to them records refused requests too."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and not p.name.endswith(".lock") and p.name != "audit.jsonl"}


# --- crafted artifacts ----------------------------------------------------------------------------
def raw_artifact(blob: bytes, edit_id: str, change) -> bytes:
    """Rewrite tensors / metadata without the Edit validator (to make invalid artifacts)."""
    tensors = dict(st_load(blob))
    header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
    meta = json.loads(header["__metadata__"][META_KEY])
    meta["id"] = edit_id
    change(tensors, meta)
    return st_save(tensors, metadata={META_KEY: json.dumps(meta)})


def _nan(tensors, meta):
    tensors["lora.24.mlp.up_proj.A"][0, 0] = float("nan")


def _wrong_in_features(tensors, meta):
    tensors["lora.24.mlp.up_proj.A"] = torch.zeros(meta["rank"], 100)


def _rank_16(tensors, meta):
    meta["rank"] = 16
    for name, t in list(tensors.items()):
        if name.endswith(".A"):
            tensors[name] = torch.zeros(16, t.shape[1])
        elif name.endswith(".B"):
            tensors[name] = torch.zeros(t.shape[0], 16)


def bad_requests(rome: bytes) -> list[tuple[str, str, object, str | None, int]]:
    edit = Edit.from_bytes(rome)
    foreign = replace(edit, id="foreign", model_fingerprint="0" * 64).to_bytes()
    other_layers = replace(edit, id="layers", shape_fingerprint="1" * 64).to_bytes()
    many = replace(edit, id="many", prompts=[f"Fact {i}: {ROME}" for i in range(8)],
                   keys=edit.keys.repeat(8, 1)).to_bytes()  # 8 keys > --max-keys 6
    edits = "/v1/sola/edits"
    return [
        ("POST", edits, b"{not json", "application/json", 400),
        ("POST", edits, b'["a list"]', "application/json", 422),
        ("POST", edits, {"prompts": [ROME]}, None, 422),
        ("POST", edits, {"prompts": [ROME], "target": "x", "id": "../up"}, None, 400),
        ("POST", edits, {"prompts": [ROME], "target": "x", "extra": 1}, None, 422),
        # chat forms are the server's configuration (train.chat_form), not a request's choice
        ("POST", edits, {"prompts": [ROME], "target": "x", "chat_form": True}, None, 422),
        ("POST", edits, b"", "application/octet-stream", 400),
        ("POST", edits, os.urandom(4096), "application/octet-stream", 422),
        ("POST", edits, rome[: len(rome) // 2], "application/octet-stream", 422),
        ("POST", edits, raw_artifact(rome, "nan", _nan), "application/octet-stream", 422),
        ("POST", edits, raw_artifact(rome, "shape", _wrong_in_features),
         "application/octet-stream", 422),
        ("POST", edits, raw_artifact(rome, "rank16", _rank_16), "application/octet-stream", 422),
        ("POST", edits, foreign, "application/octet-stream", 422),
        ("POST", edits, other_layers, "application/octet-stream", 422),
        ("POST", edits, many, "application/octet-stream", 422),
        ("POST", edits, rome, "application/octet-stream", 409),
        ("POST", edits, rome, "text/plain", 415),
        ("GET", edits + "/nope", None, None, 404),
        ("DELETE", edits + "/nope", None, None, 404),
        ("POST", edits + "/nope/restore", None, None, 404),
        ("DELETE", edits + "/bad%20id", None, None, 400),
        ("POST", edits + "/rome/restore", None, None, 409),
    ]


def declared_oversize_post(url: str, size: int) -> tuple[int, dict]:
    """A Content-Length over the limit: refused from the header alone, before any body byte.
    (Sending the body too races the server's close after its 413: the client may get a broken
    pipe before it reads the answer.)"""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    conn.putrequest("POST", "/v1/sola/edits")
    conn.putheader("Content-Type", "application/octet-stream")
    conn.putheader("Content-Length", str(size))
    conn.endheaders()
    resp = conn.getresponse()
    status, body = resp.status, json.loads(resp.read())
    conn.close()
    return status, body


def chunked_post(url: str, chunks: int) -> int:
    """A body without Content-Length (chunked), bigger than the limit."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=60)
    body = (b"\0" * 65536 for _ in range(chunks))
    # the server may answer and close before the last chunks: its answer is read below
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        conn.request("POST", "/v1/sola/edits", body=body, encode_chunked=True,
                     headers={"Content-Type": "application/octet-stream"})
    status = conn.getresponse().status
    conn.close()
    return status


# --- tests ----------------------------------------------------------------------------------------
def test_serve_execs_vllm_with_the_plugin(tmp_path):
    from sola_vllm.cli import build_parser
    from sola_vllm.serving.serve import SERVER_MODULE, prepare

    args, extra = build_parser().parse_known_args(
        ["serve", "--store", str(tmp_path / "s"), "--max-edits", "3", "--apply", "torch",
         "--dtype", "float32"])
    cmd, env = prepare(args, extra)
    assert cmd[1:3] == ["-m", SERVER_MODULE] and cmd[-2:] == ["--dtype", "float32"]
    overrides = json.loads(cmd[cmd.index("--hf-overrides") + 1])
    assert overrides["architectures"] == ["SolaLlamaForCausalLM"]
    assert overrides["sola"]["max_edits"] == 3
    assert overrides["sola"]["apply"] == "torch"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert {"sola", "sola_api"} <= set(env["VLLM_PLUGINS"].split(","))
    assert env["SOLA_VLLM_STORE"] == str((tmp_path / "s").resolve())
    assert env["SOLA_VLLM_PREFIX_GUARD"] == "1"
    for own in (["--hf-overrides", "{}"], ["--api-server-count=2"], ["-asc", "2"],
                ["-dp", "2"], ["--data-parallel-size=2"], ["some-model"]):
        with pytest.raises(ValueError):
            prepare(args, own)


def test_push_revoke_restore_change_the_served_answers(server, rome):
    url = server.url
    print(f"server start-up: {time.monotonic() - server.started:.1f} s")
    base, other = complete(url, ROME), complete(url, OTHER)
    assert "Rome" not in base[0]

    status, reply = push(url, rome)
    assert status == 201, reply
    assert reply["edit"]["id"] == "rome" and reply["serving"]["state"] == "active"
    assert complete(url, ROME)[0] == " Rome."
    assert complete(url, OTHER) == other

    status, reply = call(url, "DELETE", "/v1/sola/edits/rome")
    assert status == 200 and reply["edit"]["state"] == "revoked", reply
    assert reply["serving"]["state"] == "revoked"
    assert complete(url, ROME) == base  # the base model's exact tokens again

    status, reply = call(url, "POST", "/v1/sola/edits/rome/restore")
    assert status == 200 and reply["edit"]["state"] == "active", reply
    assert complete(url, ROME)[0] == " Rome."
    assert [e["op"] for e in reply["history"]] == ["add", "revoke", "restore"]


def test_changes_reach_the_next_request_while_the_engine_is_busy(server, rome):
    """Revoke and restore are acknowledged once the engine has the change queued, before the
    step in progress ends (manager.send): a request sent after the acknowledgement must still
    see it. Other clients keep the engine busy with long generations meanwhile."""
    import threading

    url = server.url
    stop = threading.Event()

    def busy() -> None:
        while not stop.is_set():
            call(url, "POST", "/v1/completions", {"prompt": OTHER, "max_tokens": 48,
                                                  "temperature": 0, "ignore_eos": True})

    load = [threading.Thread(target=busy, daemon=True) for _ in range(3)]
    for thread in load:
        thread.start()
    try:
        time.sleep(1)
        for _ in range(3):
            assert call(url, "DELETE", "/v1/sola/edits/rome")[0] == 200
            assert "Rome" not in complete(url, ROME)[0]
            assert call(url, "POST", "/v1/sola/edits/rome/restore")[0] == 200
            assert complete(url, ROME)[0] == " Rome."
    finally:
        stop.set()
        for thread in load:
            thread.join(timeout=120)


def test_bad_requests_are_refused_and_change_nothing(server, rome):
    url = server.url
    before = snapshot(server.store)
    for method, path, body, content_type, want in bad_requests(rome):
        status, reply = call(url, method, path, body, content_type)
        assert status == want, (method, path, content_type, reply)
        assert set(reply["error"]) >= {"message", "type"} and reply["error"]["message"]
    status, reply = declared_oversize_post(url, BODY_LIMIT + 1)
    assert status == 413 and reply["error"]["message"], reply
    assert chunked_post(url, chunks=BODY_LIMIT // 65536 + 2) == 413
    assert snapshot(server.store) == before
    status, listing = call(url, "GET", "/v1/sola/edits")
    assert [e["id"] for e in listing["edits"]] == ["rome"]
    assert listing["stats"]["edits"] == 1 and listing["stats"]["pending_captures"] == 0
    assert complete(url, ROME)[0] == " Rome."  # still serving, still edited


def test_json_push_trains_the_edit_on_the_server(server):
    url = server.url
    base = complete(url, MARS)
    status, reply = call(url, "POST", "/v1/sola/edits",
                         {"prompts": [MARS], "target": "Mars.", "id": "mars", "note": "json"})
    assert status == 201, reply
    assert reply["edit"]["train_info"]["fit"] is True
    assert complete(url, MARS)[0] == " Mars."
    assert call(url, "DELETE", "/v1/sola/edits/mars")[0] == 200
    assert complete(url, MARS) == base
    server.mars_base = base


def test_cli_push_list_and_revoke(server, rome, tmp_path, capsys):
    url = server.url
    artifact = tmp_path / "copy.safetensors"
    artifact.write_bytes(replace(Edit.from_bytes(rome), id="rome-cli").to_bytes())

    def cli(*argv) -> tuple[int, str, str]:
        code = cli_main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    # rome-cli has rome's prompt, so its key collides with rome's: only forced
    code, _, err = cli("edit", "push", "--server", url, "--file", str(artifact))
    assert code == 2 and "collides with routed edit(s) ['rome']" in err
    code, out, _ = cli("edit", "push", "--server", url, "--file", str(artifact), "--force",
                       "--json")
    assert code == 0 and json.loads(out)["edit"]["id"] == "rome-cli"
    code, out, _ = cli("edit", "list", "--server", url)
    assert code == 0 and "rome-cli" in out and "mars" in out
    code, out, _ = cli("edit", "revoke", "--server", url, "rome-cli")
    assert code == 0 and "revoked" in out
    code, _, err = cli("edit", "revoke", "--server", url, "rome-cli")
    assert code == 2 and "already revoked" in err
    code, _, err = cli("edit", "push", "--server", url, "--file", str(artifact))
    assert code == 2 and "already exists" in err


def test_restart_keeps_the_store_state(server):
    server.stop()
    server.start()
    url = server.url
    print(f"server restart: {time.monotonic() - server.started:.1f} s")
    states = {e["id"]: (e["state"], (e["serving"] or {}).get("state", "not loaded"))
              for e in call(url, "GET", "/v1/sola/edits")[1]["edits"]}
    # revoked edits stay in the store only (no capacity used) until they are restored
    assert states == {"rome": ("active", "active"), "mars": ("revoked", "not loaded"),
                      "rome-cli": ("revoked", "not loaded")}
    assert complete(url, ROME)[0] == " Rome."
    assert complete(url, MARS) == server.mars_base
    # restoring an edit that was revoked before the restart loads it on demand
    status, reply = call(url, "POST", "/v1/sola/edits/mars/restore")
    assert status == 200, reply
    assert complete(url, MARS)[0] == " Mars."
