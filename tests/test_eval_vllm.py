"""The evaluation harness on vLLM (`--engine vllm`): the same edits, trained once, give exactly the
reference engine's metrics when served by vLLM with the plugin (fp32, eager, CPU)."""

import os
from pathlib import Path

import pytest

from sola_vllm.eval import harness
from sola_vllm.eval.harness import EvalConfig
from sola_vllm.eval.methods import build_methods
from sola_vllm.eval.outcomes import Outcomes
from sola_vllm.store import EditStore

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "zsre_mend_eval_1000.json"
needs_data = pytest.mark.skipif(not DATA.is_file(), reason=f"benchmark data {DATA} not found")


@needs_data
def test_lora_all_on_vllm_is_refused_before_vllm_starts(tmp_path, monkeypatch):
    from sola_vllm.eval import vllm_engine

    def no_vllm(*args, **kwargs):
        raise AssertionError("vLLM must not start")

    monkeypatch.setattr(vllm_engine, "_start", no_vllm)
    monkeypatch.setattr(vllm_engine, "_trained_edits", no_vllm)
    cfg = EvalConfig(data=DATA, edits=2, checkpoints=(1, 2), methods=("lora-all",),
                     engine="vllm", out=tmp_path)
    with pytest.raises(ValueError, match="reference engine only"):
        harness.run(cfg)
    assert not (tmp_path / "edits").exists()


@pytest.mark.slow
@needs_data
def test_vllm_metrics_and_tokens_equal_the_reference_engines(tmp_path, monkeypatch):
    pytest.importorskip("vllm")
    from sola_vllm.eval import vllm_engine

    calls = []  # each batch of vLLM generations: {(prompt, max tokens): token ids}
    generate = vllm_engine._Tokens.__call__

    def recorded(self, requests):
        calls.append(generate(self, requests))
        return calls[-1]

    monkeypatch.setattr(vllm_engine._Tokens, "__call__", recorded)
    said = []
    options = dict(data=DATA, edits=3, checkpoints=(1, 3), methods=("sola",), out=tmp_path)
    cfg = EvalConfig(engine="vllm", **options)
    served = harness.run(cfg, said.append)
    assert "  training 3 edits (sola) on the reference engine" in said
    store = EditStore(harness.edits_dir(cfg, build_methods(["sola"], cfg.config)[0]))
    trained = store.list()
    assert [e["id"] for e in trained] == ["zsre-0000", "zsre-0001", "zsre-0002"]
    reference = harness.run(EvalConfig(engine="reference", **options))
    assert store.list() == trained, "the reference run must reuse the same edits"

    (got,), (want,) = served["methods"], reference["methods"]
    assert served["meta"]["engine"] == "vllm" and got["name"] == "sola"
    assert got["router"] == want["router"] and got["distances"] is None
    assert [r["T"] for r in got["checkpoints"]] == [r["T"] for r in want["checkpoints"]] == [1, 3]
    for g, w in zip(got["checkpoints"], want["checkpoints"], strict=True):
        assert g.keys() == w.keys()
        assert g["reliability_tf"] is None and g["generality_tf"] is None and g["routing"] is None
        assert (g["n_eval"], g["reliability_em"], g["generality_em"], g["locality"]) == (
            w["n_eval"], w["reliability_em"], w["generality_em"], w["locality"]), (g, w)
    assert got["rollback"].keys() == want["rollback"].keys()
    unseen = ("revoked_routes", "revoked_exact_unshadowed")  # needs routes vLLM does not report
    assert all(got["rollback"][k] is None for k in unseen)
    assert ({k: v for k, v in got["rollback"].items() if k not in unseen}
            == {k: v for k, v in want["rollback"].items() if k not in unseen})
    assert got["rollback"]["revoked"] == 1 and got["rollback"]["revoked_exact"] == 1.0
    notes = got["engine_notes"]
    assert notes["start_seconds"] > 0 and notes["add_seconds"] > 0
    assert notes["generated_prompts"] > 0

    # token parity: every generation equals the reference engine's for the same prompt, length
    # and route (the reference routed each edit prompt to its own edit and nothing else)
    routing = [r["routing"] for r in want["checkpoints"]]
    assert all((r["prompt_hit"], r["paraphrase_hit"], r["false_fire"]) == (1.0, 0.0, 0.0)
               for r in routing), routing
    _, stream = harness.edit_stream(cfg)
    owner = {c.prompt: c.id for c in stream}
    revoked = vllm_engine._revoked(cfg, stream)
    ids = [c.id for c in stream]
    active = [set(), set(ids[:1]), set(ids), set(ids) - revoked]  # base, T=1, T=3, rollback
    assert len(calls) == len(active)
    outcomes = Outcomes(tmp_path / "outcomes.jsonl")
    outcomes.close()
    compared = 0
    for generations, live in zip(calls, active, strict=True):
        for (prompt, n), tokens in generations.items():
            route = owner.get(prompt) if owner.get(prompt) in live else None
            key = Outcomes.key("greedy", store.path.name, route, prompt, n)
            if key in outcomes.data or live:  # the reference ran no base method
                assert tokens == outcomes.data[key], (prompt, n, route)
                compared += 1
    assert compared >= 20
