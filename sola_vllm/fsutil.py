"""Filesystem helpers of the edit store: atomic writes, fsynced appends, the writer lock.

Every write that must survive a crash goes through `_atomic_write` (temp file, fsync, rename,
fsync the directory) or `_append` (one O_APPEND write, fsync); see `store` for how they combine.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from pathlib import Path

from .store_errors import StoreError

TMP_PREFIX = ".tmp-"
_MAX_HEADER = 64 * 1024 * 1024


def _json_bytes(data: object, indent: int | None = None) -> bytes:
    separators = None if indent else (",", ":")
    return json.dumps(data, sort_keys=True, indent=indent, separators=separators).encode()


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc


def _read_header(path: Path) -> dict:
    """The JSON header of a safetensors file, without reading its tensors."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        if not 0 < size <= _MAX_HEADER:
            raise ValueError(f"implausible safetensors header size {size}")
        return json.loads(f.read(size))


def _flock(fd: int, timeout: float | None, path: Path) -> None:
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise StoreError(f"timed out after {timeout:g}s waiting for the writer lock "
                                 f"{path}: another process is writing to the store") from None
            time.sleep(0.005)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the same directory, fsync, rename over `path`, fsync the directory."""
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _write_or_fail(path: Path, data: bytes, what: str) -> None:
    try:
        _atomic_write(path, data)
    except OSError as exc:
        raise StoreError(f"{what}: cannot write {path}: {exc}") from exc


def _truncate(path: Path, size: int) -> None:
    """Cut a torn journal tail (the caller holds the lock)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _append(path: Path, data: bytes) -> None:
    """O_APPEND write of whole lines, then fsync (the journal's commit point)."""
    created = not path.exists()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        _fsync_dir(path.parent)
