"""The routing study: its key-space transforms, and a small study on the real default model."""

from pathlib import Path

import pytest
import torch

from sola_vllm.eval.data import load
from sola_vllm.eval.routing_study import TRANSFORMS, WHITEN_SHRINK, fit_transform, study

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "zsre_mend_eval_1000.json"
needs_data = pytest.mark.skipif(not DATA.is_file(), reason=f"benchmark data {DATA} not found")


def test_center_and_whiten_are_fitted_on_the_background():
    gen = torch.Generator().manual_seed(0)
    mix = torch.tensor([[3.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.2, 0.1]])
    rows = torch.randn(4000, 3, generator=gen) @ mix + torch.tensor([5.0, -2.0, 1.0])
    assert torch.equal(fit_transform(rows, "raw")(rows), rows)
    centered = fit_transform(rows, "center")(rows)
    assert torch.allclose(centered.mean(dim=0), torch.zeros(3), atol=1e-4)
    white = fit_transform(rows, "whiten")(rows)
    # each principal direction of variance v ends with variance v / (v + ridge): ~1 for the
    # large ones, less for directions not much above the ridge (1 % of the mean variance)
    before = torch.linalg.eigvalsh(torch.cov(rows.T).double())
    after = torch.linalg.eigvalsh(torch.cov(white.T).double())
    ridge = WHITEN_SHRINK * before.mean()
    assert torch.allclose(after, before / (before + ridge), atol=1e-3)
    assert after.max() > 0.99
    with pytest.raises(ValueError, match="not one of"):
        fit_transform(rows, "pca")


@needs_data
def test_study_routes_every_prompt_to_its_own_key_under_each_transform(default_engine):
    data = load(DATA)
    cases = [c for c in data.split("dev") if c.paraphrases][:6]
    test = data.split("test")
    hard = [c.prompt for c in test][:8]
    background = [c.prompt for c in test][8:40]
    rows = study(default_engine, cases, hard, [8], ["cosine"], 0.99, ("last", "mean"),
                 TRANSFORMS, background)
    assert [(r["mode"], r["transform"]) for r in rows] == [
        (m, t) for m in ("last", "mean") for t in TRANSFORMS]
    for row in rows:  # a prompt is its own key: nearest, and under any positive threshold
        assert row["prompt_nearest_own"] == 1.0 and row["prompt_hit_own"] == 1.0
        assert row["threshold"] > 0
        assert 0.0 <= row["paraphrase_hit_own"] <= row["paraphrase_nearest_own"] <= 1.0
    gated = study(default_engine, cases, hard, [8], ["cosine"], 0.99, ("gated",), ("raw",),
                  relation_threshold=0.05)
    assert len(gated) == 1 and gated[0]["threshold"] == 0.05 and gated[0]["subject_gate"] > 0
    assert gated[0]["prompt_hit_own"] == 1.0  # own subject token and own last token: distance 0
    with pytest.raises(ValueError, match="background"):
        study(default_engine, cases, hard, [8], ["cosine"], 0.99, ("last",), ("center",), [])
