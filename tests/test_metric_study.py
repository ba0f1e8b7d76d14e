"""The learned-metric routing study: the contrastive fit on synthetic pairs (it must find the
subspace where a prompt and its paraphrase agree), its validation, and a small measurement on
the real default model."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sola_vllm.eval.data import load
from sola_vllm.eval.metric_study import (
    FitConfig,
    edits_and_hard_negatives,
    fit_linear_metric,
    measure,
    measured_groups,
    pair_rows,
)
from sola_vllm.eval.routing_study import group_states

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ZSRE, FACTS = SHARED / "zsre_mend_eval_1000.json", SHARED / "rome_known_1000.json"
needs_data = pytest.mark.skipif(not ZSRE.is_file() or not FACTS.is_file(),
                                reason=f"benchmark data under {SHARED} not found")


def _pairs(n: int, seed: int, d: int = 48, signal: int = 4):
    """n (prompt, paraphrase) rows that share an identity in `signal` dimensions and differ by
    loud, independent wording noise in all the others: raw cosine mostly misses the pairing."""
    gen = torch.Generator().manual_seed(seed)
    identity = torch.randn(n, signal, generator=gen)
    noise = lambda: 3.0 * torch.randn(n, d - signal, generator=gen)  # noqa: E731
    prompts = torch.cat([identity, noise()], dim=1)
    paraphrases = torch.cat([identity + 0.1 * torch.randn(n, signal, generator=gen), noise()],
                            dim=1)
    return prompts, paraphrases


def _nearest_own(keys: torch.Tensor, queries: torch.Tensor) -> float:
    sim = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
    return float((sim.argmax(dim=1) == torch.arange(len(keys))).float().mean())


def test_the_fit_finds_the_shared_subspace_and_generalises_to_unseen_pairs():
    train_x, train_y = _pairs(400, seed=0)
    test_x, test_y = _pairs(200, seed=1)  # other identities: nothing here was fitted on
    metric = fit_linear_metric(train_x, train_y, [str(i) for i in range(400)],
                               FitConfig(dim=4, steps=300))
    raw, learned = _nearest_own(test_x, test_y), _nearest_own(metric(test_x), metric(test_y))
    oracle = _nearest_own(test_x[:, :4], test_y[:, :4])  # the identity dimensions alone: 0.92
    assert raw < 0.2 and learned > 0.8 and learned <= oracle, (raw, learned, oracle)
    assert metric(test_x).shape == (200, 4)


def test_same_subject_pairs_are_not_negatives_and_other_relation_rows_are():
    x, y = _pairs(40, seed=2)
    groups = [str(i // 2) for i in range(40)]  # two pairs per subject
    one = fit_linear_metric(x, y, groups, FitConfig(dim=4, steps=20, seed=3))
    again = fit_linear_metric(x, y, groups, FitConfig(dim=4, steps=20, seed=3))
    assert torch.equal(one.proj, again.proj)  # deterministic given the seed
    # an other-relation row equal to the paraphrase contradicts the positive: the fit must
    # change (it is used), and stay finite
    with_other = fit_linear_metric(x, y, groups, FitConfig(dim=4, steps=20, seed=3),
                                   other_relation=y)
    assert not torch.equal(with_other.proj, one.proj) and torch.isfinite(with_other.proj).all()


def test_bad_fit_inputs_are_refused():
    x, y = _pairs(8, seed=4)
    with pytest.raises(ValueError, match="matching rows"):
        fit_linear_metric(x, y[:7], [str(i) for i in range(8)])
    with pytest.raises(ValueError, match="matching rows"):
        fit_linear_metric(x, y, ["a"] * 7)
    with pytest.raises(ValueError, match="other_relation"):
        fit_linear_metric(x, y, [str(i) for i in range(8)], other_relation=y[:3])
    with pytest.raises(ValueError, match="at least 2"):
        fit_linear_metric(x[:1], y[:1], ["a"])
    for bad in ({"dim": 0}, {"steps": -1}, {"lr": 0}, {"temperature": -1.0},
                {"weight_decay": -0.1}, {"dim": True}):
        with pytest.raises(ValueError):
            FitConfig(**bad)


@needs_data
def test_hard_negatives_never_come_from_the_fitted_split():
    zsre, facts = load(ZSRE), load(FACTS)
    test = facts.split("test")
    edits, hard = edits_and_hard_negatives(test, facts, "test", same=True)
    edit_subjects = {c.subject.lower() for c in edits}
    held = [c for c in test if c.prompt in set(hard)]
    assert edits and hard and not edit_subjects & {c.subject.lower() for c in held}
    assert not {c.prompt for c in facts.split("dev")} & set(hard)
    edits, hard = edits_and_hard_negatives(zsre.split("test"), zsre, "test", same=False)
    assert len(edits) == len(zsre.split("test"))
    assert hard == [c.prompt for c in zsre.split("dev")]
    # measuring the dev split (to choose defaults): the test split gives the hard negatives
    edits, hard = edits_and_hard_negatives(zsre.split("dev"), zsre, "dev", same=False)
    assert hard == [c.prompt for c in zsre.split("test")]
    with pytest.raises(ValueError, match="fitted on this dataset's dev split"):
        edits_and_hard_negatives(facts.split("dev"), facts, "dev", same=True)


@needs_data
def test_measure_routes_every_prompt_to_its_own_key_on_the_real_model(default_engine):
    facts, zsre = load(FACTS), load(ZSRE)
    fit = [c for c in facts.split("dev") if c.paraphrases][:12]
    cases = [c for c in zsre.split("test") if c.paraphrases][:6]
    hard = [c.prompt for c in zsre.split("dev")][:8]
    x, y, z = pair_rows(default_engine, fit, 8, "mean1", other_relation=True)
    assert x.shape == y.shape == z.shape == (12, x.shape[1])
    metric = fit_linear_metric(x, y, [c.subject for c in fit], FitConfig(dim=8, steps=10), z)
    by_group = group_states(default_engine, measured_groups(cases, hard), [8])[8]
    rows = measure(by_group, cases, 8, "mean1", {"cosine": lambda v: v, "learned": metric},
                   keep=0.99)
    assert [r["metric"] for r in rows] == ["cosine", "learned"]
    for row in rows:  # a prompt is its own key: nearest, at distance ~0 under any threshold
        assert row["prompt_nearest_own"] == 1.0 and row["prompt_hit_own"] == 1.0
        assert 0.0 <= row["paraphrase_hit_own"] <= row["paraphrase_nearest_own"] <= 1.0
        assert 0.0 <= row["hard_negative_false_fire"] <= 1.0
