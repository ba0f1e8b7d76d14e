"""Load: concurrent clients against a real server while edits are pushed, revoked and restored
every second. No request may fail, and every answer is exactly its prompt's base answer or
its edited answer (never a mix, never anything else), edited iff provenance names the edit,
and as the edit set in force dictates whenever no change overlapped the request.

Knobs: SOLA_RELIABILITY_SECONDS (default 45), SOLA_RELIABILITY_CLIENTS (4),
SOLA_RELIABILITY_SEED.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
from dataclasses import dataclass

import pytest
from reliability_helpers import (
    EDITS,
    UNRELATED,
    Answer,
    answer,
    knob,
    serving_states,
    train_edits,
)
from test_http_server import Server, call, push

pytestmark = pytest.mark.slow


@dataclass
class Served:
    answer: Answer
    sent: float  # monotonic time the request was sent
    done: float  # ...and its provenance came back


@dataclass
class Change:
    edit_id: str
    active: bool  # the edit's state once the change is acknowledged
    sent: float
    acked: float


class Changer(threading.Thread):
    """Pushes each edit, then revokes or restores a random one every second, until stopped."""

    def __init__(self, url: str, blobs: dict[str, bytes], rng: random.Random):
        super().__init__(daemon=True)
        self.url, self.blobs, self.rng = url, blobs, rng
        self.stop = threading.Event()
        self.changes: list[Change] = []
        self.failures: list[str] = []
        self.state: dict[str, bool] = {}

    def run(self) -> None:
        todo = list(self.blobs)
        while not self.stop.wait(1.0):
            try:
                edit_id = todo.pop(0) if todo else self.rng.choice(sorted(self.state))
                self.change(edit_id)
            except Exception as exc:  # noqa: BLE001 (every failure is reported)
                self.failures.append(repr(exc))

    def change(self, edit_id: str) -> None:
        sent = time.monotonic()
        if edit_id not in self.state:
            status, reply = push(self.url, self.blobs[edit_id])
            want, active = 201, True
        elif self.state[edit_id]:
            status, reply = call(self.url, "DELETE", f"/v1/sola/edits/{edit_id}")
            want, active = 200, False
        else:
            status, reply = call(self.url, "POST", f"/v1/sola/edits/{edit_id}/restore")
            want, active = 200, True
        if status != want:
            self.failures.append(f"{edit_id}: HTTP {status} {reply}")
            return
        self.state[edit_id] = active
        self.changes.append(Change(edit_id, active, sent, time.monotonic()))


def client(url: str, prompts: list[str], until: float, seed: int, served: list[Served],
           failures: list[str]) -> None:
    rng = random.Random(seed)
    while time.monotonic() < until:
        prompt = rng.choice(prompts)
        sent = time.monotonic()
        try:
            result = answer(url, prompt)
        except Exception as exc:  # noqa: BLE001 (every failure is reported)
            failures.append(f"{prompt!r}: {exc!r}")
            continue
        served.append(Served(result, sent, time.monotonic()))


def state_in_force(changes: list[Change], edit_id: str, sent: float, done: float) -> bool | None:
    """The edit's state for a request sent at `sent` and done at `done`: None if a change of
    that edit overlapped the request (it may then be either), else the state its last
    acknowledged change left (False before its push). Routing is per edit (the prompts are
    distinct), so changes of other edits do not matter; provenance checks that separately."""
    mine = [c for c in changes if c.edit_id == edit_id]
    if any(c.sent < done and c.acked > sent for c in mine):
        return None
    before = [c for c in mine if c.acked <= sent]
    return before[-1].active if before else False


def base_answers(url: str) -> dict[str, str]:
    prompts = [p for _, p, _ in EDITS] + UNRELATED
    replies = {p: answer(url, p) for p in prompts}
    assert all(r.edits == [] for r in replies.values()), replies
    return {p: r.text for p, r in replies.items()}


def edited_answers(url: str) -> dict[str, str]:
    """With every edit active (the changer has stopped): each edit's prompt, edited."""
    for edit_id, state in serving_states(url).items():
        if state != "active":
            status, reply = call(url, "POST", f"/v1/sola/edits/{edit_id}/restore")
            assert status == 200, reply
    edited = {}
    for edit_id, prompt, _ in EDITS:
        reply = answer(url, prompt)
        assert reply.edits == [edit_id], reply
        edited[prompt] = reply.text
    return edited


def check(served: list[Served], changes: list[Change], base: dict, edited: dict) -> dict:
    owner = {prompt: edit_id for edit_id, prompt, _ in EDITS}
    figures = {"edited": 0, "base": 0, "determined": 0}
    for s in served:
        a = s.answer
        edit_id = owner.get(a.prompt)
        if edit_id is None:  # unrelated prompts: always the base model
            assert (a.text, a.edits) == (base[a.prompt], []), a
            figures["base"] += 1
            continue
        is_edited = a.edits == [edit_id]
        assert is_edited or a.edits == [], a  # never routed to another prompt's edit
        want_text = edited[a.prompt] if is_edited else base[a.prompt]
        assert a.text == want_text, (a, "edited" if is_edited else "base", want_text)
        figures["edited" if is_edited else "base"] += 1
        in_force = state_in_force(changes, edit_id, s.sent, s.done)
        if in_force is not None:
            assert is_edited == in_force, (a, "edit in force" if in_force else "no edit")
            figures["determined"] += 1
    return figures


def test_clients_under_edit_churn_get_base_or_edited_answers(tmp_path, default_engine):
    seconds = knob("SOLA_RELIABILITY_SECONDS", 45)
    clients = knob("SOLA_RELIABILITY_CLIENTS", 4)
    rng = random.Random(knob("SOLA_RELIABILITY_SEED", 6))
    srv = Server(tmp_path / "store", tmp_path / "server.log")
    srv.start()  # boots while the edits are trained
    try:
        blobs = train_edits(default_engine)
        url = srv.url
        base = base_answers(url)
        assert all(base[p] != t for _, p, t in EDITS)
        prompts = [p for _, p, _ in EDITS] + UNRELATED
        served, failures = [], []
        changer = Changer(url, blobs, rng)
        until = time.monotonic() + seconds
        threads = [threading.Thread(target=client, args=(url, prompts, until, rng.random(),
                                                         served, failures))
                   for _ in range(clients)]
        changer.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        changer.stop.set()
        changer.join()
        assert failures == [] and changer.failures == []
        edited = edited_answers(url)
        assert all(edited[p] != base[p] for _, p, _ in EDITS)
        figures = check(served, changer.changes, base, edited)
    finally:
        srv.stop()
    ops = {k: len(list(g)) for k, g in itertools.groupby(
        sorted("add" if i < len(EDITS) else ("restore" if c.active else "revoke")
               for i, c in enumerate(changer.changes)))}
    print(f"\nreliability/load: {seconds} s, {clients} clients: {len(served)} requests served "
          f"({figures['edited']} edited, {figures['base']} base; {figures['determined']} of the "
          f"edited prompts' with no overlapping change of their edit checked against the edit "
          f"in force), "
          f"{len(changer.changes)} changes made {ops}, failures: 0")
    assert len(changer.changes) > len(EDITS) and figures["edited"] and figures["determined"]
