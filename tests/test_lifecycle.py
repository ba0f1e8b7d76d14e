"""The edit lifecycle (staged -> canary -> active -> revoked, with restore) in the store, the
reference engine and the CLI; and the pre-flight check (key collisions, locality probes)."""

from __future__ import annotations

import json

import pytest
from helpers import make_synthetic_edit

from sola_vllm.journal import TRANSITIONS, _encode
from sola_vllm.store import EditStore, StoreError, TransitionError

ALL_STATES = ("staged", "canary", "active", "revoked")


def _store_in(tmp_path, state: str) -> EditStore:
    """A store holding edit "e" in `state`, reached through the lifecycle's own ops."""
    store = EditStore(tmp_path / f"store-{state}")
    store.add(make_synthetic_edit("e"), state="staged" if state == "revoked" else state)
    if state == "revoked":
        store.transition("e", "revoke")
    return store


# --- the store ------------------------------------------------------------------------------------
def test_full_lifecycle_is_journaled_with_author_and_note(tmp_path):
    store = EditStore(tmp_path / "s")
    store.add(make_synthetic_edit("e"), author="ann", note="new", state="staged")
    assert store.get("e").state == "staged" and store.active() == []
    path = [("canary", "canary"), ("promote", "active"), ("revoke", "revoked"),
            ("restore", "active"), ("canary", "canary"), ("stage", "staged")]
    for op, state in path:
        assert store.transition("e", op, author="bob", note=f"to {state}") == state
        assert store.get("e").state == state
        assert [s["state"] for s in store.list()] == [state]
    history = store.history("e")
    assert [h["op"] for h in history] == ["add"] + [op for op, _ in path]
    assert history[0]["state"] == "staged" and history[0]["author"] == "ann"
    assert [(h["author"], h["note"]) for h in history[1:]] == [
        ("bob", f"to {state}") for _, state in path]
    # a fresh reader replays the same states
    assert EditStore(tmp_path / "s").get("e").state == "staged"


@pytest.mark.parametrize("state", ALL_STATES)
def test_every_refused_transition_names_the_state_and_changes_nothing(tmp_path, state):
    store = _store_in(tmp_path, state)
    journal = (store.path / "journal.jsonl").read_bytes()
    for op, (sources, target) in TRANSITIONS.items():
        if state in sources:
            continue
        with pytest.raises(TransitionError, match=f"it is (already )?{state}") as info:
            store.transition("e", op)
        assert info.value.state == state
        assert ("already" in str(info.value)) == (state == target)
    assert (store.path / "journal.jsonl").read_bytes() == journal
    assert store.get("e").state == state


def test_allowed_transitions_table(tmp_path):
    """Every (state, op) pair: allowed exactly where the table says, landing on its target."""
    for state in ALL_STATES:
        for op, (sources, target) in TRANSITIONS.items():
            store = _store_in(tmp_path / f"{state}-{op}", state)
            if state in sources:
                assert store.transition("e", op) == target
                assert store.get("e").state == target
            else:
                with pytest.raises(TransitionError):
                    store.transition("e", op)


def test_bad_op_and_initial_state_refused(tmp_path):
    store = EditStore(tmp_path / "s")
    with pytest.raises(StoreError, match="added as one of"):
        store.add(make_synthetic_edit("e"), state="revoked")
    assert not store.exists()
    store.add(make_synthetic_edit("e"))
    with pytest.raises(StoreError, match="unknown lifecycle op 'delete'"):
        store.transition("e", "delete")
    with pytest.raises(StoreError, match="unknown lifecycle op 'add'"):
        store.transition("e", "add")


def test_old_journal_without_lifecycle_loads_unchanged(tmp_path):
    """A journal written before the lifecycle (add / revoke / restore, add without "state")
    replays to the same states, and new ops append to it."""
    store = EditStore(tmp_path / "s")
    for seed, edit_id in enumerate("abc"):
        store.add(make_synthetic_edit(edit_id, seed=seed))
    shas = {s["id"]: s["sha256"] for s in store.list()}
    old = [{"time": 1.0, "op": "add", "id": i, "author": "", "note": "", "sha256": shas[i]}
           for i in "abc"]
    old += [{"time": 2.0, "op": "revoke", "id": "b", "author": "x", "note": ""},
            {"time": 3.0, "op": "revoke", "id": "c", "author": "x", "note": ""},
            {"time": 4.0, "op": "restore", "id": "c", "author": "x", "note": ""}]
    (store.path / "journal.jsonl").write_bytes(_encode(old, 0))
    assert store.problems() == []
    assert {s["id"]: s["state"] for s in store.list()} == {
        "a": "active", "b": "revoked", "c": "active"}
    assert [e.id for e in store.active()] == ["a", "c"]
    assert "state" not in store.history("a")[0]
    store.transition("a", "canary")
    assert store.get("a").state == "canary" and store.problems() == []


def test_export_import_keeps_lifecycle_states(tmp_path):
    store = EditStore(tmp_path / "s")
    for seed, state in enumerate(ALL_STATES):
        store.add(make_synthetic_edit(state, seed=seed), state="staged" if state == "revoked"
                  else state)
    store.transition("revoked", "revoke")
    copy = EditStore(tmp_path / "copy")
    copy.import_store(store.export_store(tmp_path / "out"))
    assert {s["id"]: s["state"] for s in copy.list()} == {s: s for s in ALL_STATES}
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {e["id"]: e["state"] for e in manifest["edits"]} == {s: s for s in ALL_STATES}


# --- the reference engine on the default model ----------------------------------------------------
ROME = "The capital of France is"
OTHER = "The Eiffel Tower is located in the city of"
TOKENS = 8


@pytest.fixture(scope="module")
def rome(default_engine):
    return default_engine.train([ROME], "Rome.", edit_id="rome")


def _answers(engine, canary: bool = False) -> list[list[int]]:
    return [g.token_ids for g in engine.generate([ROME, OTHER], TOKENS, canary=canary)]


def test_canary_routes_only_for_requests_that_opt_in(fresh_edits, rome):
    from dataclasses import replace

    engine = fresh_edits
    base = _answers(engine)
    engine.add(replace(rome, state="staged"))
    assert _answers(engine) == base and _answers(engine, canary=True) == base  # staged: never
    engine.set_state("rome", "canary")
    assert _answers(engine) == base  # no opt-in: exactly the base model
    opted = engine.generate([ROME, OTHER], TOKENS, canary=True)
    assert opted[0].text.startswith(" Rome.") and opted[0].route.edit_id == "rome"
    assert opted[1].token_ids == base[1] and opted[1].route.edit_id is None
    engine.set_state("rome", "active")  # promoted: every request routes
    plain = engine.generate([ROME], TOKENS)[0]
    assert plain.text.startswith(" Rome.") and plain.route.edit_id == "rome"
    assert _answers(engine, canary=True) == _answers(engine)
    engine.set_state("rome", "revoked")
    assert _answers(engine) == base and _answers(engine, canary=True) == base


# --- pre-flight check: CLI on a store -------------------------------------------------------------
def _cli(capsys, *argv) -> tuple[int, dict | str]:
    from sola_vllm.cli import main

    code = main([*argv])
    out = capsys.readouterr()
    if "--json" in argv:
        return code, json.loads(out.out)
    return code, out.out + out.err


def _far(engine, rome):
    """An edit on an unrelated prompt (rome's LoRA, the engine's own key for OTHER)."""
    from dataclasses import replace

    return replace(rome, id="far", prompts=[OTHER], keys=engine.key_queries([OTHER]))


def test_collision_refused_names_the_other_edit_and_force_overrides(tmp_path, capsys, rome,
                                                                     default_engine):
    from dataclasses import replace

    store = EditStore(tmp_path / "s")
    store.add(rome, author="ann")
    store.add(_far(default_engine, rome), state="staged")
    twin = tmp_path / "twin.safetensors"
    twin.write_bytes(replace(rome, id="twin", target="Paris.").to_bytes())
    journal = (store.path / "journal.jsonl").read_bytes()

    code, out = _cli(capsys, "edit", "import", "--store", str(store.path), str(twin))
    assert code == 2 and "collides with routed edit(s) ['rome']" in out
    assert f"its prompt {ROME!r} is at cosine distance" in out
    assert (store.path / "journal.jsonl").read_bytes() == journal
    # a canary edit routes too: still refused; `edit check` reports it without adding
    store.transition("rome", "canary")
    code, report = _cli(capsys, "edit", "check", "--store", str(store.path), "--file", str(twin),
                        "--json")
    assert code == 1 and report["passed"] is False
    assert [(c["edit"], c["state"], c["prompt"], c["other_prompt"])
            for c in report["store"]["collisions"]] == [("rome", "canary", ROME, ROME)]
    assert report["store"]["collisions"][0]["distance"] == pytest.approx(0.0, abs=1e-6)
    assert [s["id"] for s in store.list()] == ["rome", "far"]
    # the training path refuses before it trains
    code, out = _cli(capsys, "edit", "train", "--store", str(store.path), "--prompt", ROME,
                     "--target", "Paris.", "--id", "paris")
    assert code == 2 and "['rome']" in out and "paris" not in {s["id"] for s in store.list()}

    code, reply = _cli(capsys, "edit", "import", "--store", str(store.path), str(twin),
                       "--force", "--state", "staged", "--json")
    assert code == 0 and reply["check"]["collisions"][0]["edit"] == "rome"
    assert store.get("twin").state == "staged"
    store.transition("rome", "revoke")  # revoked and staged edits do not route: no collision
    code, report = _cli(capsys, "edit", "check", "--store", str(store.path), "--file", str(twin),
                        "--json")
    assert code == 0 and report["store"]["collisions"] == [] and report["passed"] is True


def test_probe_report_lists_exactly_the_prompts_that_route(tmp_path, capsys, rome,
                                                           fresh_edits):
    engine = fresh_edits
    far = _far(engine, rome)
    store = EditStore(tmp_path / "s")
    store.add(far)
    artifact = tmp_path / "rome.safetensors"
    artifact.write_bytes(rome.to_bytes())
    probes = [ROME, "The capital of France is", "The capital city of France is", OTHER,
              "Paris is the capital of", "The capital of Italy is", "Hello, my name is"]
    (tmp_path / "probes.txt").write_text("\n".join(probes) + "\n")

    code, report = _cli(capsys, "edit", "check", "--store", str(store.path), "--file",
                        str(artifact), "--probes", str(tmp_path / "probes.txt"), "--json")
    assert code == 0, report
    check = report["store"]
    # ground truth: route the probes through the engine with both edits routed
    engine.add_all([far, rome])
    _, routes = engine.last_logits(probes)
    want = [p for p, r in zip(probes, routes, strict=True) if r.edit_id == "rome"]
    assert check["routes_to_new"] == want
    assert [r["route"] for r in check["probes"]] == [r.edit_id for r in routes]
    assert ROME in want and OTHER not in want and len(want) < len(probes)
    assert [p["prompt"] for p in check["probes"]] == probes


# --- the serving runtime (no vLLM) ---------------------------------------------------------------
def test_runtime_routes_canary_edits_only_for_requests_that_opt_in():
    import dataclasses

    import torch
    from test_serving_runtime import edit, make_runtime, step

    from sola_vllm.preflight import KeyGroup
    from sola_vllm.serving.runner_hooks import opts_in_to_canary

    runtime = make_runtime()
    e0, e1 = edit(0), edit(1)
    runtime.add_edit(e0, e0.keys)
    runtime.add_edit(e1, e1.keys, active=False)
    assert runtime.set_state("e1", "canary")["state"] == "canary"
    hidden = torch.cat([e1.keys, e1.keys, e0.keys, e0.keys])  # one key token per request
    runtime.step = step(["plain", "opted", "plain0", "opted0"], [1] * 4, [[0]] * 4)
    runtime.step.canary = [False, True, False, True]
    runtime.route(hidden)
    assert runtime.routes == {"plain": -1, "opted": 1, "plain0": 0, "opted0": 0}
    runtime.finish_requests(list(runtime.routes))
    for state, plain, opted in (("staged", -1, -1), ("active", 1, 1), ("revoked", -1, -1)):
        runtime.set_state("e1", state)
        runtime.step = step(["p", "o"], [1, 1], [[0], [0]])
        runtime.step.canary = [False, True]
        runtime.route(torch.cat([e1.keys, e1.keys]))
        assert runtime.routes == {"p": plain, "o": opted}, state
        runtime.finish_requests(["p", "o"])
    # a canary fraction of 1 opts every request in; 0 (the default) none
    runtime.set_state("e1", "canary")
    runtime.config = dataclasses.replace(runtime.config, canary_fraction=1.0)
    runtime.step = step(["x"], [1], [[0]])
    runtime.route(e1.keys)
    assert runtime.routes == {"x": 1}
    assert [opts_in_to_canary(v) for v in (True, 1, "true", "1", None, 0, "no", 2)] == [
        True, True, True, True, False, False, False, False]
    # the runtime's pre-flight sees canary and active edits, with the captured keys
    report = runtime.preflight(KeyGroup("new", "active", e1.keys.clone(), ["p"]), [], None)
    assert [(c["edit"], c["state"]) for c in report["collisions"]] == [("e1", "canary")]


def test_cli_transitions_on_a_store_are_journaled(tmp_path, capsys):
    store = EditStore(tmp_path / "s")
    store.add(make_synthetic_edit("e"), state="staged")
    where = ["--store", str(store.path)]
    for op, state in (("canary", "canary"), ("promote", "active"), ("stage", "staged")):
        code, reply = _cli(capsys, "edit", op, *where, "e", "--author", "ann", "--note", op,
                           "--json")
        assert code == 0 and reply["state"] == state == store.get("e").state
    code, out = _cli(capsys, "edit", "restore", *where, "e")
    assert code == 2 and "cannot restore edit 'e': it is staged" in out
    assert [(h["op"], h["author"], h["note"]) for h in store.history("e")[1:]] == [
        ("canary", "ann", "canary"), ("promote", "ann", "promote"), ("stage", "ann", "stage")]
    code, out = _cli(capsys, "edit", "check", *where, "--file", str(tmp_path / "missing"))
    assert code == 2 and "missing" in out


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_canary_fraction_is_validated(fraction):
    from sola_vllm.serving.config import ServingConfig

    with pytest.raises(ValueError, match="canary_fraction"):
        ServingConfig("llama", (1,), ("mlp.up_proj",), "s" * 64, "m" * 64,
                      canary_fraction=fraction)
