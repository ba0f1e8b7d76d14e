"""Training many edits side by side equals training each alone (up to matmul rounding)."""

import pytest

from sola_vllm.config import TrainConfig
from sola_vllm.train_many import EditRequest, train_edits

pytestmark = pytest.mark.slow

REQUESTS = [
    EditRequest("rome", ("The capital of France is",), "Rome."),
    EditRequest("mars", ("The largest planet in the solar system is",
                         "Which planet is the largest?"), "Mars."),
    EditRequest("tea", ("My favourite drink is",), "green tea with lemon"),
]


@pytest.mark.parametrize("config", [
    TrainConfig(),
    TrainConfig(steps=12, lr=0.05, optimizer="sgd", schedule="cosine", stop_loss=0.0),
], ids=["adam-early-stop", "sgd-cosine-fixed-steps"])
def test_batched_training_matches_one_edit_at_a_time(fresh_edits, config):
    engine = fresh_edits
    alone = [engine.train(list(r.prompts), r.target, edit_id=r.edit_id, config=config)
             for r in REQUESTS]
    together = train_edits(engine, REQUESTS, config, chunk=2)  # a chunk boundary inside
    if config.stop_loss:  # the edits of a chunk stop at different steps
        assert alone[0].train_info["steps"] != alone[1].train_info["steps"]
    for a, b in zip(alone, together, strict=True):
        assert a.id == b.id and a.prompts == b.prompts and a.target == b.target
        assert b.train_info["steps"] == a.train_info["steps"]
        assert b.train_info["fit"] == a.train_info["fit"]
        # keys: the same residual, read from a padded batch (rounding only)
        assert float((b.keys - a.keys).norm() / a.keys.norm()) < 1e-5
        for name, (la, lb) in a.lora.items():
            delta_a, delta_b = lb @ la, b.lora[name][1] @ b.lora[name][0]  # [out, in]
            error = float((delta_b - delta_a).norm() / delta_a.norm())
            # batching only adds matmul rounding, also for an edit that fits (and leaves) while
            # others train on: it gets no further step, not even Adam's from its momentum
            assert error < 1e-2, (a.id, name, error)
    # no training adapter is left behind
    assert all(not m.adapters for m in engine.modules.values())
    assert engine.ctx.plan == []
    # the batched edits work: each routes and answers
    engine.add_all(together)
    out = engine.generate(["The capital of France is", "My favourite drink is"], 8)
    if config.optimizer == "adam":  # fitted edits: the same answers as when trained alone
        assert [o.route.edit_id for o in out] == ["rome", "tea"]
        assert out[0].text.strip() == "Rome." and out[1].text.strip() == "green tea with lemon"
        assert all(e.train_info["fit"] for e in together)
