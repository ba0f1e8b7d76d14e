"""Benchmark edit cases from real data: zsRE (MEND's format) and CounterFact-style edits built
from ROME's known-facts table (Meng et al. 2022). Read from `../shared/data/`, never copied.

Every record becomes an `EditCase`: the prompt whose last token gives the edit's key, the new
answer, paraphrases (generality probes, never stored as keys), unrelated prompts (locality) and,
for CounterFact-style cases, prompts about the same subject under another relation (the probes
that subject-anchored keys must leave unrouted).

Splits are fixed by a hash of the subject, so every record of one subject (zsRE has up to 18,
often with conflicting answers) falls in the same split: `dev` (about a quarter, for choosing
defaults) and `test` (the rest, for reporting). The edit stream is the test records in file order
followed by the dev records: T = 1, 10, 100 are test edits only, T = 1000 holds every record,
and metrics at any T are averaged over the test records among the first T edits. A
CounterFact-style stream holds its split only: its neighbourhood prompts are the other split's
facts, which must stay unedited.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("dev", "test")
DEV_SHARE = 4  # subject hash % DEV_SHARE == 0 -> dev


class DataError(ValueError):
    """A benchmark file is missing, malformed or of an unknown kind."""


@dataclass(frozen=True)
class EditCase:
    id: str  # "zsre-0042" / "cf-0042": the record's index in its file
    prompt: str  # the edit prompt: its key token is the last one
    target: str  # the new answer
    subject: str
    split: str
    paraphrases: tuple[str, ...] = ()
    locality: tuple[str, ...] = ()  # unrelated prompts: must keep the base model's output
    neighbours: tuple[str, ...] = ()  # other subjects, same relation (CounterFact)
    other_relation: tuple[str, ...] = ()  # same subject, another relation
    relation: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def subject_span(self) -> tuple[int, int]:
        """Character span of the subject's last occurrence in the prompt."""
        start = self.prompt.rfind(self.subject)
        return (start, start + len(self.subject)) if start >= 0 else (-1, -1)


@dataclass(frozen=True)
class Dataset:
    name: str  # "zsre" | "counterfact"
    path: str
    cases: tuple[EditCase, ...]
    skipped: tuple[str, ...]  # "index: why" for records that cannot be an edit

    def split(self, name: str) -> list[EditCase]:
        if name not in SPLITS:
            raise DataError(f"split {name!r} is not one of {SPLITS}")
        return [c for c in self.cases if c.split == name]

    def stream(self, split: str = "test") -> list[EditCase]:
        """The edit order. zsRE: `split`'s records first (file order), then the other split's.
        CounterFact-style: `split`'s records only, as its neighbours come from the other one."""
        if self.name == "counterfact":
            return self.split(split)
        other = "dev" if split == "test" else "test"
        return self.split(split) + self.split(other)


def split_of(subject: str) -> str:
    digest = hashlib.sha256(subject.strip().lower().encode()).digest()
    return "dev" if digest[0] % DEV_SHARE == 0 else "test"


def load(path: str | Path) -> Dataset:
    """Read a zsRE (MEND) or ROME known-facts file; the kind is told by its fields."""
    path = Path(path)
    try:
        records = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DataError(f"data file {path} does not exist") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from e
    if not isinstance(records, list) or not records or not isinstance(records[0], dict):
        raise DataError(f"{path} must hold a non-empty JSON list of records")
    if {"src", "alt", "rephrase", "loc"} <= records[0].keys():
        return _zsre(path, records)
    if {"subject", "attribute", "template", "relation_id"} <= records[0].keys():
        return _counterfact(path, records)
    raise DataError(f"{path}: records are neither zsRE (src/alt/rephrase/loc) nor ROME known "
                    f"facts (subject/attribute/template/relation_id); got {sorted(records[0])}")


def _text(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _zsre(path: Path, records: list) -> Dataset:
    cases, skipped = [], []
    for i, r in enumerate(records):
        where = f"{path.name} record {i}"
        if not isinstance(r, dict):
            raise DataError(f"{where} is not an object")
        # MEND's file has a few empty or space-led answers: strip them, skip the empty ones
        target = _text(r, "alt", where).strip()
        if not target:
            skipped.append(f"{i}: empty alt")
            continue
        subject = _text(r, "subject", where).strip()
        cases.append(EditCase(
            id=f"zsre-{i:04d}", prompt=_text(r, "src", where).strip(), target=target,
            subject=subject, split=split_of(subject),
            paraphrases=(_text(r, "rephrase", where).strip(),),
            locality=(_text(r, "loc", where).strip(),),
            meta={"base_answer": (r.get("answers") or [""])[0], "loc_ans": r.get("loc_ans", "")}))
    return Dataset("zsre", str(path), tuple(cases), tuple(skipped))


def _counterfact(path: Path, records: list, seed: int = 0) -> Dataset:
    """CounterFact-style edits: the new object is another fact's object of the same relation;
    paraphrases put the subject into the relation's other templates; neighbours are other
    subjects' prompts of the same relation; other-relation probes put the subject into other
    relations' templates. Deterministic under `seed`."""
    rng = random.Random(seed)
    by_rel: dict[str, list[dict]] = defaultdict(list)
    for i, r in enumerate(records):
        where = f"{path.name} record {i}"
        for key in ("subject", "attribute", "template", "relation_id"):
            _text(r, key, where)
        if "{}" not in r["template"]:
            raise DataError(f"{where}: template {r['template']!r} has no '{{}}'")
        by_rel[r["relation_id"]].append({**r, "_index": i})
    templates = {rel: sorted({r["template"] for r in rs}) for rel, rs in by_rel.items()}
    relations = sorted(by_rel)
    facts_of: dict[str, set[str]] = defaultdict(set)  # subject -> relations it has a fact in
    for r in records:
        facts_of[r["subject"].strip()].add(r["relation_id"])
    cases, skipped = [], []
    for i, r in enumerate(records):
        rel, subject = r["relation_id"], r["subject"].strip()
        objects = sorted({o["attribute"].strip() for o in by_rel[rel]} - {r["attribute"].strip()})
        if not objects:
            skipped.append(f"{i}: relation {rel} has no other object")
            continue
        # neighbours come from the other split, so they are never edited in this split's stream
        others = [o for o in by_rel[rel] if split_of(o["subject"]) != split_of(subject)]
        picked = rng.sample(others, min(3, len(others)))
        neighbours = [o["template"].format(o["subject"]) for o in picked]
        para = [t.format(subject) for t in templates[rel] if t != r["template"]][:3]
        other_rels = [x for x in relations if x != rel]
        drawn = [(x, rng.choice(templates[x]))
                 for x in rng.sample(other_rels, min(3, len(other_rels)))]
        # kept: relations the subject has no fact in, worded by templates none of its relations
        # use (ROME's relations share some, e.g. "{} is developed by"); otherwise a probe is one
        # of its records' prompts or paraphrases, not another question about it. Dropped after
        # drawing, so every later draw (targets, neighbours) stays as it was
        own = {t for x in facts_of[subject] for t in templates[x]}
        other_relation = [t.format(subject) for x, t in drawn
                          if x not in facts_of[subject] and t not in own]
        cases.append(EditCase(
            id=f"cf-{i:04d}", prompt=r["template"].format(subject), target=rng.choice(objects),
            subject=subject, split=split_of(subject), paraphrases=tuple(para),
            locality=tuple(neighbours), neighbours=tuple(neighbours),
            other_relation=tuple(other_relation), relation=rel,
            meta={"base_answer": r["attribute"].strip(),
                  "neighbour_subjects": [o["subject"].strip() for o in picked]}))
    return Dataset("counterfact", str(path), tuple(cases), tuple(skipped))


def one_per_subject(cases: list[EditCase]) -> list[EditCase]:
    """The first record of each subject: the view without conflicting edits."""
    seen, out = set(), []
    for c in cases:
        if c.subject.lower() not in seen:
            seen.add(c.subject.lower())
            out.append(c)
    return out


def conflict_ceiling(cases: list[EditCase]) -> float:
    """The best generality any router can reach when records of one subject ask the same kind of
    question with different answers: per subject, the share of its most common answer."""
    groups: dict[str, list[str]] = defaultdict(list)
    for c in cases:
        groups[c.subject.lower()].append(c.target)
    best = sum(max(answers.count(a) for a in set(answers)) for answers in groups.values())
    return best / max(1, len(cases))
