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
