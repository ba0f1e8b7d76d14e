"""A routing threshold calibrated on the evaluated store itself, from the other split's prompts
only (`sola-vllm eval --threshold-keep KEEP`).

A key map's threshold (`fit_map`) is read on a small dev store (half a dev split's subjects as
keys). What a deployment sees is its own store: with more keys, a negative's nearest key is
nearer, and the right threshold depends on the store's size and content. This calibrates on
the store a run evaluates, with no reported record's paraphrase or locality prompt:

- keys: the stream's edits of the reported split (edits of the other split, which zsRE's
  stream holds after the reported ones, are left out, since their own prompts are the
  negatives);
- hard negatives: the other split's prompts (same style; subjects never in the reported split);
- unrelated negatives: the other split's locality prompts, minus those that mention an edited
  subject (CounterFact's neighbours of dev records are test subjects' prompts).

The threshold is the largest that keeps `keep` of each negative group unrouted (the rule of
`fit_map.DevDistances.threshold`); the other split is the calibration split, so the report
states which numbers it read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .calibrate import check_keep, suggest_threshold
from .data import Dataset, EditCase

OTHER_SPLIT = {"test": "dev", "dev": "test"}


@dataclass(frozen=True)
class StoreNegatives:
    """The calibration split's negatives for one store."""
    split: str
    hard: list[str]
    unrelated: list[str]

    @classmethod
    def of(cls, data: Dataset, keyed: list[EditCase], reported_split: str) -> StoreNegatives:
        split = OTHER_SPLIT[reported_split]
        cases = data.split(split)
        subjects = {c.subject.lower() for c in keyed}
        hard = [c.prompt for c in cases if c.subject.lower() not in subjects]
        unrelated = [p for c in cases for p in c.locality
                     if not any(s in p.lower() for s in subjects)]
        if not hard:
            raise ValueError(f"{data.path}: its {split} split has no prompts to calibrate on")
        return cls(split, list(dict.fromkeys(hard)), list(dict.fromkeys(unrelated)))


def store_threshold(engine, data: Dataset, stream: list[EditCase], reported_split: str,
                    keep: float) -> dict:
    """The threshold for `engine`'s store of `stream` (its edits loaded), calibrated as the
    module docstring says. Returns the threshold and what it was read on."""
    check_keep(keep)
    keyed = [c for c in stream if c.split == reported_split]
    if not keyed:
        raise ValueError(f"the stream has no {reported_split} edits to calibrate a store on")
    negatives = StoreNegatives.of(data, keyed, reported_split)
    groups = negative_distances(engine, negatives, keyed)
    own = group_thresholds(groups, keep)
    threshold = min(own.values())
    return {"threshold": threshold, "keep": keep, "split": negatives.split, "keys": len(keyed),
            "negatives": {name: len(d) for name, d in groups.items()},
            "group_thresholds": own,
            "routed": {name: float((d < threshold).float().mean()) if len(d) else None
                       for name, d in groups.items()}}


def negative_distances(engine, negatives: StoreNegatives,
                       keyed: list[EditCase]) -> dict[str, torch.Tensor]:
    """Each negative group's nearest-key distances (fp64) with only `keyed`'s edits active;
    the engine's active set is restored."""
    before = set(engine.active)
    engine.set_active([c.id for c in keyed])
    try:
        return {"hard": _distances(engine, negatives.hard),
                "unrelated": _distances(engine, negatives.unrelated)}
    finally:
        engine.set_active(before)


def group_thresholds(groups: dict[str, torch.Tensor], keep: float) -> dict[str, float]:
    """Per non-empty group, the largest threshold that keeps `keep` of it unrouted; the
    store's threshold is their minimum."""
    return {name: suggest_threshold(d.tolist(), keep) for name, d in groups.items() if len(d)}


def _distances(engine, prompts: list[str]) -> torch.Tensor:
    if not prompts:
        return torch.empty(0, dtype=torch.float64)
    distances = [r.distance for r in engine.nearest(prompts=prompts)]
    return torch.tensor(distances, dtype=torch.float64)
