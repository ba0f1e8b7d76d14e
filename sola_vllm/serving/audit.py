"""The audit log: one JSON line per attempted change of the edit store (who, when, what, from
where, and how it ended), refused attempts included.

The file is append-only: each record is one `O_APPEND` write followed by `fsync`, created with
mode 0600. By default it is `audit.jsonl` in the edit store directory (`SOLA_VLLM_AUDIT_LOG`
or `sola-vllm serve --audit-log` move it). Records never hold a token or any header value:
`authenticated` only says whether a valid admin token came with the request, and `author` is
what the client declared (the journal keeps it too).

A record that cannot be written (full or read-only disk) does not undo the change it describes:
the store's journal is the source of truth and already holds it. The record is then written to
the server log at ERROR level instead, so that it is not lost silently.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import UTC, datetime
from pathlib import Path

logger = logging.getLogger("vllm.sola_vllm")

AUDIT_ENV = "SOLA_VLLM_AUDIT_LOG"
AUDIT_FILE = "audit.jsonl"
MAX_FIELD = 256  # longer client-given text (paths, authors, ids) is cut: records stay small
MAX_TAIL = 10_000
_BLOCK = 64 * 1024


def audit_path(store: Path, environ=os.environ) -> Path:
    return Path(environ.get(AUDIT_ENV) or Path(store) / AUDIT_FILE)


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def clip(value: object) -> object:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + f"...(+{len(value) - MAX_FIELD} chars)"
    return value


class AuditLog:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def append(self, record: dict) -> bool:
        """Write one record; False (and the record in the server log) when that fails."""
        line = json.dumps({k: clip(v) for k, v in record.items()}, default=str,
                          ensure_ascii=True) + "\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            logger.error("sola-vllm: cannot write the audit log %s (%s); the record is: %s",
                         self.path, exc, line.strip())
            return False
        return True

    def tail(self, limit: int) -> dict:
        """The last `limit` records, oldest first; lines that are not JSON (a write cut by a
        crash) are counted, not returned."""
        if not 1 <= limit <= MAX_TAIL:
            raise ValueError(f"limit must be 1..{MAX_TAIL}, got {limit}")
        lines = self._last_lines(limit)
        records, bad = [], 0
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                bad += 1
        return {"path": str(self.path), "records": records, "unreadable_lines": bad}

    def _last_lines(self, limit: int) -> list[bytes]:
        """Reads backwards from the end, only as far as `limit` lines need."""
        try:
            with open(self.path, "rb") as f:
                end = f.seek(0, os.SEEK_END)
                data, pos = b"", end
                while pos > 0 and data.count(b"\n") <= limit:
                    step = min(_BLOCK, pos)
                    pos -= step
                    f.seek(pos)
                    data = f.read(step) + data
        except FileNotFoundError:
            return []
        lines = [line for line in data.split(b"\n") if line.strip()]
        if pos > 0:  # the first line read may be the end of a longer one
            lines = lines[1:]
        return lines[-limit:]
