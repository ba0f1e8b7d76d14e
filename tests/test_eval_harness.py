"""The evaluation harness end to end on the real default model, a few zsRE edits."""

import dataclasses
import json
from pathlib import Path

import pytest

from sola_vllm.cli import main
from sola_vllm.eval.harness import EvalConfig, edits_dir, revoked_routes, run
from sola_vllm.eval.methods import build_methods
from sola_vllm.eval.outcomes import Outcomes

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "zsre_mend_eval_1000.json"
needs_data = pytest.mark.skipif(not DATA.is_file(), reason=f"benchmark data {DATA} not found")


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, default_model_path):
    out = tmp_path_factory.mktemp("eval")
    cfg = EvalConfig(data=DATA, edits=3, checkpoints=(1, 3), methods=("base", "sola"), out=out,
                     model=str(default_model_path))
    return cfg, run(cfg)


def _method(report, name):
    return next(m for m in report["methods"] if m["name"] == name)


@needs_data
def test_edits_stick_stay_local_and_roll_back_exactly(first_run):
    _, report = first_run
    sola, base = _method(report, "sola"), _method(report, "base")
    assert [c["T"] for c in sola["checkpoints"]] == [1, 3] == report["meta"]["checkpoints"]
    for row in sola["checkpoints"]:
        assert row["reliability_em"] == 1.0 and row["reliability_tf"] == 1.0
        assert row["locality"] == 1.0
        assert row["routing"]["prompt_hit"] == 1.0 and row["routing"]["false_fire"] == 0.0
    # hard negatives: the later records' prompts, probed while they are not edited yet
    assert 0.0 <= sola["checkpoints"][0]["routing"]["hard_false_fire"] <= 1.0
    assert sola["checkpoints"][-1]["routing"]["hard_false_fire"] is None
    assert all(row["reliability_em"] < 1.0 for row in base["checkpoints"])
    assert all(row["routing"] is None and row["locality"] == 1.0 for row in base["checkpoints"])
    rollback = sola["rollback"]
    assert rollback["revoked"] == 1 and rollback["revoked_exact"] == 1.0
    assert rollback["revoked_routes"]["none"] == 1.0 and rollback["revoked_exact_unshadowed"] == 1.0
    assert rollback["kept_reliability_em"] == rollback["kept_reliability_em_before"] == 1.0
    assert rollback["locality"] == rollback["locality_before"]
    # distances: each edit prompt sits on its own key, unrelated prompts far away
    dist = sola["distances"]
    assert max(dist["hit"]) < 1e-4 < min(dist["negative"])
    assert report["meta"]["route_mismatches"] == 0


@needs_data
def test_chat_form_run_measures_chat_messages_with_edits_trained_on_them(first_run):
    from sola_vllm.chat_form import chat_prompt
    from sola_vllm.store import EditStore

    raw_cfg, _ = first_run
    train = dataclasses.replace(raw_cfg.config.train, chat_form=True)
    cfg = dataclasses.replace(raw_cfg, prompt_form="chat", out=raw_cfg.out / "chat",
                              config=dataclasses.replace(raw_cfg.config, train=train))
    sola_method = build_methods(["sola"], cfg.config)[0]
    raw_method = build_methods(["sola"], raw_cfg.config)[0]
    assert edits_dir(cfg, sola_method).name != edits_dir(raw_cfg, raw_method).name  # a recipe
    report = run(cfg)
    assert report["meta"]["prompt_form"] == "chat"
    sola = _method(report, "sola")
    for row in sola["checkpoints"]:
        assert row["reliability_em"] == 1.0 and row["locality"] == 1.0
        assert row["routing"]["prompt_hit"] == 1.0 and row["routing"]["false_fire"] == 0.0
    rollback = sola["rollback"]
    assert rollback["revoked_exact"] == 1.0 and rollback["kept_reliability_em"] == 1.0
    edits = EditStore(edits_dir(cfg, sola_method)).all()
    tok = __import__("transformers").AutoTokenizer.from_pretrained(raw_cfg.model)
    assert all(e.prompts == [e.prompts[0], chat_prompt(tok, e.prompts[0])] for e in edits)
    assert max(sola["distances"]["hit"]) < 1e-4  # each chat prompt sits on its own chat key
    measured = {json.loads(json.loads(line)[0])[3]
                for line in (cfg.out / "outcomes.jsonl").read_text().splitlines()}
    assert {chat_prompt(tok, e.prompts[0]) for e in edits} <= measured


@needs_data
def test_the_lora_all_baseline_trains_on_the_chat_forms_too(first_run):
    from sola_vllm.chat_form import chat_prompt
    from sola_vllm.store import EditStore

    raw_cfg, _ = first_run
    train = dataclasses.replace(raw_cfg.config.train, chat_form=True)
    cfg = dataclasses.replace(raw_cfg, prompt_form="chat", out=raw_cfg.out / "chat-joint",
                              edits=2, checkpoints=(2,), methods=("lora-all",), joint_epochs=1,
                              config=dataclasses.replace(raw_cfg.config, train=train))
    report = run(cfg)
    assert _method(report, "lora-all")["checkpoints"][0]["T"] == 2
    (joint,) = EditStore(edits_dir(cfg, build_methods(["lora-all"], cfg.config)[0])).all()
    tok = __import__("transformers").AutoTokenizer.from_pretrained(raw_cfg.model)
    raw = joint.prompts[::2]
    assert len(raw) == 2 and joint.prompts[1::2] == [chat_prompt(tok, p) for p in raw]


@needs_data
def test_a_rerun_resumes_without_training_or_generating_again(first_run):
    cfg, report = first_run
    journal = edits_dir(cfg, build_methods(["sola"], cfg.config)[0]) / "journal.jsonl"
    journal_before = journal.read_bytes()
    outcomes_before = (cfg.out / "outcomes.jsonl").read_bytes()
    again = run(cfg)
    assert (cfg.out / "outcomes.jsonl").read_bytes() == outcomes_before
    assert journal.read_bytes() == journal_before
    for name in ("base", "sola"):
        assert _method(again, name)["checkpoints"] == _method(report, name)["checkpoints"]
        assert _method(again, name)["rollback"] == _method(report, name)["rollback"]


@needs_data
def test_threshold_keep_calibrates_the_sola_threshold_on_its_store(first_run):
    """--threshold-keep 1.0: sola's threshold is the nearest distance of any dev negative to the
    store's keys; sola-paper keeps the paper's."""
    from sola_vllm.engine import RoutedEngine
    from sola_vllm.eval.data import load
    from sola_vllm.eval.report import render_markdown
    from sola_vllm.eval.store_threshold import StoreNegatives
    from sola_vllm.store import EditStore

    cfg, _ = first_run
    cfg = dataclasses.replace(cfg, threshold_keep=1.0, methods=("sola",), checkpoints=(3,))
    report = run(cfg)
    sola = _method(report, "sola")
    calibration = sola["router"]["calibration"]
    assert sola["router"]["threshold"] == calibration["threshold"]
    assert calibration["keys"] == 3 and calibration["split"] == "dev"
    stream = load(DATA).stream("test")[:3]
    negatives = StoreNegatives.of(load(DATA), stream, "test")
    engine = RoutedEngine.from_pretrained(cfg.model, cfg.config)
    method = build_methods(["sola"], cfg.config)[0]
    engine.add_all(EditStore(edits_dir(cfg, method)).all())
    nearest = [r.distance for r in engine.nearest(negatives.hard + negatives.unrelated)]
    assert calibration["threshold"] == min(nearest)
    assert calibration["negatives"] == {"hard": len(negatives.hard),
                                        "unrelated": len(negatives.unrelated)}
    assert sola["checkpoints"][-1]["routing"]["false_fire"] == 0.0
    assert "calibrated on its store (3 keys" in render_markdown(report)
    paper = build_methods(["sola-paper"], cfg.config)[0]
    assert paper.config.router.threshold == 0.01 and paper.calibration is None


def test_outcome_cache_survives_a_torn_last_line(tmp_path):
    path = tmp_path / "outcomes.jsonl"
    cache = Outcomes(path)
    key = Outcomes.key("greedy", "sola", "e1", "prompt", 3)
    cache.put(key, [1, 2, 3])
    cache.close()
    with path.open("a") as f:
        f.write('["half a li')
    again = Outcomes(path)
    assert again.data == {key: [1, 2, 3]}
    # an unrouted row is keyed as the base model's, whatever the method
    assert Outcomes.key("greedy", "sola", None, "p", 3) == Outcomes.key("greedy", "x", None, "p", 3)
    again.close()


@needs_data
def test_cli_quick_run_writes_the_report(tmp_path, capsys, default_model_path):
    code = main(["eval", "--data", str(DATA), "--quick", "--methods", "base",
                 "--model", str(default_model_path), "--out", str(tmp_path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["ok"]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["meta"]["quick"] and report["meta"]["edits"] == 6
    assert report["meta"]["command"].startswith("sola-vllm ")
    assert (tmp_path / "report.md").read_text().count("| base |") == 3
    assert (tmp_path / "retention.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, message", [
    (["--methods", "base,nope"], "unknown method"),
    (["--checkpoints", "1,x"], "comma-separated ints"),
    (["--edits", "0"], "edits must be a positive int"),
    (["--threshold-keep", "0"], "--threshold-keep must be in (0, 1]"),
])
def test_cli_bad_options_exit_2(tmp_path, capsys, args, message):
    code = main(["eval", "--data", str(DATA), "--out", str(tmp_path), "--json", *args])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and message in out["error"]


def test_cli_missing_data_exits_2(tmp_path, capsys):
    code = main(["eval", "--data", str(tmp_path / "none.json"), "--edits", "2",
                 "--methods", "base", "--out", str(tmp_path), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 2 and "does not exist" in out["error"]


def test_base_outputs_are_never_taken_from_a_routed_engine(tmp_path, fresh_edits):
    """Asking the cache for a prompt's base output while an edit that routes it is active
    must still give the base model's tokens (a rollback asks exactly that)."""
    engine = fresh_edits
    prompt = "The capital of France is"
    base = engine.generate([prompt], 4)[0].token_ids
    engine.add(engine.train([prompt], "Rome.", edit_id="rome"))
    assert engine.generate([prompt], 4)[0].token_ids != base  # the edit routes the prompt
    cache = Outcomes(tmp_path / "outcomes.jsonl")
    assert cache.greedy(engine, "v", [prompt], [4], [None]) == [base]
    assert cache.greedy(engine, "v", [prompt], [4], ["rome"]) != [base]
    assert cache.route_mismatches == 0 and engine.active == {"rome"}
    cache.close()


def test_revoked_routes_tell_siblings_from_rollback_bugs():
    from sola_vllm.eval.data import EditCase

    def case(cid, subject, relation=""):
        return EditCase(id=cid, prompt=f"Q {cid}?", target="t", subject=subject, split="test",
                        relation=relation)

    a, b, c, d, e = (case("a", "X"), case("b", "X"), case("c", "Y"), case("d", "Z"),
                     case("e", "Z"))
    f, g = case("f", "W", "P17"), case("g", "W", "P19")
    by_id = {x.id: x for x in (a, b, c, d, e, f, g)}
    revoked = {"a", "c", "d", "e", "f"}
    routes = {"Q a?": ("b", 0.001),  # a kept edit of the same subject: a sibling
              "Q c?": (None, 0.5),
              "Q d?": ("e", 0.002),  # another revoked edit: a rollback bug
              "Q e?": ("b", 0.003),  # a kept edit of another subject
              "Q f?": ("g", 0.004)}  # same subject, another relation: not a sibling
    assert revoked_routes([a, c, d, e, f], by_id, revoked, routes) == [
        "kept_sibling", "none", "revoked", "kept_other", "kept_other"]
