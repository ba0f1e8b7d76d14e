"""Pre-flight check of a new edit: key collisions with the routed edits, and a locality probe.

Two edits whose keys lie within the routing threshold of each other fight over the same
requests (the nearer key wins, request by request), so a new edit whose key is within the
threshold of a routed edit's key is refused unless forced; the report names the other edit,
the distance and both prompts. The locality probe routes a set of prompts (a file of unrelated
prompts, say) as if the new edit were routed beside the others and lists the ones it would
take. Distances are the router's own (`pairwise_distance_ref` / `nearest_key_ref`), and a key
counts as within the threshold under the router's strict rule, distance < threshold. Each key
has its form's threshold (`RouterConfig.thresholds`); two keys collide within the larger of
theirs (either prompt would route to the other's key).

The functions here take tensors: the reference engine (offline) and the serving runtime (in
the vLLM worker, with keys from the engine's own capture) both call them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from sola_vllm.kernels.nearest_key import nearest_key_ref, pairwise_distance_ref

from .routing import key_thresholds

__all__ = ["KeyGroup", "check", "check_with_engine", "collision_message", "find_collisions",
           "load_probe_prompts", "parse_probe_prompts", "probe_routes", "report"]


@dataclass(frozen=True)
class KeyGroup:
    """One edit's routing keys: fp32 [n, d], key i captured from prompts[i], of form forms[i]
    (`config.KEY_FORMS`; None: every key "raw")."""

    edit_id: str
    state: str
    keys: torch.Tensor
    prompts: list[str]
    forms: list[str] | None = None

    def __post_init__(self) -> None:
        from .config import KEY_FORMS

        if self.forms is not None and (len(self.forms) != self.keys.shape[0]
                                       or not all(f in KEY_FORMS for f in self.forms)):
            raise ValueError(f"edit {self.edit_id}: key forms {self.forms!r} must name one of "
                             f"{KEY_FORMS} for each of its {self.keys.shape[0]} keys")

    @classmethod
    def of_edit(cls, edit, state: str) -> KeyGroup:
        """An `Edit`'s keys as they were stored, with its prompts and key forms."""
        return cls(edit.id, state, edit.keys.float(), edit.prompts, edit.forms())

    def prompt(self, index: int) -> str:
        return self.prompts[index] if index < len(self.prompts) else f"key {index}"

    def form(self, index: int) -> str:
        return self.forms[index] if self.forms is not None else "raw"

    def thresholds(self, thresholds: dict[str, float]) -> torch.Tensor:
        """fp32 [n] on the keys' device: each key's threshold (its form's in `thresholds`)."""
        forms = self.forms if self.forms is not None else ["raw"] * self.keys.shape[0]
        return key_thresholds(forms, thresholds, self.keys.device)


def find_collisions(new: KeyGroup, others: list[KeyGroup], thresholds: dict[str, float],
                    metric: str) -> list[dict]:
    """Semantics: for every other edit e and new key i, the nearest key j of e within
    max(threshold(i), threshold(j)) (`thresholds` per key form); reported when there is one.
    -> [{"edit", "state", "distance", "threshold", "prompt", "other_prompt"}], nearest first."""
    found = []
    new_thr = new.thresholds(thresholds)
    for other in others:
        if other.edit_id == new.edit_id or other.keys.shape[0] == 0:
            continue
        dist = pairwise_distance_ref(new.keys, other.keys, metric)  # [n, m]
        within = torch.maximum(new_thr[:, None], other.thresholds(thresholds)[None, :])
        best, index = dist.masked_fill(dist >= within, float("inf")).min(dim=1)  # [n]
        for i in best.isfinite().nonzero().flatten().tolist():
            j = int(index[i])
            threshold = max(thresholds[new.form(i)], thresholds[other.form(j)])  # exact
            found.append({"edit": other.edit_id, "state": other.state,
                          "distance": float(best[i]), "threshold": threshold,
                          "prompt": new.prompt(i), "other_prompt": other.prompt(j)})
    return sorted(found, key=lambda c: c["distance"])


def probe_routes(new: KeyGroup, routed: list[KeyGroup], queries: torch.Tensor,
                 prompts: list[str], thresholds: dict[str, float], metric: str) -> list[dict]:
    """Route each probe query ([P, d]) among the routed edits' keys plus the new edit's (all
    of them, canary ones included: the widest view), each key under its form's threshold.
    -> per probe {"prompt", "route" (edit id or None), "distance" (to its nearest key),
    "distance_to_new"}."""
    groups = [g for g in routed if g.edit_id != new.edit_id and g.keys.shape[0]] + [new]
    keys = torch.cat([g.keys.float() for g in groups])
    owners = torch.cat([torch.full((g.keys.shape[0],), slot, dtype=torch.int32,
                                   device=keys.device) for slot, g in enumerate(groups)])
    key_thr = torch.cat([g.thresholds(thresholds) for g in groups])
    slots, dists, _ = nearest_key_ref(queries.float(), keys, owners, key_thr, metric)
    to_new = pairwise_distance_ref(queries, new.keys, metric).min(dim=1).values
    return [{"prompt": p, "route": groups[s].edit_id if s >= 0 else None, "distance": float(d),
             "distance_to_new": float(n)}
            for p, s, d, n in zip(prompts, slots.tolist(), dists.tolist(), to_new.tolist(),
                                  strict=True)]


def report(new: KeyGroup, collisions: list[dict], probes: list[dict] | None,
           thresholds: dict[str, float], metric: str) -> dict:
    """The check's JSON report; `ok` is False when a collision would refuse the add.
    "threshold" is the raw keys' (the one every key has unless chat keys have their own)."""
    return {"edit": new.edit_id, "ok": not collisions, "threshold": thresholds["raw"],
            "thresholds": thresholds, "metric": metric,
            "collisions": collisions, "probes": probes,
            "routes_to_new": None if probes is None else
            [p["prompt"] for p in probes if p["route"] == new.edit_id]}


def collision_message(check: dict) -> str:
    """One line naming the nearest other edit, for a refusal."""
    first = check["collisions"][0]
    others = sorted({c["edit"] for c in check["collisions"]})
    return (f"edit {check['edit']} collides with routed edit(s) {others}: its prompt "
            f"{first['prompt']!r} is at {check['metric']} distance {first['distance']:.4g} of "
            f"edit {first['edit']}'s prompt {first['other_prompt']!r}, under the threshold "
            f"{first['threshold']:.4g}; use force to add it anyway")


def parse_probe_prompts(data: object, where: str) -> list[str]:
    """A JSON list of non-empty prompt strings (at least one), or ValueError naming `where`."""
    if not isinstance(data, list) or not data:
        raise ValueError(f"{where}: probes must be a non-empty list of prompts")
    for i, prompt in enumerate(data):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{where}[{i}]: a probe must be a non-empty string, got {prompt!r}")
    return list(data)


def load_probe_prompts(path: str | Path) -> list[str]:
    """A probe file: a JSON list of prompts, or one prompt per non-blank line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read the probe file {path}: {exc}") from exc
    if text.lstrip().startswith("["):
        try:
            return parse_probe_prompts(json.loads(text), str(path))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: bad JSON: {exc}") from exc
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"the probe file {path} holds no prompts")
    return lines


# --- with the reference engine (offline) --------------------------------------------------------
PROBE_BATCH = 32


def mapped_group(group: KeyGroup, key_map) -> KeyGroup:
    return KeyGroup(group.edit_id, group.state, key_map(group.keys), group.prompts, group.forms)


def routed_groups(engine) -> list[KeyGroup]:
    """The key groups of a `RoutedEngine`'s routed edits (active and canary), in load order."""
    return [KeyGroup.of_edit(e, "active" if e.id in engine.active else "canary")
            for e in engine.edits.values() if e.id in engine.active or e.id in engine.canary]


def check_with_engine(engine, new: KeyGroup, probes: list[str] | None = None) -> dict:
    """The pre-flight report of `new` against the engine's routed edits, with its router's
    metric and thresholds; `probes` are routed with the engine's own key queries."""
    queries = engine.key_queries(probes, PROBE_BATCH) if probes else None
    return check(new, routed_groups(engine), engine.router.thresholds, engine.router.metric,
                 probes, queries, engine.key_map)


def check(new: KeyGroup, routed: list[KeyGroup], thresholds: dict[str, float], metric: str,
          probes: list[str] | None = None, queries: torch.Tensor | None = None,
          key_map=None) -> dict:
    """Collisions of `new` with the `routed` edits and, given probe prompts and their key
    queries ([P, d]), the probes' routes: the whole report. Keys and queries are raw; with a
    `key_map` (the router's `KeyMap`) distances are taken after it, as the router takes them."""
    if key_map is not None:
        new, routed = mapped_group(new, key_map), [mapped_group(g, key_map) for g in routed]
        queries = None if queries is None else key_map(queries)
    collisions = find_collisions(new, routed, thresholds, metric)
    rows = None
    if probes:
        rows = probe_routes(new, routed, queries, probes, thresholds, metric)
    return report(new, collisions, rows, thresholds, metric)
