"""Moving edits between stores: the `export_store` directory and the incoming-edit record.

An export directory holds every edit's artifact, byte for byte, as `<id>.safetensors`, plus
`manifest.json` (journal order, states, sha256, the store's pinned fingerprints). The manifest is
written last, so an interrupted export has none and cannot be imported.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .edit import STATES, Edit, EditFormatError
from .fsutil import _json_bytes, _read_file, _write_or_fail
from .journal import _Record
from .store_errors import StoreError, _check_id, _check_text

EXPORT_FORMAT = "sola-vllm-store-export"
_FINGERPRINTS = ("model_fingerprint", "shape_fingerprint")  # pinned by store.json and a manifest


@dataclass
class _Incoming:
    """An edit about to be added, with the exact bytes that will be stored."""

    edit: Edit
    blob: bytes
    state: str = "active"
    author: str = ""
    note: str = ""


def _write_export(out: Path, blobs: list[tuple[_Record, bytes]], meta: dict,
                  version: int) -> None:
    """Write the artifacts, then the manifest (recording `version` and the pins in `meta`)."""
    entries = [{"id": rec.id, "state": rec.state, "sha256": rec.sha256,
                "file": f"{rec.id}.safetensors", "author": rec.author, "note": rec.note,
                "added": rec.added} for rec, _ in blobs]
    manifest = {"format": EXPORT_FORMAT, "version": version, "edits": entries,
                **{k: meta[k] for k in _FINGERPRINTS if k in meta}}
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"cannot export to {out}: {exc}") from exc
    for rec, blob in blobs:
        _write_or_fail(out / f"{rec.id}.safetensors", blob, "cannot export")
    # the manifest goes last: an interrupted export has none and cannot be imported
    _write_or_fail(out / "manifest.json", _json_bytes(manifest, indent=2), "cannot export")


def _read_export(src: Path) -> list[_Incoming]:
    """Read and fully validate an `export_store` directory."""
    manifest_path = src / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise StoreError(f"cannot read the export manifest {manifest_path}: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != EXPORT_FORMAT \
            or not isinstance(manifest.get("edits"), list):
        raise StoreError(f"{manifest_path} is not a sola-vllm store export manifest")
    items = [_read_export_entry(src, entry) for entry in manifest["edits"]]
    for item in items:
        for key in _FINGERPRINTS:
            if key in manifest and getattr(item.edit, key) != manifest[key]:
                raise StoreError(f"{manifest_path}: edit {item.edit.id!r} has {key} "
                                 f"{getattr(item.edit, key)}, the manifest says {manifest[key]}")
    return items


def _read_export_entry(src: Path, entry: object) -> _Incoming:
    if not isinstance(entry, dict):
        raise StoreError(f"{src / 'manifest.json'}: bad edit entry {entry!r}")
    edit_id = _check_id(entry.get("id"))
    state, author, note = entry.get("state"), entry.get("author", ""), entry.get("note", "")
    if state not in STATES:
        raise StoreError(f"{src}: edit {edit_id!r} has state {state!r}, expected one of {STATES}")
    _check_text(author, note)
    path = src / f"{edit_id}.safetensors"
    blob = _read_file(path)
    digest = hashlib.sha256(blob).hexdigest()
    if digest != entry.get("sha256"):
        raise StoreError(f"{path} is corrupt: sha256 {digest}, the manifest says "
                         f"{entry.get('sha256')}")
    try:
        edit = Edit.from_bytes(blob, state=state)
    except EditFormatError as exc:
        raise StoreError(f"{path} is not a valid edit artifact: {exc}") from exc
    if edit.id != edit_id:
        raise StoreError(f"{path} holds edit {edit.id!r}, the manifest says {edit_id!r}")
    return _Incoming(edit, blob, state, author, note)
