"""The reference engine on the real default model (SmolLM2-135M-Instruct): an edit sticks,
stays local, revokes to the exact base model and restores."""

import pytest
import torch
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow

EDITED = "The capital of France is"
UNRELATED = "The Eiffel Tower is located in the city of"
OTHER = "The largest planet in the solar system is"


@pytest.fixture(scope="module")
def base_model(default_model_path):
    return AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32).eval()


def base_last_logits(base_model, tokenizer, prompt):
    with torch.no_grad():
        return base_model(**tokenizer([prompt], return_tensors="pt")).logits[0, -1].float()


@pytest.fixture(scope="module")
def edit_rome(default_engine):
    return default_engine.train([EDITED], "Rome.", edit_id="rome")


@pytest.fixture(scope="module")
def edit_mars(default_engine):
    return default_engine.train([OTHER], "Mars.", edit_id="mars")


def test_edit_sticks_stays_local_revokes_exactly_and_restores(fresh_edits, base_model,
                                                              edit_rome):
    engine = fresh_edits
    tok = engine.tokenizer
    before = engine.generate([EDITED], max_new_tokens=8)[0]
    assert not before.text.startswith(" Rome")

    engine.add(edit_rome)
    edited = engine.generate([EDITED], max_new_tokens=8)[0]
    assert edited.route.edit_id == "rome"
    assert edited.text == " Rome."  # the target, then EOS
    assert edited.token_ids[-1] == tok.eos_token_id

    logits, routes = engine.last_logits([UNRELATED])
    assert routes[0].edit_id is None
    assert torch.equal(logits[0], base_last_logits(base_model, tok, UNRELATED))

    engine.revoke("rome")
    logits, routes = engine.last_logits([EDITED])
    assert routes[0].edit_id is None
    assert torch.equal(logits[0], base_last_logits(base_model, tok, EDITED))
    assert engine.generate([EDITED], max_new_tokens=8)[0].token_ids == before.token_ids

    engine.restore("rome")
    assert engine.generate([EDITED], max_new_tokens=8)[0].text == " Rome."


def test_mixed_batch_rows_equal_their_separate_runs(fresh_edits, edit_rome, edit_mars):
    engine = fresh_edits
    prompts = [EDITED, OTHER, UNRELATED]
    base_alone = [engine.generate([p], max_new_tokens=6)[0] for p in prompts]
    engine.add(edit_rome)
    engine.add(edit_mars)
    alone = [engine.generate([p], max_new_tokens=6)[0] for p in prompts]
    # each edit changes its own prompt's output, and only that one
    assert alone[0].token_ids != base_alone[0].token_ids
    assert alone[1].token_ids != base_alone[1].token_ids
    assert alone[2].token_ids == base_alone[2].token_ids

    rows = [prompts[i % 3] for i in range(6)]  # A, B, base interleaved as i % 3
    batch = engine.generate(rows, max_new_tokens=6)
    for i, got in enumerate(batch):
        assert got.route.edit_id == ["rome", "mars", None][i % 3]
        assert got.token_ids == alone[i % 3].token_ids

    batch_logits, _ = engine.last_logits(rows)
    for i in range(6):
        single, _ = engine.last_logits([rows[i]])
        # padded rows go through differently blocked matmuls: equal up to float rounding
        torch.testing.assert_close(batch_logits[i], single[0], atol=1e-3, rtol=0)


def test_unrouted_rows_in_a_mixed_batch_are_bit_identical_to_the_base_model(
        fresh_edits, edit_rome, edit_mars):
    engine = fresh_edits
    rows = [EDITED, UNRELATED, OTHER, "Water boils at a temperature of", EDITED]
    base_logits, _ = engine.last_logits(rows)  # no edits loaded: the base model, same batch
    engine.add(edit_rome)
    engine.add(edit_mars)
    logits, routes = engine.last_logits(rows)
    assert [r.edit_id for r in routes] == ["rome", None, "mars", None, "rome"]
    for i in (1, 3):
        assert torch.equal(logits[i], base_logits[i])
    for i in (0, 2, 4):
        assert not torch.equal(logits[i], base_logits[i])


def test_training_is_deterministic_under_a_seed(default_engine, edit_rome):
    again = default_engine.train([EDITED], "Rome.", edit_id="rome-again")
    assert torch.equal(again.keys, edit_rome.keys)
    for name, (a, b) in edit_rome.lora.items():
        assert torch.equal(again.lora[name][0], a)
        assert torch.equal(again.lora[name][1], b)


def test_several_phrasings_each_become_a_key(fresh_edits):
    engine = fresh_edits
    prompts = ["The capital city of Italy is", "Italy's capital is"]
    edit = engine.train(prompts, "Milan.", edit_id="milan")
    assert edit.keys.shape == (2, engine.hidden_size)
    engine.add(edit)
    for got in engine.generate(prompts, max_new_tokens=6):
        assert got.route.edit_id == "milan"
        assert got.text == " Milan."


def test_teacher_forcing_agrees_with_greedy_decoding(fresh_edits, edit_rome):
    """The evaluation's teacher-forced pass routes at the prompt's last token and applies the
    LoRA from there, exactly as decoding does: its argmax chain is the greedy output."""
    from sola_vllm.train import target_ids

    engine = fresh_edits
    engine.add(edit_rome)
    prompts = [EDITED, UNRELATED]
    greedy = engine.generate(prompts, max_new_tokens=4)
    targets = [g.token_ids[:3] for g in greedy]
    predicted, routes = engine.teacher_forced(prompts, targets)
    assert predicted == targets
    assert [r.edit_id for r in routes] == ["rome", None] == [g.route.edit_id for g in greedy]
    # a wrong target is scored as wrong from its first token on
    wrong = target_ids(engine, EDITED, "Paris.", append_eos=False)
    predicted, _ = engine.teacher_forced([EDITED], [wrong])
    assert predicted[0][0] != wrong[0]


def test_nearest_reports_the_nearest_key_whatever_the_threshold(fresh_edits, edit_rome,
                                                                 edit_mars):
    engine = fresh_edits
    assert [r.edit_id for r in engine.nearest([EDITED])] == [None]  # nothing loaded
    engine.add_all([edit_rome, edit_mars])
    near = engine.nearest([EDITED, OTHER, UNRELATED])
    assert [r.edit_id for r in near[:2]] == ["rome", "mars"]
    assert near[0].distance < 1e-4 and near[1].distance < 1e-4
    assert near[2].edit_id in ("rome", "mars") and near[2].distance > engine.router.threshold
    queries = engine.key_queries([UNRELATED])
    assert engine.nearest(queries=queries)[0].distance == pytest.approx(near[2].distance, abs=1e-6)
    # set_active routes only to the named edits; the others stay loaded
    engine.set_active(["mars"])
    assert [r.edit_id for r in engine.nearest([EDITED])] == ["mars"]
    assert engine.generate([EDITED], 2)[0].route.edit_id is None
    with pytest.raises(KeyError, match="not loaded"):
        engine.set_active(["nope"])
