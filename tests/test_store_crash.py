"""Crash safety: writers killed with SIGKILL at random moments never leave a half-written edit
visible, the journal replays to consistent states, and the next writer carries on."""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from store_writer import small_edit

from sola_vllm.store import EditStore

WRITER = Path(__file__).with_name("store_writer.py")
ITERATIONS = 30
TIME_BUDGET_S = 25.0
# what a killed writer may legitimately leave behind (invisible, removed by fsck(repair=True))
HARMLESS = ("incomplete last line", "orphan artifact", "leftover temporary file")


def replay_journal(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Independent replay: (states, sha256 by id). Only the last line may be torn."""
    data = (path / "journal.jsonl").read_bytes()
    raw_lines = data.split(b"\n")
    states, shas, seqs = {}, {}, []
    for number, raw in enumerate(raw_lines):
        last = number == len(raw_lines) - 1
        try:
            entry = json.loads(raw)
        except ValueError:
            assert last, f"journal line {number + 1} is corrupt but not the last line"
            continue
        assert not last, "an unterminated last line parsed as a complete entry"
        seqs.append(entry["seq"])
        if entry["op"] == "add":
            assert entry["id"] not in states
            states[entry["id"]], shas[entry["id"]] = "active", entry["sha256"]
        else:
            assert states[entry["id"]] == ("active" if entry["op"] == "revoke" else "revoked")
            states[entry["id"]] = "revoked" if entry["op"] == "revoke" else "active"
    assert seqs == list(range(len(seqs))), "journal seqs are not consecutive"
    return states, shas


def check_store(path: Path) -> int:
    loaded = EditStore(path).load()
    unexpected = [p for p in loaded.problems if not any(h in p for h in HARMLESS)]
    assert unexpected == []
    states, shas = replay_journal(path)
    assert {e.id: e.state for e in loaded.edits} == states  # every committed edit loads
    for edit_id, sha in shas.items():
        blob = (path / "edits" / f"{edit_id}.safetensors").read_bytes()
        assert hashlib.sha256(blob).hexdigest() == sha
    listed = {s["id"]: s["state"] for s in EditStore(path).list()}
    assert listed == states
    return len(states)


def test_sigkilled_writers_leave_a_consistent_store(tmp_path):
    rng = random.Random(20240607)
    path = tmp_path / "store"
    EditStore.create(path)
    errors = open(tmp_path / "writer.err", "w")  # noqa: SIM115 (closed in finally)
    server = subprocess.Popen([sys.executable, str(WRITER), str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors,
                              text=True)

    def ask(command: str) -> int:
        server.stdin.write(command + "\n")
        server.stdin.flush()
        return int(server.stdout.readline())

    start, done, edits = time.monotonic(), 0, 0
    try:
        for i in range(ITERATIONS):
            if time.monotonic() - start > TIME_BUDGET_S:
                break
            pid = ask(f"churn {i} w{i}")
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(pid, signal.SIGKILL)
            status = ask(f"reap {pid}")
            assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, \
                (tmp_path / "writer.err").read_text()  # the writer must die by our kill
            check_store(path)
            store = EditStore(path, lock_timeout=5.0)  # the lock died with the writer
            store.add(small_edit(f"after-{i}", seed=10_000 + i))
            assert store.get(f"after-{i}").state == "active"
            if i % 5 == 4:
                store.fsck(repair=True)
                assert store.problems() == []
            edits = check_store(path)
            done += 1
    finally:
        server.stdin.close()
        server.wait(timeout=30)
        errors.close()
    assert done >= 10, f"only {done} kill iterations fit in the time budget"
    assert edits > 2 * done, "the writers barely wrote anything before being killed"
