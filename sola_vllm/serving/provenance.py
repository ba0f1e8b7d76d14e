"""RequestLog: which edit (if any) each recent request was routed to, and hit counts per edit.

Lives in the worker next to `SolaRuntime`, which records every routing decision here (once
per request, at its key token). Memory is bounded: the log keeps the last `capacity`
decisions; the counters are one int per edit id loaded since start plus two totals.

Request ids. The runner sees vLLM's internal request id, not the id a client gets back. In
vLLM 0.32 the OpenAI server names a completion `cmpl-<base>` (`<base>` = X-Request-Id or 16
random hex) and submits one engine request per prompt as `cmpl-<base>-<i>`; a chat completion
is `chatcmpl-<base>` (`chatcmpl-<base>_<i>` per input when there are several). The engine then
appends `-<8 random hex>` (unless VLLM_DISABLE_REQUEST_ID_RANDOMIZATION) and, for `n > 1`,
prefixes each sample with `<k>_`. `belongs_to` undoes exactly that, so a lookup by the id the
client saw finds every engine request of that completion.
"""

from __future__ import annotations

import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass

# what may follow the client-visible id: a prompt/input index, then vLLM's random suffix
_TAIL = re.compile(r"(?:[-_]\d+)?(?:-[0-9a-f]{8})?")
_SAMPLE_PREFIX = re.compile(r"\d+_")  # n > 1: vLLM's child requests are `<k>_<parent id>`


def belongs_to(engine_id: str, response_id: str) -> bool:
    """True if the engine request `engine_id` is part of the completion `response_id` (the
    `id` of an OpenAI completion / chat completion response), or is that engine id itself."""
    if engine_id == response_id:
        return True
    sample = _SAMPLE_PREFIX.match(engine_id)
    if sample and not response_id.startswith(sample.group(0)):
        engine_id = engine_id[sample.end():]
    if not engine_id.startswith(response_id):
        return False
    return _TAIL.fullmatch(engine_id[len(response_id):]) is not None


@dataclass(slots=True)
class RouteRecord:
    request_id: str  # vLLM's internal (engine) request id
    edit_id: str | None  # None: not routed, the base model answered
    slot: int  # -1: no edit
    distance: float  # to the nearest active key (inf when none was active)
    decided_at: float  # unix time of the routing decision
    finished: bool = False

    def to_dict(self) -> dict:
        return {"engine_request_id": self.request_id, "edit": self.edit_id, "slot": self.slot,
                "distance": self.distance if math.isfinite(self.distance) else None,
                "decided_at": self.decided_at, "finished": self.finished}


class RequestLog:
    """The last `capacity` routing decisions by engine request id, and counters since start."""

    def __init__(self, capacity: int):
        if not isinstance(capacity, int) or capacity <= 0:
            raise ValueError(f"request log capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        self.records: OrderedDict[str, RouteRecord] = OrderedDict()
        self.edit_hits: dict[str, int] = {}  # by edit id: survives revoke and slot reuse
        self.routed = 0
        self.unrouted = 0

    def record(self, request_id: str, slot: int, edit_id: str | None, distance: float) -> None:
        if slot >= 0:
            self.routed += 1
            self.edit_hits[edit_id] = self.edit_hits.get(edit_id, 0) + 1
        else:
            self.unrouted += 1
        self.records[request_id] = RouteRecord(request_id, edit_id if slot >= 0 else None,
                                               slot, float(distance), time.time())
        self.records.move_to_end(request_id)
        while len(self.records) > self.capacity:
            self.records.popitem(last=False)  # the oldest decision goes first

    def loaded(self, edit_id: str) -> None:
        """An edit entered the engine: it gets a series (0 until routed to)."""
        self.edit_hits.setdefault(edit_id, 0)

    def finish(self, request_id: str) -> None:
        record = self.records.get(request_id)
        if record is not None:
            record.finished = True

    def lookup(self, response_id: str) -> list[dict]:
        """Every logged engine request of the completion `response_id`, oldest first."""
        return [r.to_dict() for r in self.records.values()
                if belongs_to(r.request_id, response_id)]

    def counts(self) -> dict:
        return {"routed": self.routed, "unrouted": self.unrouted,
                "edit_hits": dict(self.edit_hits), "logged": len(self.records),
                "capacity": self.capacity}
