"""The reference engine on tiny random Llama, Qwen2, Qwen3 and GPT-2 models (real tokenizer):
training, routing, decode-time routing, exactness and bad input, per architecture."""

import pytest
import torch

from sola_vllm.config import EditConfig, SolaConfig, TrainConfig
from sola_vllm.engine import EditMismatchError, RoutedEngine
from sola_vllm.models import build_tiny_model, tiny_model

ARCHS = ["llama", "qwen2", "qwen3", "gpt2"]
PROMPT = "The secret password of the castle is"
TARGET = "blue harbor seven lantern"  # several tokens a random model never produces by itself
# Random tiny models cannot reach a real model's confidence: stop once every target token is the
# argmax (loss < 3), and train no EOS after the target.
CONFIG = SolaConfig(edit=EditConfig(layers=(2, 3)),
                    train=TrainConfig(steps=150, lr=5e-2, stop_loss=3.0, append_eos=False))
TARGET_TOKENS = 4


@pytest.fixture(scope="module", params=ARCHS)
def engine(request):
    return RoutedEngine.from_pretrained(tiny_model(request.param), CONFIG)


@pytest.fixture(scope="module")
def trained(engine):
    return engine.train([PROMPT], TARGET, edit_id="secret")


def test_edit_generates_the_whole_target_because_decode_keeps_the_route(clean, trained):
    engine = clean
    assert trained.train_info["fit"], trained.train_info
    base = engine.generate([PROMPT], max_new_tokens=TARGET_TOKENS)[0]
    engine.add(trained)
    got = engine.generate([PROMPT], max_new_tokens=TARGET_TOKENS)[0]
    # the prompt's key token routes once; every decode step after it must carry the edit,
    # or the later target tokens (which only the LoRA produces) would not appear
    assert got.route.edit_id == "secret"
    assert got.text == " " + TARGET
    assert base.text != got.text


def test_prompt_tokens_before_the_key_token_run_through_the_base_model(clean, trained):
    engine = clean
    base_logits, mask, _ = engine.forward_logits([PROMPT])
    engine.add(trained)
    logits, _, routes = engine.forward_logits([PROMPT])
    assert routes[0].edit_id == "secret"
    assert torch.equal(logits[0, :-1], base_logits[0, :-1])  # decision 2: untouched
    assert not torch.equal(logits[0, -1], base_logits[0, -1])  # the key token carries the edit


def test_unrouted_prompt_and_revoked_edit_are_bit_identical_to_base(clean, trained):
    engine = clean
    other = "A completely different sentence about gardening"
    base_other, _ = engine.last_logits([other, PROMPT])
    engine.add(trained)
    logits, routes = engine.last_logits([other, PROMPT])
    assert [r.edit_id for r in routes] == [None, "secret"]
    assert torch.equal(logits[0], base_other[0])
    engine.revoke("secret")
    logits, routes = engine.last_logits([other, PROMPT])
    assert [r.edit_id for r in routes] == [None, None]
    assert torch.equal(logits, base_other)


def test_engine_refuses_an_edit_for_another_base_model(engine, trained, tmp_path):
    arch = engine.model.config.model_type
    other = RoutedEngine.from_pretrained(build_tiny_model(arch, tmp_path / "other", seed=1),
                                         CONFIG)
    with pytest.raises(EditMismatchError, match="base model"):
        other.add(trained)
    assert other.edits == {}


def test_engine_refuses_an_edit_for_another_layer_set(engine, trained):
    config = SolaConfig(edit=EditConfig(layers=(1, 2)))
    model_path = tiny_model(engine.model.config.model_type)
    other = RoutedEngine.from_pretrained(model_path, config)
    with pytest.raises(EditMismatchError, match="layers"):
        other.add(trained)


def test_duplicate_edit_id_is_refused(clean, trained):
    clean.add(trained)
    with pytest.raises(ValueError, match="already loaded"):
        clean.add(trained)


@pytest.mark.parametrize("bad, message", [
    (dict(layers=(9,)), "layer 9 does not exist"),
    (dict(modules=("mlp.nonexistent",)), "mlp.nonexistent"),
])
def test_unknown_layer_or_module_is_named(bad, message):
    with pytest.raises(ValueError, match=message):
        RoutedEngine.from_pretrained(tiny_model("llama"), SolaConfig(edit=EditConfig(**bad)))


def test_empty_target_and_overlong_prompt_are_refused(engine):
    with pytest.raises(ValueError, match="target must be a non-empty string"):
        engine.train([PROMPT], "   ")
    too_long = "word " * 600
    with pytest.raises(ValueError, match="context is 512 tokens"):
        engine.train([too_long], "x")
    with pytest.raises(ValueError, match="context is 512 tokens"):
        engine.generate([too_long])
    with pytest.raises(ValueError, match="edit id"):
        engine.train([PROMPT], "x", edit_id="../escape")
