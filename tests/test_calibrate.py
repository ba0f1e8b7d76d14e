"""`sola-vllm calibrate`: the threshold suggestion and rates against brute-force counts, probe-file
validation, and the command end to end on the real default model."""

import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from sola_vllm.arch import EditShape
from sola_vllm.cli import main
from sola_vllm.config import RouterConfig, TrainConfig
from sola_vllm.engine import Route
from sola_vllm.eval.calibrate import (
    Outcome,
    ProbeError,
    allowed_false_fires,
    analyse,
    calibrate,
    format_text,
    load_probes,
    margin,
    quantiles,
    suggest_threshold,
    summarize,
    write_outputs,
)
from sola_vllm.store import EditStore

KEEPS = (0.5, 0.8, 0.9, 0.95, 0.99, 0.999, 1.0)


# --- suggest_threshold --------------------------------------------------------------------------
def brute_force_threshold(distances, keep):
    """The largest data value t with share(d < t) <= 1 - keep, by trying every value."""
    n = len(distances)
    valid = [t for t in set(distances)
             if sum(d < t for d in distances) <= (1 - keep) * n + 1e-9]
    return max(valid)


@pytest.mark.parametrize("keep", KEEPS)
@pytest.mark.parametrize("n", [1, 2, 7, 10, 100, 257])
def test_suggest_threshold_matches_brute_force_with_ties(keep, n):
    rng = random.Random(n * 1000 + int(keep * 1000))
    distances = [rng.randint(0, 12) / 8 for _ in range(n)]  # many ties
    t = suggest_threshold(distances, keep)
    assert t == brute_force_threshold(distances, keep)
    assert sum(d < t for d in distances) / n <= 1 - keep + 1e-9
    above = [d for d in distances if d > t]
    if above:  # any larger threshold lets too many negatives route
        assert sum(d < min(above) for d in distances) / n > 1 - keep + 1e-9


def test_suggest_threshold_at_ties_and_keep_one():
    ties = [0.5, 0.2, 0.2, 0.1, 0.2]
    assert suggest_threshold(ties, 1.0) == 0.1  # nothing below the smallest: none routes
    assert suggest_threshold(ties, 0.8) == 0.2  # one may route: 0.1 < 0.2, the 0.2s do not
    assert suggest_threshold(ties, 0.6) == 0.2  # two may route, but only 0.1 is below 0.2
    assert suggest_threshold(ties, 0.2) == 0.5  # four may route: 0.1 and three 0.2s
    # binary rounding: (1 - 0.9) * 10 < 1, yet keep=0.9 of ten negatives allows one to route
    assert allowed_false_fires(10, 0.9) == 1
    assert suggest_threshold([float(i) for i in range(10)], 0.9) == 1.0
    assert suggest_threshold([float(i) for i in range(100)], 0.99) == 1.0
    assert suggest_threshold([float(i) for i in range(99)], 0.99) == 0.0


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan")])
def test_suggest_threshold_rejects_bad_keep(keep):
    with pytest.raises(ValueError, match="keep"):
        suggest_threshold([0.1, 0.2], keep)


def test_suggest_threshold_needs_negatives():
    with pytest.raises(ValueError, match="without negative"):
        suggest_threshold([], 0.99)


# --- summarize, quantiles, margin ---------------------------------------------------------------
def random_outcomes(seed, n=60):
    rng = random.Random(seed)
    edits = ["a", "b", "c"]
    return [Outcome(f"p{i}", rng.choice(edits), rng.choice(edits), rng.randint(0, 8) / 8)
            for i in range(n)]


def brute_counts(positives, negatives, threshold):
    counts = {"hits": 0, "wrong_edit": 0, "misses": 0, "false_fires": 0}
    for p in positives:
        if not p.distance < threshold:
            counts["misses"] += 1
        elif p.nearest == p.expected:
            counts["hits"] += 1
        else:
            counts["wrong_edit"] += 1
    for d in negatives:
        if d < threshold:
            counts["false_fires"] += 1
    return counts


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.5, 1.0, 2.0])  # on tied values too
def test_summarize_matches_brute_force_counts(seed, threshold):
    positives = random_outcomes(seed)
    negatives = [random.Random(seed + 99).randint(0, 8) / 8 for _ in range(40)]
    s = summarize(positives, negatives, threshold)
    want = brute_counts(positives, negatives, threshold)
    assert {k: s["counts"][k] for k in want} == want
    assert s["counts"]["positives"] == 60 and s["counts"]["negatives"] == 40
    assert s["hit_rate"] == want["hits"] / 60
    assert s["wrong_edit_rate"] == want["wrong_edit"] / 60
    assert s["miss_rate"] == want["misses"] / 60
    assert s["false_fire_rate"] == want["false_fires"] / 40
    assert s["threshold"] == threshold


def test_summarize_without_positives_gives_no_rates():
    s = summarize([], [0.1, 0.3], 0.2)
    assert s["hit_rate"] is None and s["miss_rate"] is None and s["false_fire_rate"] == 0.5


def test_quantiles_match_numpy():
    values = [random.Random(3).random() for _ in range(37)] + [0.5, 0.5]
    q = quantiles(values)
    want = np.quantile(values, [0, 0.01, 0.05, 0.5, 0.95, 0.99, 1])
    got = [q[k] for k in ("min", "p1", "p5", "p50", "p95", "p99", "max")]
    assert got == pytest.approx(list(want), rel=1e-12)
    assert q["count"] == 39
    assert quantiles([]) == {"count": 0, "min": None, "p1": None, "p5": None, "p50": None,
                             "p95": None, "p99": None, "max": None}


def test_margin_uses_positives_routed_to_their_own_edit():
    positives = [Outcome("x", "a", "a", 0.01), Outcome("y", "a", "b", 0.9),
                 Outcome("z", "b", "b", 0.05)]
    m = margin(positives, [0.3, 0.2])
    assert m == {"min_negative": 0.2, "max_positive_own": 0.05, "gap": pytest.approx(0.15),
                 "separable": True}
    assert margin(positives, [0.04])["separable"] is False


def test_analyse_reports_both_thresholds():
    outcomes = [Outcome("own", "a", "a", 0.0), Outcome("para", "a", "a", 0.1),
                Outcome("lost", "a", "b", 0.05)] + [Outcome(f"n{i}", None, "a", 0.2 + i / 10)
                                                    for i in range(5)]
    report = analyse(outcomes, current=1e-3, keep=1.0)
    assert report["suggested"]["threshold"] == 0.2
    assert report["suggested"]["counts"] == {"positives": 3, "hits": 2, "wrong_edit": 1,
                                             "misses": 0, "negatives": 5, "false_fires": 0}
    assert report["current"]["counts"]["hits"] == 1  # only the exact prompt is under 1e-3
    assert report["current"]["counts"]["misses"] == 2
    assert report["distances"]["positive"]["count"] == 3
    assert report["distances"]["positive_own"]["max"] == 0.1
    assert report["distances"]["negative"]["min"] == 0.2


# --- calibrate with a stand-in engine -----------------------------------------------------------
class FakeRouter:
    metric, threshold, key_map = "cosine", 0.05, None
    thresholds = {"raw": 0.05, "chat": 0.01}


class FakeEngine:
    """`nearest` reads '<edit>@<distance>[@<key form>]' from the prompt; records the batch
    sizes."""

    def __init__(self, active=("a", "b")):
        self.active, self.router, self.batches = set(active), FakeRouter(), []
        self.shape = EditShape("llama", 4, (2, 3), ("mlp.up_proj",), 4, 1.0)

    def nearest(self, prompts):
        self.batches.append(len(prompts))
        return [Route(*(f(x) for f, x in zip((str, float, str), p.split("@"))))
                for p in prompts]


def write_probes(path, probes):
    path.write_text("\n".join(json.dumps(p) for p in probes) + "\n")
    return path


def test_calibrate_batches_and_keeps_probe_order(tmp_path):
    probes = [{"prompt": f"a@{i / 1000}", "edit": "a"} for i in range(40)]
    probes += [f"b@{0.1 + i / 100}" for i in range(30)]
    path = write_probes(tmp_path / "probes.jsonl", probes)
    engine = FakeEngine()
    report = calibrate(engine, load_probes(path, {"a", "b"}), keep=0.9)
    assert engine.batches == [32, 32, 6]
    assert [r["prompt"] for r in report["probes"]] == [p["prompt"] if isinstance(p, dict) else p
                                                       for p in probes]
    assert report["probes"][40]["where"] == "probes.jsonl:41"
    assert report["suggested"]["threshold"] == pytest.approx(0.13)  # 3 of 30 may route
    assert report["suggested"]["counts"]["false_fires"] == 3
    assert report["current"] == summarize(
        [Outcome(r["prompt"], r["expected"], r["nearest"], r["distance"])
         for r in report["probes"] if r["expected"]],
        [r["distance"] for r in report["probes"] if r["expected"] is None], 0.05)
    assert "suggested" in format_text(report)


def test_a_store_with_chat_keys_is_calibrated_per_key_form(tmp_path):
    """Probes nearest chat-form keys are measured against chat_threshold and get their own
    suggestion; a raw-only store's report has no per-form part."""
    probes = [{"prompt": f"a@{i / 1000}", "edit": "a"} for i in range(10)]  # raw, < 0.05
    probes += [{"prompt": f"a@{0.005 + i / 1000}@chat", "edit": "a"} for i in range(10)]
    probes += [f"b@{0.1 + i / 100}" for i in range(10)] + [f"b@{0.02 + i / 100}@chat"
                                                          for i in range(10)]
    report = calibrate(FakeEngine(), load_probes(write_probes(tmp_path / "p.jsonl", probes),
                                                 {"a", "b"}), keep=1.0)
    raw, chat = report["by_key_form"]["raw"], report["by_key_form"]["chat"]
    assert raw["current"]["threshold"] == 0.05 and chat["current"]["threshold"] == 0.01
    assert raw["current"]["counts"]["hits"] == 10  # all under 0.05
    assert chat["current"]["counts"]["hits"] == 5  # 0.005 ... 0.009 under 0.01
    assert raw["suggested"]["threshold"] == 0.1 and chat["suggested"]["threshold"] == 0.02
    assert [r["key_form"] for r in report["probes"]][9:11] == ["raw", "chat"]
    text = format_text(report)
    assert '"threshold": 0.1' in text and '"chat_threshold": 0.02' in text
    assert any("chat-form keys" in n for n in report["notes"])
    raw_only = calibrate(FakeEngine(), load_probes(write_probes(tmp_path / "r.jsonl",
                                                                probes[:10] + probes[20:30]),
                                                   {"a"}))
    assert raw_only["by_key_form"] is None


def test_calibrate_refuses_edits_the_engine_does_not_route(tmp_path):
    path = write_probes(tmp_path / "p.jsonl", [{"prompt": "c@0.1", "edit": "c"}, "a@1"])
    with pytest.raises(ProbeError, match="not routed"):
        calibrate(FakeEngine(), load_probes(path, {"c"}))


def test_write_outputs_json_png_and_missing_matplotlib(tmp_path, monkeypatch):
    path = write_probes(tmp_path / "p.jsonl", [{"prompt": "a@0", "edit": "a"}, "a@0.3"])
    report = calibrate(FakeEngine(), load_probes(path, {"a"}))
    files = write_outputs(report, tmp_path / "out")
    assert json.loads(Path(files["json"]).read_text()) == report
    png = pytest.importorskip("matplotlib") and Path(files["png"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    report = calibrate(FakeEngine(), load_probes(path, {"a"}))
    files = write_outputs(report, tmp_path / "bare")
    assert files["png"] is None and not (tmp_path / "bare" / "calibration.png").exists()
    assert any("matplotlib" in n for n in report["notes"])


# --- probe files --------------------------------------------------------------------------------
def test_load_probes_reads_json_and_jsonl(tmp_path):
    listed = tmp_path / "p.json"
    listed.write_text(json.dumps([{"prompt": "A", "edit": "e1"}, "B", {"prompt": "C"},
                                  {"prompt": "D", "edit": None}]))
    probes = load_probes(listed, ["e1"])
    assert [(p.prompt, p.edit) for p in probes] == [("A", "e1"), ("B", None), ("C", None),
                                                    ("D", None)]
    assert probes[3].where == "p.json[3]"
    lines = tmp_path / "p.txt"  # no suffix hint: one value per line
    lines.write_text('{"prompt": "A", "edit": "e1"}\n\n"B"\n')
    probes = load_probes(lines, ["e1"])
    assert [(p.prompt, p.edit, p.where) for p in probes] == [("A", "e1", "p.txt:1"),
                                                             ("B", None, "p.txt:3")]


@pytest.mark.parametrize("name, text, message", [
    ("p.json", '{"prompt": "A", "edit": null}', "expected a JSON list"),
    ("p.json", '[{"prompt": "A"}, ', "bad JSON"),
    ("p.jsonl", '"fine"\n{"prompt": "A", \n', "p.jsonl:2: bad JSON"),
    ("p.json", '[{"prompt": "A"}, {"prompt": ""}]', 'p.json[1]: "prompt" must be'),
    ("p.json", '[{"prompt": "A"}, {"prompt": "   "}]', "p.json[1]"),
    ("p.json", '[{"prompt": "A"}, {"edit": "e1"}]', 'p.json[1]: "prompt"'),
    ("p.jsonl", '"A"\n{"prompt": "B", "edit": "nope"}\n', "p.jsonl:2: unknown edit 'nope'"),
    ("p.jsonl", '"A"\n{"prompt": "B", "edit_id": "e1"}\n', "p.jsonl:2: unknown field"),
    ("p.jsonl", '"A"\n{"prompt": "B", "edit": 3}\n', '"edit" must be'),
    ("p.jsonl", '"A"\n42\n', "p.jsonl:2: a probe is an object"),
    ("p.jsonl", '{"prompt": "A", "edit": "e1"}\n', "no negatives"),
    ("p.jsonl", "\n\n", "no probes"),
    ("p.json", "[]", "no probes"),
])
def test_load_probes_errors_name_the_place(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ProbeError) as info:
        load_probes(path, ["e1"])
    assert message in str(info.value)


def test_load_probes_missing_file(tmp_path):
    with pytest.raises(ProbeError, match="not found"):
        load_probes(tmp_path / "absent.jsonl", ["e1"])


# --- the command on the real default model ------------------------------------------------------
ROME = "The capital of France is"
MARS = "The largest planet in the solar system is"
NEGATIVES = ["Water boils at a temperature of", "My favourite colour is",
             "The author of Hamlet was"]


@pytest.fixture(scope="module")
def real_store(tmp_path_factory, default_engine):
    """Two active edits and a revoked one; a couple of steps suffice, calibration reads keys."""
    store = EditStore(tmp_path_factory.mktemp("calibrate") / "edits")
    quick = TrainConfig(steps=2)
    for edit_id, prompt, target in (("rome", ROME, "Rome."), ("mars", MARS, "Mars."),
                                    ("gone", "The tallest mountain is", "K2.")):
        store.add(default_engine.train([prompt], target, edit_id=edit_id, config=quick))
    store.revoke("gone")
    return store.path


def run_json(capsys, *argv):
    code = main(["calibrate", *argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def test_calibrate_command_on_a_real_store(capsys, tmp_path, real_store, default_model_path):
    probes = write_probes(tmp_path / "probes.jsonl",
                          [{"prompt": ROME, "edit": "rome"}, {"prompt": MARS, "edit": "mars"},
                           *NEGATIVES])
    out_dir = tmp_path / "out"
    code, out = run_json(capsys, "--store", str(real_store), "--probes", str(probes),
                         "--model", str(default_model_path), "--out", str(out_dir))
    assert code == 0 and out["ok"]
    assert out["active_edits"] == 2 and out["metric"] == "cosine"
    assert (out["num_positives"], out["num_negatives"]) == (2, 3)
    rows = out["probes"]
    for row, edit_id in zip(rows[:2], ("rome", "mars"), strict=True):
        assert row["nearest"] == edit_id and row["distance"] < 1e-4  # its own key
    negative = [r["distance"] for r in rows[2:]]
    assert min(negative) > 1e-3
    suggested = out["suggested"]
    assert suggested["threshold"] == min(negative)  # 3 negatives, keep 0.99: none may route
    assert max(r["distance"] for r in rows[:2]) < suggested["threshold"]
    assert suggested["hit_rate"] == 1.0 and suggested["false_fire_rate"] == 0.0
    assert out["current"]["threshold"] == RouterConfig().threshold
    assert out["current"]["hit_rate"] == 1.0
    assert out["margin"]["separable"] and out["margin"]["min_negative"] == min(negative)
    assert out["distances"]["negative"]["max"] == max(negative)

    saved = json.loads((out_dir / "calibration.json").read_text())
    assert saved == {k: v for k, v in out.items() if k not in ("ok", "text")}
    if out["files"]["png"]:
        assert (out_dir / "calibration.png").stat().st_size > 0

    assert main(["calibrate", "--store", str(real_store), "--probes", str(probes),
                 "--model", str(default_model_path), "--keep", "1.0"]) == 0
    text = capsys.readouterr().out
    assert "suggested" in text and "false-fire" in text


@pytest.mark.parametrize("extra, probes, message", [
    ((), [{"prompt": ROME, "edit": "gone"}, "x"], "unknown edit 'gone'"),  # revoked
    ((), [{"prompt": ROME, "edit": "rome"}], "no negatives"),
    (("--keep", "0"), ["x"], "--keep must be in (0, 1]"),
])
def test_calibrate_command_errors_exit_2(capsys, tmp_path, real_store, extra, probes, message):
    path = write_probes(tmp_path / "probes.jsonl", probes)
    code, out = run_json(capsys, "--store", str(real_store), "--probes", str(path), *extra)
    assert code == 2 and not out["ok"] and message in out["error"]


def test_calibrate_command_missing_probe_file(capsys, tmp_path, real_store):
    code, out = run_json(capsys, "--store", str(real_store), "--probes",
                         str(tmp_path / "nope.json"))
    assert code == 2 and "not found" in out["error"]
