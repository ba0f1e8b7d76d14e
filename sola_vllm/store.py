"""The on-disk edit store: immutable edit artifacts plus an append-only, checksummed journal.

SoLA (arXiv 2603.11239) keeps every edit as its own frozen LoRA, so revoking or restoring an
edit is one journal line and never rewrites an artifact. A store directory holds::

    store.json               {"format": "sola-vllm-store", "version": 1, [pinned fingerprints]}
    journal.jsonl            one JSON object per line: add and the lifecycle's transitions
                             (stage / canary / promote / revoke / restore), each with a crc
    edits/<id>.safetensors   immutable artifacts (`Edit.to_bytes()`)
    .lock                    flock target that serialises writers (readers take no lock)

Crash safety: an artifact is written to a `.tmp-` file, fsynced and renamed into place *before*
its journal "add" line is appended; that append is the commit point. A killed writer can leave an
orphan artifact (invisible; `fsck(repair=True)` removes it), a `.tmp-` file, or a torn last
journal line (ignored by readers, truncated by the next writer). The first edit added pins the
store's model and shape fingerprints in store.json; later foreign edits are refused.

The journal's line format and replay live in `journal`, the fsync/rename/lock primitives in
`fsutil`, the export directory format in `store_export`, the errors in `store_errors`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from .edit import META_KEY, Edit, EditFormatError
from .fsutil import (
    TMP_PREFIX,
    _append,
    _atomic_write,
    _flock,
    _json_bytes,
    _read_file,
    _read_header,
    _truncate,
    _write_or_fail,
)
from .journal import (
    INITIAL_STATES,
    _encode,
    _entry,
    _Journal,
    _parse_journal,
    _Record,
    _replay,
    transition_problem,
)
from .journal import OPS as OPS  # re-exported: the journal's ops
from .journal import TRANSITIONS as TRANSITIONS  # re-exported: the lifecycle's table
from .store_errors import StoreError, TransitionError, UnknownEditError, _check_id, _check_text
from .store_export import _FINGERPRINTS, _Incoming, _read_export, _write_export
from .store_export import EXPORT_FORMAT as EXPORT_FORMAT  # re-exported: the manifest's format

__all__ = ["EditStore", "StoreError", "TransitionError", "UnknownEditError"]

STORE_FORMAT = "sola-vllm-store"
STORE_VERSION = 1
_SUMMARY_FIELDS = ("prompts", "target", "created", "arch", "layers", "modules", "rank", "scale",
                   "model_fingerprint", "shape_fingerprint", "train_info", "key_pool",
                   "route_layer")


class Loaded(NamedTuple):
    edits: list[Edit]  # every edit whose artifact verified, in journal order
    problems: list[str]  # human-readable; empty for a healthy store


@dataclass
class _Snapshot:
    meta: dict
    journal: _Journal
    records: dict[str, _Record]  # by id, in order of their "add" line
    problems: list[str]


class EditStore:
    """Directory of edits; see the module docstring for the layout and crash guarantees."""

    def __init__(self, path: str | os.PathLike, lock_timeout: float | None = 60.0) -> None:
        self.path = Path(path)
        self.lock_timeout = lock_timeout  # seconds a writer waits for the lock; None: forever

    def __repr__(self) -> str:
        return f"EditStore({str(self.path)!r})"

    @classmethod
    def create(cls, path: str | os.PathLike, model_fingerprint: str | None = None,
               shape_fingerprint: str | None = None,
               lock_timeout: float | None = 60.0) -> EditStore:
        """Create an empty store, optionally pinned to a model and a layer set (shape)."""
        store = cls(path, lock_timeout)
        with store._writing(init=False, create=True):
            if store._meta_path.exists():
                raise StoreError(f"an edit store already exists at {store.path}")
            pins = {"model_fingerprint": model_fingerprint, "shape_fingerprint": shape_fingerprint}
            store._init_locked({k: v for k, v in pins.items() if v is not None})
        return store

    # --- reading (no lock) --------------------------------------------------------------------
    def info(self) -> dict:
        """store.json: format, version and the pinned fingerprints (if any)."""
        return self._read_meta()

    def get(self, edit_id: str) -> Edit:
        """The edit exactly as stored (verified against the journal's sha256), with `state`
        from the journal."""
        return self._load_record(self._record(self._snapshot(), edit_id))

    def load(self) -> Loaded:
        """Every edit that verifies, plus a description of everything wrong with the store."""
        snap = self._snapshot()
        edits, problems = self._load_all(snap)
        return Loaded(edits, problems + self._leftover_messages(snap))

    def all(self) -> list[Edit]:
        return self.load().edits

    def active(self) -> list[Edit]:
        return [e for e in self.load().edits if e.state == "active"]

    def problems(self) -> list[str]:
        return self.load().problems

    def list(self) -> list[dict]:
        """Summaries in journal order, read from the artifact headers (tensors are not loaded).

        A summary whose artifact cannot be read carries a `problem` entry instead of its metadata.
        """
        return [self._summary(rec) for rec in self._snapshot().records.values()]

    def first_summary(self) -> dict | None:
        """The summary of the first edit in journal order whose artifact header reads (what
        every edit of a store shares: layer set, model, key reading); None if there is none.
        Stops at that edit: the other headers are not read."""
        for rec in self._snapshot().records.values():
            summary = self._summary(rec)
            if "problem" not in summary:
                return summary
        return None

    def history(self, edit_id: str) -> list[dict]:
        """Journal entries of one edit (seq, time, op, author, note, sha256 for "add")."""
        edit_id = _check_id(edit_id)
        entries = [{k: v for k, v in e.items() if k != "crc"}
                   for e in self._snapshot().journal.entries if e["id"] == edit_id]
        if not entries:
            raise UnknownEditError(f"no edit {edit_id!r} in the store {self.path}")
        return entries

    # --- writing (under the lock) ---------------------------------------------------------------
    def add(self, edit: Edit, author: str = "", note: str = "", state: str = "active") -> None:
        """Store a new edit in `state` (staged, canary or active). A duplicate id or a foreign
        fingerprint is refused.

        `author` / `note` describe this operation in the journal (`history()`, and `added_by` /
        `add_note` in `list()`); the artifact keeps the edit's own author / note unchanged.
        """
        _check_id(edit.id)
        _check_initial(state)
        try:
            edit.validate()
        except EditFormatError as exc:
            raise StoreError(f"refusing to store edit {edit.id!r}: {exc}") from exc
        self._add_all([_Incoming(edit, edit.to_bytes(), state, author, note)])

    def transition(self, edit_id: str, op: str, author: str = "", note: str = "") -> str:
        """Move an edit along the lifecycle (`journal.TRANSITIONS`): stage, canary, promote,
        revoke or restore. -> the new state. A transition the edit's state does not allow
        raises `TransitionError` naming the current state."""
        if op not in TRANSITIONS:
            raise StoreError(f"unknown lifecycle op {op!r}; expected one of {list(TRANSITIONS)}")
        self._transition(edit_id, op, author, note)
        return TRANSITIONS[op][1]

    def revoke(self, edit_id: str, author: str = "", note: str = "") -> None:
        self._transition(edit_id, "revoke", author, note)

    def restore(self, edit_id: str, author: str = "", note: str = "") -> None:
        self._transition(edit_id, "restore", author, note)

    def fsck(self, repair: bool = False) -> list[str]:
        """Problems found; with `repair`, also remove what interrupted writers left behind
        (torn journal tail, orphan artifacts, temporary files). Corrupt or missing artifacts
        and corrupt journal lines are reported, never deleted."""
        if not repair:
            return self.problems()
        with self._writing():
            snap = self._snapshot()
            report = self._load_all(snap)[1]
            try:
                if snap.journal.torn:
                    _truncate(self._journal_path, snap.journal.good_size)
                    report.append(f"{self._torn_message(snap)}: removed")
                for path, message in self._leftovers(snap):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    report.append(f"{message}: removed")
            except OSError as exc:
                raise StoreError(f"cannot repair the edit store {self.path}: {exc}") from exc
        return report

    # --- import / export ----------------------------------------------------------------------
    def export_edit(self, edit_id: str, path: str | os.PathLike) -> Path:
        """Write the stored artifact, byte for byte, to `path` (a file, or a directory to write
        `<id>.safetensors` into). Returns the file written."""
        rec = self._record(self._snapshot(), edit_id)
        blob = self._verified_blob(rec)
        out = Path(path)
        if out.is_dir():
            out = out / f"{rec.id}.safetensors"
        _write_or_fail(out, blob, "cannot export")
        return out

    def import_edit(self, path: str | os.PathLike, author: str = "", note: str = "",
                    state: str = "active") -> Edit:
        """Validate an artifact file and add it in `state`, keeping its bytes unchanged."""
        _check_initial(state)
        blob = _read_file(Path(path))
        try:
            edit = Edit.from_bytes(blob)
        except EditFormatError as exc:
            raise StoreError(f"{path} is not a valid edit artifact: {exc}") from exc
        self._add_all([_Incoming(edit, blob, state, author, note)])
        return edit

    def export_store(self, out_dir: str | os.PathLike) -> Path:
        """Write every edit's artifact plus `manifest.json` (journal order, states, sha256) into
        a new or empty directory, which is returned. Refused if any artifact is missing or
        corrupt."""
        out = Path(out_dir)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise StoreError(f"export directory {out} exists and is not an empty directory")
        snap = self._snapshot()
        blobs = [(rec, self._verified_blob(rec)) for rec in snap.records.values()]
        _write_export(out, blobs, snap.meta, STORE_VERSION)
        return out

    def import_store(self, src_dir: str | os.PathLike) -> list[str]:
        """Add every edit of an `export_store` directory with its state and its exact bytes.
        Everything is validated before anything is written. Returns the ids imported."""
        items = _read_export(Path(src_dir))
        self._add_all(items)
        return [item.edit.id for item in items]

    def exists(self) -> bool:
        """Whether a store has been created here (by `create` or a first write)."""
        return self._meta_path.exists()

    # --- paths --------------------------------------------------------------------------------
    @property
    def _meta_path(self) -> Path:
        return self.path / "store.json"

    @property
    def _journal_path(self) -> Path:
        return self.path / "journal.jsonl"

    @property
    def _edits_dir(self) -> Path:
        return self.path / "edits"

    def _artifact_path(self, edit_id: str) -> Path:
        return self._edits_dir / f"{_check_id(edit_id)}.safetensors"

    # --- snapshot and verification ------------------------------------------------------------
    def _read_meta(self) -> dict:
        if not self.path.is_dir():
            raise StoreError(f"no edit store at {self.path}: the directory does not exist")
        try:
            meta = json.loads(self._meta_path.read_bytes())
        except FileNotFoundError:
            raise StoreError(f"{self.path} is not an edit store: {self._meta_path} is missing "
                             "(create one with EditStore.create or by adding an edit)") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"cannot read {self._meta_path}: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT:
            raise StoreError(f"{self._meta_path} is not a sola-vllm store header")
        if meta.get("version") != STORE_VERSION:
            raise StoreError(f"{self._meta_path}: unsupported store version "
                             f"{meta.get('version')!r} (this code reads {STORE_VERSION})")
        return meta

    def _snapshot(self) -> _Snapshot:
        meta = self._read_meta()
        try:
            data = self._journal_path.read_bytes()
        except FileNotFoundError:
            data = b""
        except OSError as exc:
            raise StoreError(f"cannot read the journal {self._journal_path}: {exc}") from exc
        journal = _parse_journal(data, self._journal_path)
        records, problems = _replay(journal.entries, self._journal_path)
        return _Snapshot(meta, journal, records, journal.problems + problems)

    def _record(self, snap: _Snapshot, edit_id: str) -> _Record:
        rec = snap.records.get(_check_id(edit_id))
        if rec is None:
            raise UnknownEditError(f"no edit {edit_id!r} in the store {self.path}")
        return rec

    def _verified_blob(self, rec: _Record) -> bytes:
        path = self._artifact_path(rec.id)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(f"edit {rec.id!r}: artifact {path} is missing") from None
        except OSError as exc:
            raise StoreError(f"edit {rec.id!r}: cannot read artifact {path}: {exc}") from exc
        digest = hashlib.sha256(blob).hexdigest()
        if digest != rec.sha256:
            raise StoreError(f"edit {rec.id!r}: artifact {path} is corrupt: its sha256 is "
                             f"{digest}, the journal recorded {rec.sha256}")
        return blob

    def _load_record(self, rec: _Record) -> Edit:
        path = self._artifact_path(rec.id)
        try:
            edit = Edit.from_bytes(self._verified_blob(rec), state=rec.state)
        except EditFormatError as exc:
            raise StoreError(f"edit {rec.id!r}: artifact {path} is malformed: {exc}") from exc
        if edit.id != rec.id:
            raise StoreError(f"edit {rec.id!r}: artifact {path} holds edit {edit.id!r}")
        return edit

    def _load_all(self, snap: _Snapshot) -> tuple[list[Edit], list[str]]:
        edits, problems = [], list(snap.problems)
        for rec in snap.records.values():
            try:
                edits.append(self._load_record(rec))
            except StoreError as exc:
                problems.append(str(exc))
        return edits, problems

    def _leftovers(self, snap: _Snapshot) -> list[tuple[Path, str]]:
        """Files an interrupted writer left behind: temporary files and orphan artifacts."""
        found = []
        for folder in (self.path, self._edits_dir):
            for path in sorted(folder.glob(f"{TMP_PREFIX}*")):
                found.append((path, f"leftover temporary file {path} (an interrupted write)"))
        for path in sorted(self._edits_dir.glob("*.safetensors")):
            if path.name[:-len(".safetensors")] not in snap.records:
                found.append((path, f"orphan artifact {path} has no journal 'add' (an "
                                    "interrupted add); it is ignored"))
        return found

    def _torn_message(self, snap: _Snapshot) -> str:
        return (f"{self._journal_path}: incomplete last line at byte {snap.journal.good_size} "
                "(an interrupted write) is ignored")

    def _leftover_messages(self, snap: _Snapshot) -> list[str]:
        torn = [self._torn_message(snap)] if snap.journal.torn else []
        return torn + [message for _, message in self._leftovers(snap)]

    def _summary(self, rec: _Record) -> dict:
        path = self._artifact_path(rec.id)
        summary = {"id": rec.id, "state": rec.state, "sha256": rec.sha256, "added": rec.added}
        try:
            header = _read_header(path)
            meta = json.loads(header["__metadata__"][META_KEY])
            summary.update({k: meta[k] for k in _SUMMARY_FIELDS if k in meta})
            summary["num_keys"], summary["key_dim"] = header["keys"]["shape"]
            summary["author"], summary["note"] = meta.get("author", ""), meta.get("note", "")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            summary["problem"] = f"cannot read the header of {path}: {exc}"
        summary["added_by"], summary["add_note"] = rec.author, rec.note  # from the journal
        return summary

    # --- writing internals ----------------------------------------------------------------------
    @contextlib.contextmanager
    def _writing(self, init: bool = False, create: bool = False) -> Iterator[None]:
        """Hold the writer lock; `init` makes a store on the fly, `create` only makes the dir."""
        if init or create:
            self._check_can_init()
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreError(f"cannot create the edit store {self.path}: {exc}") from exc
        else:
            self._read_meta()  # a clear error when there is no store
        with self._locked():
            if init and not self._meta_path.exists():
                self._init_locked({})
            yield

    def _check_can_init(self) -> None:
        if self._meta_path.exists() or not self.path.exists():
            return
        if not self.path.is_dir():
            raise StoreError(f"cannot create an edit store at {self.path}: it is not a directory")
        ours = {".lock", "edits", "audit.jsonl"}  # the server's audit log may come first
        foreign = sorted(p.name for p in self.path.iterdir()
                         if p.name not in ours and not p.name.startswith(TMP_PREFIX))
        if foreign:
            raise StoreError(f"{self.path} is not an edit store (no store.json) and is not empty: "
                             f"{foreign[:5]}; refusing to create a store there")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self.path / ".lock"
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot write to the edit store {self.path}: cannot open the "
                             f"writer lock {lock_path}: {exc.strerror}") from exc
        try:
            _flock(fd, self.lock_timeout, lock_path)
            yield
        finally:
            os.close(fd)  # releases the flock

    def _init_locked(self, pins: dict) -> None:
        self._check_can_init()
        try:
            self._edits_dir.mkdir(exist_ok=True)
            _atomic_write(self._meta_path, _json_bytes(
                {"format": STORE_FORMAT, "version": STORE_VERSION, **pins}))
        except OSError as exc:
            raise StoreError(f"cannot create the edit store {self.path}: {exc}") from exc

    def _transition(self, edit_id: str, op: str, author: str, note: str) -> None:
        edit_id = _check_id(edit_id)
        _check_text(author, note)
        with self._writing():
            snap = self._snapshot()
            rec = self._record(snap, edit_id)
            problem = transition_problem(op, edit_id, rec.state)
            if problem:
                raise TransitionError(problem, rec.state)
            self._commit(snap, [_entry(op, edit_id, author, note)])

    def _add_all(self, items: list[_Incoming]) -> None:
        for item in items:
            _check_text(item.author, item.note)
        with self._writing(init=True):
            snap = self._snapshot()
            self._check_new(snap, items)
            entries = []
            for item in items:
                sha = hashlib.sha256(item.blob).hexdigest()
                first = item.state if item.state in INITIAL_STATES else "active"
                entries.append(_entry("add", item.edit.id, item.author, item.note, sha, first))
                if item.state == "revoked":
                    entries.append(_entry("revoke", item.edit.id, item.author, "imported revoked"))
            self._write_new(snap, items, entries)

    def _write_new(self, snap: _Snapshot, items: list[_Incoming], entries: list[dict]) -> None:
        """Artifacts first, then the fingerprint pin, then the journal lines (the commit)."""
        written: list[Path] = []
        old_meta = snap.meta
        try:
            for item in items:
                path = self._artifact_path(item.edit.id)
                _atomic_write(path, item.blob)
                written.append(path)
            if items and not any(k in snap.meta for k in _FINGERPRINTS):
                pins = {k: getattr(items[0].edit, k) for k in _FINGERPRINTS}
                snap.meta = {**snap.meta, **pins}
                _atomic_write(self._meta_path, _json_bytes(snap.meta))
            self._commit(snap, entries)
        except (OSError, StoreError) as exc:
            for path in written:  # uncommitted: remove, so that nothing changed
                with contextlib.suppress(OSError):
                    path.unlink()
            if snap.meta is not old_meta:
                with contextlib.suppress(OSError):
                    _atomic_write(self._meta_path, _json_bytes(old_meta))
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"cannot write to the edit store {self.path}: {exc}") from exc

    def _check_new(self, snap: _Snapshot, items: list[_Incoming]) -> None:
        seen: set[str] = set()
        for item in items:
            edit = item.edit
            if edit.id in snap.records:
                raise StoreError(f"edit {edit.id!r} already exists in the store {self.path} "
                                 f"({snap.records[edit.id].state}); edits are immutable, use a "
                                 "new id")
            if edit.id in seen:
                raise StoreError(f"edit id {edit.id!r} appears twice in the import")
            seen.add(edit.id)
        pinned = {k: snap.meta[k] for k in _FINGERPRINTS if k in snap.meta}
        if not pinned and items:  # an unpinned store: the batch must agree with its first edit
            pinned = {k: getattr(items[0].edit, k) for k in _FINGERPRINTS}
        for item in items:
            got = {k: getattr(item.edit, k) for k in _FINGERPRINTS}
            if any(got[k] != pinned.get(k, got[k]) for k in _FINGERPRINTS):
                raise StoreError(
                    f"edit {item.edit.id!r} does not fit the store {self.path}: it was made for "
                    f"model {got['model_fingerprint']} / layer set {got['shape_fingerprint']}, "
                    f"the store holds edits for model {pinned.get('model_fingerprint')} / "
                    f"layer set {pinned.get('shape_fingerprint')}")

    def _commit(self, snap: _Snapshot, entries: list[dict]) -> None:
        """Append journal lines in one write; drop a torn tail first. Caller holds the lock."""
        data = _encode(entries, snap.journal.next_seq)
        try:
            if snap.journal.torn:
                _truncate(self._journal_path, snap.journal.good_size)
            _append(self._journal_path, data)
        except OSError as exc:
            raise StoreError(f"cannot write to the journal {self._journal_path}: {exc}") from exc


def _check_initial(state: object) -> None:
    if state not in INITIAL_STATES:
        raise StoreError(f"an edit is added as one of {INITIAL_STATES}, not {state!r}")
