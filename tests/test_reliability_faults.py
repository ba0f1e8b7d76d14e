"""Faults: the server is killed with SIGKILL (its whole process group) at a random moment of
an add, revoke or restore, many times over one store. After each kill the store loads with
nothing half-written, and the restarted server serves exactly what the store says: its
serving state per edit matches the store's, and each edit's prompt is answered edited iff
the edit is active.

Kills cycle through add, revoke and restore (the change before each is chosen so that the
next can happen). Each kill costs a server restart (about a minute on a small CPU). Knobs:
SOLA_RELIABILITY_KILLS (default 3), SOLA_RELIABILITY_SEED. Store-level SIGKILLs of writers
(hundreds of them, no server) are in test_store_crash.py.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from reliability_helpers import EDITS, answer, knob, serving_states, train_edits
from test_http_server import Server, call, push
from test_store_crash import check_store

from sola_vllm.store import EditStore

pytestmark = pytest.mark.slow
MAX_DELAY_S = {"add": 0.6, "revoke": 0.15, "restore": 0.3}  # roughly each change's duration


def store_states(path: Path) -> tuple[dict[str, str], list[str]]:
    """(state by id, the harmless leftovers repaired). Asserts nothing is half-written:
    every journal entry's artifact exists and verifies, only a kill's debris is reported,
    and after the repair fsck finds nothing."""
    store = EditStore(path)
    if not store.exists():  # killed before the first push created it
        return {}, []
    if (path / "journal.jsonl").exists():
        check_store(path)  # only a kill's debris; journal replay == loaded edits; sha256s match
    else:  # killed between creating the store and its first journal line
        assert store.load().edits == []
    leftovers = store.load().problems
    store.fsck(repair=True)
    assert store.fsck() == [] and store.problems() == []
    assert not [p for p in path.rglob("*") if ".tmp-" in p.name], "temporary files remain"
    return {e.id: e.state for e in store.load().edits}, leftovers


OPS = ("add", "revoke", "restore")


def possible(blobs: dict, states: dict) -> dict[str, list[str]]:
    """The edits each change can apply to now."""
    return {"add": sorted(set(blobs) - set(states)),
            "revoke": sorted(i for i, s in states.items() if s == "active"),
            "restore": sorted(i for i, s in states.items() if s == "revoked")}


def start_change(url: str, blobs: dict, states: dict, rng: random.Random, want: str | None = None):
    """A change in a thread (`want` if any edit allows it, else a random possible one);
    returns (op, edit id, thread, its reply list)."""
    options = possible(blobs, states)
    op = want if options.get(want) else rng.choice([o for o in OPS if options[o]])
    edit_id = rng.choice(options[op])
    send = {"add": lambda: push(url, blobs[edit_id]),
            "revoke": lambda: call(url, "DELETE", f"/v1/sola/edits/{edit_id}"),
            "restore": lambda: call(url, "POST", f"/v1/sola/edits/{edit_id}/restore")}[op]
    replies: list = []

    def run() -> None:
        try:
            replies.append(send())
        except OSError as exc:  # the connection died with the server
            replies.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return op, edit_id, thread, replies


def preparing(want: str) -> str:
    """The change to make (and time) before killing a `want`: one that leaves an edit `want`
    can apply to (a revoke before a restore, an add or restore before a revoke)."""
    return {"add": "revoke", "revoke": "add", "restore": "revoke"}[want]


def kill(srv: Server) -> None:
    os.killpg(srv.proc.pid, signal.SIGKILL)
    srv.proc.wait(timeout=60)


def check_serving(url: str, states: dict[str, str], base: dict, edited: dict) -> None:
    """The restarted server routes exactly what the store says."""
    want = {i: "active" if s == "active" else "not loaded" for i, s in states.items()}
    assert serving_states(url) == want
    for edit_id, prompt, _ in EDITS:
        reply = answer(url, prompt)
        if states.get(edit_id) == "active":
            assert reply.edits == [edit_id], reply
            edited.setdefault(prompt, reply.text)  # first sighting; then always the same
            assert reply.text == edited[prompt] != base[prompt], reply
        else:
            assert (reply.edits, reply.text) == ([], base[prompt]), reply


def change_and_measure(url, blobs, states, rng, took: dict, want: str) -> dict[str, str]:
    """One change that is not killed: acknowledged, and seen in the store. Its duration tells
    a later kill of that kind of change when to strike."""
    started = time.monotonic()
    op, edit_id, thread, replies = start_change(url, blobs, states, rng, want)
    thread.join()
    took[op] = time.monotonic() - started
    assert isinstance(replies[0], tuple) and replies[0][0] in (200, 201), replies
    return {**states, edit_id: "revoked" if op == "revoke" else "active"}


def kill_during_change(srv, blobs, states, rng, took: dict, want: str) -> tuple[str, str, bool]:
    """(op, edit id, acknowledged before the kill) of a change killed at a random moment."""
    op, edit_id, thread, replies = start_change(srv.url, blobs, states, rng, want)
    time.sleep(rng.uniform(0, took.get(op, MAX_DELAY_S[op])))
    kill(srv)
    thread.join(timeout=60)
    reply = replies[0] if replies else None
    return op, edit_id, isinstance(reply, tuple) and reply[0] in (200, 201)


def test_sigkill_during_changes_leaves_store_and_routing_in_step(tmp_path, default_engine):
    kills = knob("SOLA_RELIABILITY_KILLS", 3)
    rng = random.Random(knob("SOLA_RELIABILITY_SEED", 6))
    path = tmp_path / "store"
    srv = Server(path, tmp_path / "server.log")
    srv.start()
    figures = {"acked before the kill": 0, "leftovers repaired": 0, "changes": 0}
    ops: dict[str, int] = {}
    states, edited, took = {}, {}, {}
    try:
        blobs = train_edits(default_engine)
        base = {p: answer(srv.url, p).text for _, p, _ in EDITS}
        for i in range(kills):
            want = OPS[i % len(OPS)]  # kills cycle through add, revoke and restore
            states = change_and_measure(srv.url, blobs, states, rng, took, preparing(want))
            assert {e.id: e.state for e in EditStore(path).load().edits} == states
            op, edit_id, acked = kill_during_change(srv, blobs, states, rng, took, want)
            figures["changes"] += 2
            ops[op] = ops.get(op, 0) + 1
            before = states.get(edit_id)
            states, leftovers = store_states(path)
            figures["leftovers repaired"] += len(leftovers)
            after = "revoked" if op == "revoke" else "active"
            # a change is atomic: done or not; acknowledged means done
            assert states.get(edit_id) in (before, after), (op, edit_id, states)
            assert not acked or states[edit_id] == after, (op, edit_id, states)
            figures["acked before the kill"] += acked
            srv.start()
            check_serving(srv.url, states, base, edited)
    finally:
        srv.stop()
    print(f"\nreliability/faults: {sum(ops.values())} kills survived (during {ops}; "
          f"{figures['acked before the kill']} acknowledged just before the kill), "
          f"{figures['changes']} changes made, {figures['leftovers repaired']} harmless "
          f"leftovers repaired, final store {states}, failures: 0")
