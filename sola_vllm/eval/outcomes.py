"""What the engine produced for a prompt under a given route, cached on disk so that an
evaluation resumes where it stopped and never runs the same (prompt, route) twice.

A prompt's output depends only on the edit it is routed to: unrouted rows are the base model's,
bit for bit (tested in tests/test_engine_real.py), and an edit's LoRA is frozen. So across
checkpoints T = 1 ... 1000 a prompt is generated again only when its route changes. Every route
used is the engine's own decision, checked against the prediction the cache key was made from.
"""

from __future__ import annotations

import contextlib
import json
from collections import defaultdict
from pathlib import Path

BATCH = 32
BASE = "base"  # the variant of every unrouted row


class Outcomes:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.data: dict[str, list[int]] = {}
        self.route_mismatches = 0
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    key, value = json.loads(line)
                except (json.JSONDecodeError, ValueError):
                    continue  # a torn last line from an interrupted run
                self.data[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a")

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def key(kind: str, variant: str, route: str | None, prompt: str, extra) -> str:
        return json.dumps([kind, BASE if route is None else variant, route, prompt, extra])

    def put(self, key: str, value: list[int]) -> None:
        self.data[key] = value
        self._file.write(json.dumps([key, value]) + "\n")
        self._file.flush()

    def greedy(self, engine, variant: str, prompts: list[str], lengths: list[int],
               routes: list[str | None]) -> list[list[int]]:
        """Greedy token ids (up to `lengths[i]` tokens) of each prompt under its route."""
        keys = [self.key("greedy", variant, r, p, n)
                for p, n, r in zip(prompts, lengths, routes, strict=True)]
        todo = defaultdict(list)  # length -> [(prompt, route)]
        for key, p, n, r in zip(keys, prompts, lengths, routes, strict=True):
            if key not in self.data and (p, r) not in todo[n]:
                todo[n].append((p, r))
        for n, items in todo.items():
            for unrouted in (True, False):  # base outputs come from an engine with no key
                group = [(p, r) for p, r in items if (r is None) == unrouted]
                with _no_keys(engine, unrouted):
                    for start in range(0, len(group), BATCH):
                        chunk = group[start:start + BATCH]
                        outs = engine.generate([p for p, _ in chunk], max_new_tokens=n)
                        for (p, r), out in zip(chunk, outs, strict=True):
                            self._store("greedy", variant, p, n, r, out.route.edit_id,
                                        out.token_ids)
        return [self.data[k] for k in keys]

    def forced(self, engine, variant: str, prompts: list[str], targets: list[list[int]],
               routes: list[str | None]) -> list[list[int]]:
        """Teacher-forced argmax predictions of each target's tokens under its route."""
        keys = [self.key("forced", variant, r, p, t)
                for p, t, r in zip(prompts, targets, routes, strict=True)]
        todo, seen = [], set()
        for key, p, t, r in zip(keys, prompts, targets, routes, strict=True):
            if key not in self.data and key not in seen:
                seen.add(key)
                todo.append((p, t, r))
        for unrouted in (True, False):
            group = [item for item in todo if (item[2] is None) == unrouted]
            with _no_keys(engine, unrouted):
                for start in range(0, len(group), BATCH):
                    chunk = group[start:start + BATCH]
                    preds, got = engine.teacher_forced([p for p, _, _ in chunk],
                                                       [t for _, t, _ in chunk])
                    for (p, t, r), pred, route in zip(chunk, preds, got, strict=True):
                        self._store("forced", variant, p, t, r, route.edit_id, pred)
        return [self.data[k] for k in keys]

    def _store(self, kind, variant, prompt, extra, expected, actual, value) -> None:
        """Keep an output under the route the engine really took. A route other than the
        predicted one (a distance within rounding of the threshold) is counted, and the
        prediction's entry then holds what the engine really did for that prompt."""
        self.put(self.key(kind, variant, actual, prompt, extra), value)
        if actual != expected:
            self.route_mismatches += 1
            self.put(self.key(kind, variant, expected, prompt, extra), value)


@contextlib.contextmanager
def _no_keys(engine, enabled: bool):
    """Base outputs are generated with no key active, so nothing can route them, whatever
    edits the evaluation has active at the time."""
    if not enabled:
        yield
        return
    active = set(engine.active)
    engine.set_active([])
    try:
        yield
    finally:
        engine.set_active(active)
