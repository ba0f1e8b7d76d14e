"""A threshold calibrated on the evaluated store from the other split only
(`sola-vllm eval --threshold-keep`): which prompts it reads, its rule, and the harness wiring."""

import pytest
from test_eval_harness import DATA, needs_data

from sola_vllm.engine import Route
from sola_vllm.eval.data import Dataset, EditCase
from sola_vllm.eval.harness import EvalConfig
from sola_vllm.eval.store_threshold import StoreNegatives, store_threshold


def _case(cid, subject, split, prompt=None, locality=()):
    return EditCase(id=cid, prompt=prompt or f"What is {subject}?", target="t", subject=subject,
                    split=split, locality=tuple(locality))


def _data():
    cases = (_case("t1", "Alpha", "test", locality=["What is Gamma?"]),
             _case("t2", "Beta", "test"),
             _case("d1", "Gamma", "dev", locality=["Where is Alpha?", "Who wrote Hamlet?"]),
             _case("d2", "Delta", "dev", locality=["Who wrote Hamlet?", "What is pi?"]),
             _case("d3", "beta", "dev"))  # a dev record of an edited subject (case differs)
    return Dataset("toy", "toy.json", cases, ())


def test_negatives_come_from_the_other_split_and_never_name_an_edited_subject():
    data = _data()
    keyed = [c for c in data.cases if c.split == "test"]
    negatives = StoreNegatives.of(data, keyed, "test")
    assert negatives.split == "dev"
    assert negatives.hard == ["What is Gamma?", "What is Delta?"]  # not d3: Beta is edited
    # "Where is Alpha?" mentions an edited subject (CounterFact's dev neighbours do); the
    # duplicate locality prompt counts once; the reported split's locality is never read
    assert negatives.unrelated == ["Who wrote Hamlet?", "What is pi?"]


class _Engine:
    """nearest() from a table of distances; records the active sets it was given."""

    def __init__(self, distances):
        self.distances, self.active, self.seen = distances, {"t1", "t2", "d1"}, []

    def set_active(self, ids):
        self.active = set(ids)
        self.seen.append(set(ids))

    def nearest(self, prompts):
        return [Route("t1", self.distances[p]) for p in prompts]


def test_the_threshold_keeps_each_group_unrouted_on_the_reported_splits_keys():
    data = _data()
    stream = list(data.cases[:3])  # t1, t2 and d1: zsRE streams hold the other split after
    engine = _Engine({"What is Gamma?": 0.30, "What is Delta?": 0.50,
                      "Who wrote Hamlet?": 0.20, "What is pi?": 0.90})
    found = store_threshold(engine, data, stream, "test", keep=1.0)
    assert engine.seen[0] == {"t1", "t2"}  # the dev edit d1 is not a key while calibrating
    assert engine.active == {"t1", "t2", "d1"}  # and the active set is restored
    assert found["group_thresholds"] == {"hard": 0.30, "unrelated": 0.20}
    assert found["threshold"] == 0.20 and found["keys"] == 2 and found["split"] == "dev"
    assert found["negatives"] == {"hard": 2, "unrelated": 2}
    assert found["routed"] == {"hard": 0.0, "unrelated": 0.0}
    # keep 0.5 lets one of two negatives of each group route
    assert store_threshold(engine, data, stream, "test", keep=0.5)["threshold"] == 0.50


def test_bad_calibration_input_is_refused():
    data = _data()
    with pytest.raises(ValueError, match="keep"):
        store_threshold(_Engine({}), data, list(data.cases), "test", keep=0.0)
    with pytest.raises(ValueError, match="no test edits"):
        store_threshold(_Engine({}), data, [data.cases[2]], "test", keep=0.99)
    with pytest.raises(ValueError, match="threshold-keep"):
        EvalConfig(data=DATA, threshold_keep=1.5)


@needs_data
def test_stored_stream_names_a_missing_or_incomplete_store(tmp_path):
    """What the benchmarks rereading an eval run load: every stream edit, or a clear error."""
    from sola_vllm.eval.harness import edits_dir
    from sola_vllm.eval.methods import build_methods
    from sola_vllm.eval.stored import stored_stream
    from sola_vllm.store import EditStore

    cfg = EvalConfig(data=DATA, edits=3, out=tmp_path)
    with pytest.raises(ValueError, match="no sola edits under .*run sola-vllm eval"):
        stored_stream(cfg)
    EditStore.create(edits_dir(cfg, build_methods(["sola"], cfg.config)[0]))
    with pytest.raises(ValueError, match="3 of the stream's edits are not trained"):
        stored_stream(cfg)
