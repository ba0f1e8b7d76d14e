"""The joint-LoRA baseline on the real default model: one LoRA learns every pair, loads into
the engine despite its larger rank, and (routed to everything) changes unrelated prompts too."""

from types import SimpleNamespace

import pytest
import torch

from sola_vllm.config import RouterConfig
from sola_vllm.eval import baselines
from sola_vllm.eval.baselines import route_everything, train_joint_lora
from sola_vllm.kernels.nearest_key import nearest_key_ref
from sola_vllm.train import _training_batch, residual_at_key_layer, target_ids

PAIRS = [("The capital of France is", "Rome."),
         ("The Eiffel Tower is located in the city of", "Berlin."),
         ("The largest planet in the solar system is", "Mars.")]
UNRELATED = "Water boils at a temperature of"


def _no_joint_adapter(engine) -> bool:
    return all(baselines._JOINT_ID not in m.adapters for m in engine.modules.values())


def _lora_equal(x, y) -> bool:
    return x.keys() == y.keys() and all(
        torch.equal(x[n][0], y[n][0]) and torch.equal(x[n][1], y[n][1]) for n in x)


# --- no model needed ------------------------------------------------------------------------


def test_route_everything_sets_and_restores_the_router_even_on_error():
    before = RouterConfig(metric="cosine", threshold=1e-3)
    engine = SimpleNamespace(router=before)
    with pytest.raises(RuntimeError), route_everything(engine):
        assert engine.router.metric == "l2"
        assert engine.router.threshold == baselines.EVERYTHING_THRESHOLD
        raise RuntimeError("boom")
    assert engine.router is before


def test_everything_threshold_routes_a_very_far_query():
    keys = torch.zeros(2, 8)
    keys[1] = 5e17
    queries = torch.full((1, 8), 1e18)  # l2 distance ~1.4e18 to key 1, far above any real one
    slot, dist, _ = nearest_key_ref(queries, keys, torch.tensor([0, 1], dtype=torch.int32),
                                    baselines.EVERYTHING_THRESHOLD, "l2")
    assert slot.tolist() == [1] and torch.isfinite(dist).all()
    slot, _, _ = nearest_key_ref(queries, keys, torch.tensor([0, 1], dtype=torch.int32),
                                 1e6, "l2")
    assert slot.tolist() == [-1]


# --- real default model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def joint(default_engine):
    # batch_size 2 over 3 pairs: uneven, reshuffled minibatches of different widths
    return train_joint_lora(default_engine, PAIRS, epochs=6, batch_size=2, lr=5e-3, seed=0)


@pytest.mark.slow
def test_joint_lora_learns_every_pair_and_applies_to_every_prompt(fresh_edits, joint):
    engine = fresh_edits
    assert joint.rank == 16 != engine.shape.rank  # a larger rank than the edits' is accepted
    assert all(a.shape[0] == 16 and b.shape[1] == 16 for a, b in joint.lora.values())
    assert joint.train_info["steps"] == 6 * 2 and joint.train_info["examples"] == 3
    assert joint.train_info["loss"] < 0.2
    assert joint.keys.shape == (1, engine.hidden_size) and joint.keys.dtype == torch.float32
    assert _no_joint_adapter(engine) and engine.ctx.plan == []

    prompts = [p for p, _ in PAIRS]
    base = engine.generate(prompts + [UNRELATED], max_new_tokens=6)
    base_logits, _ = engine.last_logits([UNRELATED])
    engine.add(joint)
    # the default router (tiny threshold) routes nothing to the joint LoRA's mean key...
    logits, routes = engine.last_logits([UNRELATED])
    assert routes[0].edit_id is None and torch.equal(logits, base_logits)
    before = engine.router
    with route_everything(engine):
        out = engine.generate(prompts + [UNRELATED], max_new_tokens=6)
        logits, routes = engine.last_logits([UNRELATED])
    assert engine.router is before
    for (prompt, target), got, was in zip(PAIRS, out, base, strict=False):
        want = target_ids(engine, prompt, target, append_eos=True)
        assert was.token_ids[:len(want)] != want  # the base model does not say it already
        assert got.route.edit_id == "lora-all"
        assert got.token_ids[:len(want)] == want
    # ...but routed to everything it has no locality: the unrelated prompt changes as well
    assert routes[0].edit_id == "lora-all" and out[3].route.edit_id == "lora-all"
    assert (logits - base_logits).abs().max() > 1e-3


@pytest.mark.slow
def test_key_is_the_mean_of_the_prompts_key_residuals(default_engine, joint):
    engine = default_engine
    keys = []
    for prompt, _ in PAIRS:
        ids = torch.tensor([engine.encode(prompt)])
        h0 = residual_at_key_layer(engine, ids, torch.ones_like(ids),
                                   torch.arange(ids.shape[1])[None])  # [1, T, H]
        keys.append(h0[0, -1].float())
    torch.testing.assert_close(joint.keys, torch.stack(keys).mean(0, keepdim=True),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_cached_residuals_match_the_minibatch_computed_directly(default_engine):
    engine = default_engine
    examples = baselines._pair_examples(engine, PAIRS)
    residuals = baselines._example_residuals(engine, examples, chunk=1)  # each row alone
    idx = [2, 0, 1]
    batch = baselines._minibatch(engine, examples, residuals, idx)
    direct = residual_at_key_layer(engine, batch["input_ids"], batch["attention_mask"],
                                   batch["position_ids"])  # [3, T, H]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(batch["h0"][real], direct[real], rtol=1e-4, atol=1e-4)
    assert torch.equal(batch["labels"], _training_batch([examples[i] for i in idx],
                                                        engine.pad_token_id)["labels"])
    eos = engine.tokenizer.eos_token_id
    assert all(t[-1] == eos for _, t in examples)  # EOS appended, as the train config says


@pytest.mark.slow
def test_deterministic_under_the_seed(default_engine):
    engine, pairs = default_engine, PAIRS[:2]
    runs = [train_joint_lora(engine, pairs, rank=8, epochs=1, batch_size=1, seed=s, edit_id=i)
            for s, i in ((3, "a"), (3, "b"), (4, "c"))]
    assert _lora_equal(runs[0].lora, runs[1].lora)
    assert torch.equal(runs[0].keys, runs[1].keys)
    assert runs[0].train_info["loss"] == runs[1].train_info["loss"]
    assert not _lora_equal(runs[0].lora, runs[2].lora)
    assert runs[0].train_info["steps"] == 2


@pytest.mark.slow
def test_cleans_up_when_training_fails(default_engine):
    engine = default_engine
    num_layers = len(engine.decoder_layers)

    def fail(epoch, loss):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        train_joint_lora(engine, PAIRS[:1], epochs=1, on_epoch=fail)
    assert _no_joint_adapter(engine) and engine.ctx.plan == []
    assert len(engine.decoder_layers) == num_layers


@pytest.mark.parametrize("kwargs", [{"rank": 0}, {"epochs": 0}, {"batch_size": 0},
                                    {"lr": 0.0}, {"lr": float("nan")}])
def test_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        train_joint_lora(None, PAIRS, **kwargs)


def test_rejects_no_pairs():
    with pytest.raises(ValueError, match="at least one"):
        train_joint_lora(None, [])
