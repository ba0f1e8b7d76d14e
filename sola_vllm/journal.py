"""The edit store's journal: append-only JSON lines, each carrying a checksum of itself.

`journal.jsonl` holds one object per line, ``{"seq", "time", "op", "id", "author", "note",
["sha256" and optional "state" for "add"], "crc"}``, where crc is `config.fingerprint` of the
rest. Replaying the lines in order gives every edit's state: "add" starts an edit in its
"state" (active when absent, as every journal written before the lifecycle has it), and each
other op moves it along `TRANSITIONS` (the one table of the edit lifecycle):

    staged  (stored, not routed) --canary--> canary (routed for requests that opt in)
            --promote--> active (routed for every request) --revoke--> revoked --restore--> active
A bad *last* line is a torn write (a writer killed mid-append): readers ignore it and the next
writer truncates it. A bad line before the last is corruption: reported, skipped, never deleted.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .config import fingerprint
from .edit import STATES as STATES  # re-exported: the lifecycle's states
from .edit import validate_id

INITIAL_STATES = ("staged", "canary", "active")  # what "add" may start an edit in
# op -> (the states it applies to, the state it leads to); a state not listed is refused.
# Every step has an inverse step, so a server can undo a store change the engine refused.
TRANSITIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "stage": (("canary", "active", "revoked"), "staged"),
    "canary": (("staged", "active", "revoked"), "canary"),
    "promote": (("staged", "canary"), "active"),
    "revoke": (("staged", "canary", "active"), "revoked"),
    "restore": (("revoked",), "active"),
}
OPS = ("add", *TRANSITIONS)


def inverse_op(op: str, previous: str) -> str:
    """The op that takes an edit back from where `op` led to `previous`."""
    target = TRANSITIONS[op][1]
    return next(o for o, (sources, to) in TRANSITIONS.items()
                if to == previous and target in sources)


def transition_problem(op: str, edit_id: str, state: str) -> str | None:
    """Why `op` cannot apply to an edit in `state` (a message naming both), or None."""
    sources, target = TRANSITIONS[op]
    if state in sources:
        return None
    if state == target:
        return f"cannot {op} edit {edit_id!r}: it is already {state}"
    return (f"cannot {op} edit {edit_id!r}: it is {state}; {op} applies to an edit that is "
            f"{' or '.join(sources)}")


@dataclass
class _Record:
    """An edit as the journal describes it."""

    id: str
    sha256: str
    state: str
    added: float
    author: str
    note: str


@dataclass
class _Journal:
    entries: list[dict]  # valid lines, in file order
    problems: list[str]  # corrupt lines that are not the last line
    good_size: int  # bytes up to the end of the last line kept; beyond is a torn tail
    size: int
    next_seq: int

    @property
    def torn(self) -> bool:
        return self.good_size < self.size


def _entry(op: str, edit_id: str, author: str, note: str, sha256: str | None = None,
           state: str = "active") -> dict:
    entry = {"time": time.time(), "op": op, "id": edit_id, "author": author, "note": note}
    if sha256 is not None:
        entry["sha256"] = sha256
    if state != "active":  # an add without "state" is active: old journals read unchanged
        entry["state"] = state
    return entry


def _encode(entries: list[dict], first_seq: int) -> bytes:
    """Whole journal lines for `entries`, numbered from `first_seq`, each with its crc."""
    lines = []
    for seq, entry in enumerate(entries, start=first_seq):
        entry = {"seq": seq, **entry}
        entry["crc"] = fingerprint(entry)  # over the canonical (sorted-key) JSON
        lines.append(json.dumps(entry, separators=(",", ":")).encode() + b"\n")
    return b"".join(lines)


def _parse_line(raw: bytes) -> dict:
    """One journal line, or ValueError saying what is wrong with it."""
    entry = json.loads(raw)
    if not isinstance(entry, dict) or "crc" not in entry:
        raise ValueError("not a journal entry")
    body = {k: v for k, v in entry.items() if k != "crc"}
    if fingerprint(body) != entry["crc"]:
        raise ValueError("checksum mismatch")
    if entry.get("op") not in OPS:
        raise ValueError(f"unknown op {entry.get('op')!r}")
    validate_id(entry.get("id"))
    if not isinstance(entry.get("seq"), int) or not isinstance(entry.get("time"), int | float):
        raise ValueError("bad seq or time")
    if not all(isinstance(entry.get(k), str) for k in ("author", "note")):
        raise ValueError("bad author or note")
    sha = entry.get("sha256")
    if entry["op"] == "add" and not (isinstance(sha, str) and len(sha) == 64):
        raise ValueError("add without a sha256")
    if entry["op"] == "add" and entry.get("state", "active") not in INITIAL_STATES:
        raise ValueError(f"add with state {entry.get('state')!r}")
    return entry


def _parse_journal(data: bytes, path: Path) -> _Journal:
    """Valid entries; a bad *last* line (or unterminated tail) is a torn write, not corruption."""
    *complete, tail = data.split(b"\n")
    parsed: list[tuple[int, dict | None, str]] = []  # (end offset, entry, error)
    offset = 0
    for number, raw in enumerate(complete, start=1):
        offset += len(raw) + 1
        try:
            parsed.append((offset, _parse_line(raw), ""))
        except ValueError as exc:
            parsed.append((offset, None, f"{path}: line {number} is corrupt ({exc}); ignored"))
    if not tail and parsed and parsed[-1][1] is None:
        parsed.pop()  # the last complete line is bad: treat it as the torn write
    good_size = parsed[-1][0] if parsed else 0
    entries = [entry for _, entry, _ in parsed if entry is not None]
    problems = [error for _, entry, error in parsed if entry is None]
    next_seq = max((e["seq"] for e in entries), default=-1) + 1
    return _Journal(entries, problems, good_size, len(data), next_seq)


def _replay(entries: list[dict], path: Path) -> tuple[dict[str, _Record], list[str]]:
    """State of every edit: "add" starts it, the other ops move it along `TRANSITIONS`."""
    records: dict[str, _Record] = {}
    problems = []
    for e in entries:
        rec = records.get(e["id"])
        if e["op"] == "add":
            if rec is None:
                records[e["id"]] = _Record(e["id"], e["sha256"], e.get("state", "active"),
                                           e["time"], e["author"], e["note"])
                continue
        elif rec is not None and transition_problem(e["op"], e["id"], rec.state) is None:
            rec.state = TRANSITIONS[e["op"]][1]
            continue
        problems.append(f"{path}: entry seq {e['seq']} ({e['op']} {e['id']!r}) does not apply "
                        "to the edit's state; ignored")
    return records, problems
