"""Benchmark data: zsRE (MEND format) and CounterFact-style cases from ROME's known facts."""

import json
from collections import defaultdict
from pathlib import Path

import pytest

from sola_vllm.eval.data import (
    DataError,
    EditCase,
    conflict_ceiling,
    load,
    one_per_subject,
    split_of,
)

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ZSRE, ROME = DATA / "zsre_mend_eval_1000.json", DATA / "rome_known_1000.json"
needs_data = pytest.mark.skipif(not ZSRE.is_file() or not ROME.is_file(),
                                reason=f"benchmark data not found in {DATA}")


@needs_data
def test_zsre_cases_follow_the_file_and_skip_empty_answers():
    raw = json.loads(ZSRE.read_text())
    data = load(ZSRE)
    empty = [i for i, r in enumerate(raw) if not r["alt"].strip()]
    assert empty and len(data.cases) == len(raw) - len(empty)
    assert [s.split(":")[0] for s in data.skipped] == [str(i) for i in empty]
    by_id = {c.id: c for c in data.cases}
    for i, r in enumerate(raw):
        if i in empty:
            continue
        case = by_id[f"zsre-{i:04d}"]
        assert case.prompt == r["src"].strip() and case.target == r["alt"].strip()
        assert case.paraphrases == (r["rephrase"].strip(),)
        assert case.locality == (r["loc"].strip(),)
        assert not case.target.startswith(" ")


@needs_data
@pytest.mark.parametrize("path", [ZSRE, ROME], ids=["zsre", "counterfact"])
def test_splits_keep_each_subject_whole_and_are_fixed(path):
    data = load(path)
    splits = defaultdict(set)
    for c in data.cases:
        splits[c.subject.lower()].add(c.split)
        assert c.split == split_of(c.subject)
    assert all(len(s) == 1 for s in splits.values())
    dev, test = data.split("dev"), data.split("test")
    assert 0.15 < len(dev) / len(data.cases) < 0.35 and len(dev) + len(test) == len(data.cases)
    assert load(path).cases == data.cases  # deterministic


@needs_data
def test_zsre_stream_puts_the_reporting_split_first():
    data = load(ZSRE)
    stream = data.stream("test")
    n_test = len(data.split("test"))
    assert all(c.split == "test" for c in stream[:n_test])
    assert all(c.split == "dev" for c in stream[n_test:]) and len(stream) == len(data.cases)


@needs_data
def test_counterfact_cases_are_counterfactual_and_probes_are_sound():
    raw = json.loads(ROME.read_text())
    data = load(ROME)
    objects = defaultdict(set)
    for r in raw:
        objects[r["relation_id"]].add(r["attribute"].strip())
    for c in data.cases:
        i = int(c.id.split("-")[1])
        assert c.prompt == raw[i]["template"].format(raw[i]["subject"]).strip()
        assert c.target != raw[i]["attribute"].strip() and c.target in objects[c.relation]
        assert c.subject in c.prompt and all(c.subject in p for p in c.paraphrases)
        assert c.prompt not in c.paraphrases
        assert all(c.subject in p for p in c.other_relation)
        # neighbours: other subjects of the relation, from the other split (never edited with c)
        subjects = c.meta["neighbour_subjects"]
        assert len(subjects) == len(c.neighbours) > 0
        for subject, prompt in zip(subjects, c.neighbours, strict=True):
            assert subject in prompt and split_of(subject) != c.split
    assert all(c.split == "test" for c in data.stream("test"))


def test_other_relation_probes_never_ask_a_question_the_subject_has_a_fact_for():
    """ROME's relations share templates ("{} is developed by") and some subjects have facts in
    several relations: such a probe would be one of the subject's own records' prompts."""
    raw = json.loads(ROME.read_text())
    templates, facts = defaultdict(set), defaultdict(set)
    for r in raw:
        templates[r["relation_id"]].add(r["template"])
        facts[r["subject"].strip()].add(r["relation_id"])
    data = load(ROME)
    own_prompts = {c.subject: set() for c in data.cases}
    for c in data.cases:
        own_prompts[c.subject] |= {t.format(c.subject) for x in facts[c.subject]
                                   for t in templates[x]}
    probes = [(c, p) for c in data.cases for p in c.other_relation]
    assert len(probes) > 2 * len(data.cases)  # up to 3 per record, a few dropped
    assert not [p for c, p in probes if p in own_prompts[c.subject]]
    assert any(len(facts[c.subject]) > 1 for c in data.cases)  # the case exists in the file


def _case(subject, target, i=0):
    return EditCase(id=f"x-{i}", prompt=f"q about {subject}?", target=target, subject=subject,
                    split="test")


def test_conflict_ceiling_and_one_per_subject():
    cases = [_case("A", "1", 0), _case("A", "2", 1), _case("A", "1", 2), _case("B", "3", 3)]
    # A: best answer "1" covers 2 of 3; B: 1 of 1 -> 3 / 4
    assert conflict_ceiling(cases) == pytest.approx(3 / 4)
    assert [c.id for c in one_per_subject(cases)] == ["x-0", "x-3"]


@pytest.mark.parametrize("content, message", [
    ("not json", "cannot read"),
    ("{}", "non-empty JSON list"),
    ("[]", "non-empty JSON list"),
    ('[{"a": 1}]', "neither zsRE"),
    ('[{"src": "q", "alt": 3, "rephrase": "r", "loc": "l", "subject": "s"}]', "'alt' must be"),
])
def test_bad_files_get_clear_errors(tmp_path, content, message):
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load(path)
    with pytest.raises(DataError, match="does not exist"):
        load(tmp_path / "missing.json")
