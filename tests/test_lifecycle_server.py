"""The edit lifecycle and the pre-flight check on a real `sola-vllm serve` (one server for the
module, the default model): canary edits through the OpenAI completions API with
`vllm_xargs`, HTTP and CLI transitions, collision refusal, and the check route."""

import json
from dataclasses import replace

import pytest
from test_http_server import OTHER, ROME, call, complete, module_server, push, snapshot

from sola_vllm.cli import main as cli_main

pytestmark = pytest.mark.slow

MARS = "The largest planet in the solar system is"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from module_server(tmp_path_factory, "serve-lifecycle")


def complete_canary(url: str, prompt: str) -> tuple[str, list[int]]:
    status, reply = call(url, "POST", "/v1/completions", {
        "prompt": prompt, "max_tokens": 12, "temperature": 0, "return_token_ids": True,
        "vllm_xargs": {"sola_canary": True}})
    assert status == 200, reply
    return reply["choices"][0]["text"], reply["choices"][0]["token_ids"]


def test_canary_transitions_and_preflight_on_a_server(server, default_engine, tmp_path,
                                                      capsys):
    rome = default_engine.train([ROME], "Rome.", edit_id="rome")
    url = server.url
    base, other = complete(url, ROME), complete(url, OTHER)
    assert "Rome" not in base[0] and complete_canary(url, ROME) == base

    # added as a canary: routed only for requests that opt in through vllm_xargs
    status, reply = call(url, "POST", "/v1/sola/edits?state=canary&author=ann", rome.to_bytes(),
                         "application/octet-stream")
    assert status == 201, reply
    assert reply["edit"]["state"] == "canary" and reply["serving"]["state"] == "canary"
    assert reply["check"]["ok"] is True and reply["check"]["collisions"] == []
    assert complete(url, ROME) == base  # exact base tokens without the flag
    assert complete_canary(url, ROME)[0] == " Rome."
    assert complete_canary(url, OTHER) == other

    # a pushed twin (rome's prompt) collides with the canary edit: 409 naming it, unless forced
    twin = replace(rome, id="twin", target="Paris.").to_bytes()
    before = snapshot(server.store)
    status, reply = push(url, twin)
    assert status == 409 and reply["error"]["type"] == "edit_collision", reply
    (collision,) = reply["error"]["check"]["collisions"]
    assert (collision["edit"], collision["state"], collision["prompt"],
            collision["other_prompt"]) == ("rome", "canary", ROME, ROME)
    assert collision["distance"] < reply["error"]["check"]["threshold"]
    assert snapshot(server.store) == before
    status, reply = call(url, "POST", "/v1/sola/edits?force=true&state=staged", twin,
                         "application/octet-stream")
    assert status == 201 and reply["edit"]["state"] == "staged", reply
    assert complete_canary(url, ROME)[0] == " Rome."  # staged: the twin never routes

    # the check route adds nothing: keys captured by the engine, probes routed
    status, report = call(url, "POST", "/v1/sola/edits/check",
                          {"prompts": [MARS], "probes": [MARS, ROME, OTHER], "id": "mars"})
    assert status == 200, report
    assert report["ok"] is True and report["routes_to_new"] == [MARS]
    assert [p["route"] for p in report["probes"]] == ["mars", "rome", None]
    status, report = call(url, "POST", "/v1/sola/edits/check", {"prompts": [ROME]})
    assert status == 200 and [c["edit"] for c in report["collisions"]] == ["rome"]
    probes = tmp_path / "probes.json"
    probes.write_text(json.dumps([MARS, OTHER]))
    code = cli_main(["edit", "check", "--server", url, "--prompt", MARS, "--probes",
                     str(probes), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["server"]["routes_to_new"] == [MARS]
    assert [e["id"] for e in call(url, "GET", "/v1/sola/edits")[1]["edits"]] == ["rome", "twin"]

    # promote (CLI): every request routes; canary again (HTTP): only opted-in ones; revoke
    assert cli_main(["edit", "promote", "--server", url, "rome", "--author", "bob"]) == 0
    assert "now active" in capsys.readouterr().out
    assert complete(url, ROME)[0] == " Rome."
    status, reply = call(url, "POST", "/v1/sola/edits/rome/canary?author=cid&note=back")
    assert status == 200 and reply["serving"]["state"] == "canary", reply
    assert complete(url, ROME) == base
    status, reply = call(url, "DELETE", "/v1/sola/edits/rome")
    assert status == 200 and reply["edit"]["state"] == "revoked", reply
    assert complete_canary(url, ROME) == base and complete(url, ROME) == base
    assert [(h["op"], h["author"], h["note"]) for h in reply["history"]] == [
        ("add", "ann", ""), ("promote", "bob", ""), ("canary", "cid", "back"),
        ("revoke", "", "")]

    # refused transitions name the state and change nothing
    status, reply = call(url, "POST", "/v1/sola/edits/rome/promote")
    assert status == 409 and "it is revoked" in reply["error"]["message"], reply
    assert call(url, "POST", "/v1/sola/edits/rome/explode")[0] == 404
    status, reply = call(url, "POST", "/v1/sola/edits/twin/restore")
    assert status == 409 and "it is staged" in reply["error"]["message"], reply
    status, reply = call(url, "POST", "/v1/sola/edits?state=revoked", twin,
                         "application/octet-stream")
    assert status == 422 and "state" in reply["error"]["message"]
    # the staged twin (rome's LoRA under another id), promoted, routes for everyone
    status, reply = call(url, "POST", "/v1/sola/edits/twin/promote")
    assert status == 200 and reply["serving"]["state"] == "active", reply
    assert complete(url, ROME)[0] == " Rome."


def test_restart_loads_canary_edits_as_canary_and_leaves_staged_ones(server):
    url = server.url
    base = complete(url, OTHER.replace("Eiffel Tower", "Colosseum"))  # warm, unrelated
    assert call(url, "POST", "/v1/sola/edits/twin/stage")[0] == 200
    assert call(url, "POST", "/v1/sola/edits/rome/canary")[0] == 200
    plain = complete(url, ROME)
    assert "Rome" not in plain[0]
    server.stop()
    server.start()
    url = server.url
    states = {e["id"]: (e["state"], (e["serving"] or {}).get("state", "not loaded"))
              for e in call(url, "GET", "/v1/sola/edits")[1]["edits"]}
    assert states == {"rome": ("canary", "canary"), "twin": ("staged", "not loaded")}
    assert complete(url, ROME) == plain
    assert complete_canary(url, ROME)[0] == " Rome."
    assert complete(url, OTHER.replace("Eiffel Tower", "Colosseum")) == base
