"""The edit-quality report renderer on a synthetic report: tables, averages, nulls, plots, files
and the benchmarks/edit_quality.py page generator."""

import copy
import importlib.util
import json
import random
from pathlib import Path

import pytest

from sola_vllm.eval import report as rp

PNG_MAGIC = b"\x89PNG"
ROOT = Path(__file__).resolve().parents[1]


def _checkpoint(T, base, routing=None, **overrides):
    cp = {"T": T, "n_eval": T, "reliability_tf": base + 0.05, "reliability_em": base,
          "generality_tf": base - 0.05, "generality_em": base - 0.1,
          "locality": 0.9 + base / 20, "routing": routing}
    cp.update(overrides)
    return cp


def make_report() -> dict:
    """Three methods: base (TF null), sola (routing, rollback, distances), lora-all (no
    locality, no distances)."""
    rng = random.Random(0)
    ts = [1, 10, 100]
    routing = {"prompt_hit": 1.0, "paraphrase_hit": 0.8123, "false_fire": 0.0125}
    sola = {
        "name": "sola", "description": "one LoRA per edit, last-token keys",
        "router": {"metric": "l2", "threshold": 0.4321, "keys": "last"},
        "checkpoints": [_checkpoint(T, 0.9 - i / 50, routing) for i, T in enumerate(ts)],
        "rollback": {"T": 100, "revoked": 50, "revoked_exact": 0.98, "kept": 50,
                     "revoked_exact_unshadowed": 1.0,
                     "revoked_routes": {"none": 0.98, "revoked": 0.0, "kept_sibling": 0.02,
                                        "kept_other": 0.0},
                     "kept_reliability_em": 0.87, "kept_reliability_em_before": 0.88,
                     "locality": 0.99, "locality_before": 0.98},
        # zeros (exact key matches) and a span over 2 decades: log bins with a clamped floor
        "distances": {"hit": [0.0] * 20 + [rng.uniform(1e-4, 0.1) for _ in range(80)],
                      "paraphrase": [rng.uniform(0.05, 2.0) for _ in range(100)],
                      "negative": [rng.uniform(0.5, 30.0) for _ in range(2000)]},
    }
    base = {
        "name": "base", "description": "the unedited model",
        "router": {"metric": None, "threshold": None, "keys": None},
        "checkpoints": [_checkpoint(T, 0.1, reliability_tf=None, generality_tf=None,
                                    locality=1.0) for T in ts],
        "rollback": None, "distances": None,
    }
    lora = {
        "name": "lora-all", "description": "one LoRA trained on all edits",
        "router": {"metric": None, "threshold": None, "keys": None},
        "checkpoints": [_checkpoint(T, 0.7 - i / 10, locality=None) for i, T in enumerate(ts)],
        "rollback": None, "distances": None,
    }
    meta = {"data": "zsre", "data_path": "../shared/data/zsre_mend_eval_1000.json",
            "split": "test", "view": "full", "engine": "reference", "model": "tiny-llama",
            "model_fingerprint": "abc123", "edits": 100, "checkpoints": ts, "quick": True,
            "created": "2026-01-01T00:00:00Z", "seconds": 12.345,
            "versions": {"torch": "2.13"}, "command": "python -m sola_vllm.eval.harness",
            "conflict_ceiling": 0.9512, "machine": "test box"}
    return {"meta": meta, "methods": [base, sola, lora]}


@pytest.fixture
def report():
    return make_report()


def _rows(markdown: str, first_cells: tuple[str, ...]) -> list[list[str]]:
    """Table rows (cells stripped) whose leading cells equal `first_cells`."""
    out = []
    for line in markdown.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if tuple(cells[:len(first_cells)]) == first_cells:
                out.append(cells)
    return out


def _section(markdown: str, heading: str) -> str:
    """The text under a `## heading`, up to the next one."""
    return markdown.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]


def test_markdown_has_every_method_and_checkpoint(report):
    md = rp.render_markdown(report)
    results = _section(md, "Results")
    for m in report["methods"]:
        for cp in m["checkpoints"]:
            assert len(_rows(results, (str(cp["T"]), m["name"]))) == 1, (m["name"], cp["T"])
    ts = [int(r[0]) for r in _rows(results, ()) if r[0].isdigit()]
    assert ts == sorted(ts)  # grouped by T, ascending
    for heading in ("## Results", "## Rollback", "## Routing", "## Definitions"):
        assert heading in md
    assert "zsre" in md and "test box" in md and "0.951" in md  # meta, conflict ceiling


def test_average_is_mean_of_tf_reliability_generality_and_locality(report):
    cp = report["methods"][1]["checkpoints"][1]  # sola, T=10
    expected = (cp["reliability_tf"] + cp["generality_tf"] + cp["locality"]) / 3
    row = _rows(_section(rp.render_markdown(report), "Results"), ("10", "sola"))[0]
    assert row[2] == f"{cp['reliability_tf']:.3f} / {cp['reliability_em']:.3f}"
    assert row[5] == f"{expected:.3f}"
    assert rp.average(cp) == pytest.approx(expected)


def test_average_falls_back_to_em_and_is_null_without_locality(report):
    base_cp = report["methods"][0]["checkpoints"][0]  # TF null: EM stands in
    expected = (base_cp["reliability_em"] + base_cp["generality_em"] + 1.0) / 3
    assert rp.average(base_cp) == pytest.approx(expected)
    assert rp.average(report["methods"][2]["checkpoints"][0]) is None  # locality null


def test_null_renders_as_dash(report):
    md = rp.render_markdown(report)
    results = _section(md, "Results")
    base_row = _rows(results, ("1", "base"))[0]
    assert base_row[2].startswith("– / ")
    lora_row = _rows(results, ("1", "lora-all"))[0]
    assert lora_row[4] == "–" and lora_row[5] == "–"  # Loc., Avg.
    assert "None" not in md and "nan" not in md.lower()


def test_rollback_and_routing_tables(report):
    md = rp.render_markdown(report)
    rollback = _rows(_section(md, "Rollback"), ("sola", "100"))
    assert len(rollback) == 1
    assert rollback[0][3:8] == ["0.980", "0.020", "0.000", "0.000", "1.000"]
    assert rollback[0][9] == "0.880 → 0.870"
    assert not _rows(_section(md, "Rollback"), ("base",))  # only methods with a rollback
    routing = _section(md, "Routing")
    row = _rows(routing, ("100", "sola"))[0]
    assert row[3:8] == ["0.812", "0.013", "–", "0.4321", "l2"]  # no hard false fire given
    assert not _rows(routing, ("1", "base"))  # only methods with routing numbers


def test_comparison_table_defaults_to_largest_T(report):
    table = rp.comparison_table(report)
    sola_cp = report["methods"][1]["checkpoints"][-1]
    row = _rows(table, ("sola",))[0]
    assert row[3] == f"{sola_cp['locality']:.3f}"
    assert [r[0] for r in _rows(table, ())][2:] == ["base", "sola", "lora-all"]
    assert _rows(rp.comparison_table(report, T=1), ("sola",))[0][3] == \
        f"{report['methods'][1]['checkpoints'][0]['locality']:.3f}"
    with pytest.raises(ValueError, match="T=7"):
        rp.comparison_table(report, T=7)


def test_write_outputs_creates_files_and_round_trips(report, tmp_path):
    out = tmp_path / "nested" / "out"
    paths = rp.write_outputs(report, out)
    assert set(paths) == {"json", "markdown", "retention", "distances"}
    for kind in ("retention", "distances"):
        assert Path(paths[kind]).read_bytes()[:4] == PNG_MAGIC
    assert json.loads(Path(paths["json"]).read_text()) == report
    assert Path(paths["markdown"]).read_text() == rp.render_markdown(report)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["report.json", "report.md", "retention.png", "distances.png"])  # no temp files left


def test_no_distances_writes_no_distance_plot(report, tmp_path):
    bare = copy.deepcopy(report)
    for m in bare["methods"]:
        m["distances"] = None
    rp.plot_distances(bare, tmp_path / "d.png")
    assert not (tmp_path / "d.png").exists()
    rp.write_outputs(report, tmp_path)  # a stale plot from an earlier report goes away
    assert (tmp_path / "distances.png").exists()
    paths = rp.write_outputs(bare, tmp_path)
    assert "distances" not in paths and not (tmp_path / "distances.png").exists()
    assert Path(paths["retention"]).read_bytes()[:4] == PNG_MAGIC


def test_linear_bins_when_distances_span_little(report, tmp_path):
    narrow = copy.deepcopy(report)
    narrow["methods"][1]["distances"] = {"hit": [0.0, 0.1], "paraphrase": [0.3, 0.5],
                                        "negative": []}
    groups, bins, log_x = rp._bins({k: v for k, v in narrow["methods"][1]["distances"].items()
                                    if v})
    assert not log_x and bins[0] == 0.0 and groups["hit"][0] == 0.0
    groups, bins, log_x = rp._bins({"hit": [0.0, 1e-3], "negative": [1.0]})
    assert log_x and groups["hit"][0] == pytest.approx(5e-4) and bins[0] == pytest.approx(5e-4)
    rp.plot_distances(narrow, tmp_path / "d.png")
    assert (tmp_path / "d.png").read_bytes()[:4] == PNG_MAGIC


def test_plots_need_matplotlib(report, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(RuntimeError, match=r"sola-vllm\[eval\]"):
        rp.plot_retention(report, tmp_path / "r.png")


def _benchmark_module():
    path = ROOT / "benchmarks" / "edit_quality.py"
    spec = importlib.util.spec_from_file_location("edit_quality_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_script_writes_markdown(report, tmp_path, capsys):
    report_path = tmp_path / "report.json"
    report_path.write_text(json.dumps(report))
    out = tmp_path / "edit_quality.md"
    assert _benchmark_module().main([str(report_path), "--out", str(out)]) == 0
    md = out.read_text()
    assert "Generated by" in md and "do not edit by hand" in md.lower()
    assert str(report_path) in md
    assert "## Comparison at T = 100" in md and rp.comparison_table(report, 100) in md
    assert rp.retention_table(report) in md and "T=1 | T=10 | T=100" in md
    assert "## Definitions" in md and "Locality" in md
    assert str(out) in capsys.readouterr().out


def test_benchmark_script_rejects_bad_report(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    out = tmp_path / "x.md"
    assert _benchmark_module().main([str(bad), "--out", str(out)]) == 2
    assert not out.exists() and "error" in capsys.readouterr().err


def test_benchmark_script_adds_a_section_per_engine_and_refuses_another_stream(report, tmp_path):
    main_path, vllm_path = tmp_path / "report.json", tmp_path / "vllm.json"
    main_path.write_text(json.dumps(report))
    on_vllm = json.loads(json.dumps(report))
    on_vllm["meta"].update(engine="vllm", command="sola-vllm eval --engine vllm", seconds=12.0)
    vllm_path.write_text(json.dumps(on_vllm))
    out = tmp_path / "edit_quality.md"
    assert _benchmark_module().main([str(main_path), "--engine", str(vllm_path),
                                     "--out", str(out)]) == 0
    md = out.read_text()
    section = md[md.index("## On the vllm engine"):md.index("## Definitions")]
    assert "`sola-vllm eval --engine vllm`" in section and "took 12 s" in section
    assert rp.comparison_table(on_vllm, 100) in section

    on_vllm["meta"]["split"] = "dev"
    vllm_path.write_text(json.dumps(on_vllm))
    assert _benchmark_module().main([str(main_path), "--engine", str(vllm_path),
                                     "--out", str(tmp_path / "other.md")]) == 2
    assert not (tmp_path / "other.md").exists()


def test_benchmark_script_adds_a_section_per_threshold_with_its_calibration(report, tmp_path):
    main_path, variant_path = tmp_path / "report.json", tmp_path / "store.json"
    main_path.write_text(json.dumps(report))
    calibrated = copy.deepcopy(report)
    calibrated["meta"]["command"] = "sola-vllm eval --threshold-keep 0.99"
    sola = calibrated["methods"][1]
    sola["router"].update(threshold=0.2125, calibration={
        "threshold": 0.2125, "keep": 0.99, "split": "dev", "keys": 755,
        "negatives": {"hard": 243, "unrelated": 0}, "group_thresholds": {"hard": 0.2125},
        "routed": {"hard": 0.0082, "unrelated": None}})
    sola["checkpoints"][-1]["generality_em"] = 0.4242
    variant_path.write_text(json.dumps(calibrated))
    out = tmp_path / "edit_quality.md"
    assert _benchmark_module().main([str(main_path), "--variant", str(variant_path),
                                     "--out", str(out)]) == 0
    md = out.read_text()
    section = _section(md, "Threshold sola 0.2125 (calibrated on the store)")
    assert "`sola-vllm eval --threshold-keep 0.99`" in section
    # the calibration sentence names the store's keys and each non-empty negative group
    assert "calibrated on its store (755 keys" in section and "243 hard (0.008 routed)" in section
    assert "unrelated" not in section.split("calibrated", 1)[1].split("\n")[0]
    assert rp.comparison_table(calibrated, 100) in section and "0.424" in section
    assert "calibrated on its store" not in md.split("## Threshold")[0]  # the main run is not

    calibrated["meta"]["view"] = "one_per_subject"
    variant_path.write_text(json.dumps(calibrated))
    assert _benchmark_module().main([str(main_path), "--variant", str(variant_path),
                                     "--out", str(tmp_path / "other.md")]) == 2


def test_benchmark_script_names_a_variant_whose_revoked_keys_block(report, tmp_path):
    main_path, variant_path = tmp_path / "report.json", tmp_path / "block.json"
    main_path.write_text(json.dumps(report))
    blocking = copy.deepcopy(report)
    blocking["methods"][1]["router"]["revoked_keys"] = "block"
    variant_path.write_text(json.dumps(blocking))
    out = tmp_path / "edit_quality.md"
    assert _benchmark_module().main([str(main_path), "--variant", str(variant_path),
                                     "--engine", str(variant_path), "--out", str(out)]) == 0
    md = out.read_text()
    assert md.count(", revoked keys block (sola)") == 2  # the variant's and the engine's title
    assert "revoked keys block" not in md.split("## On the")[0]  # the main run drops them


def test_a_chat_run_says_its_prompts_were_chat_messages(report):
    chat = {**report, "meta": {**report["meta"], "prompt_form": "chat"}}
    assert "every prompt sent as a chat message" in rp.meta_block(chat)
    assert "chat message" not in rp.meta_block(report)
