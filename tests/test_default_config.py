"""The configuration commands run without `--config` (`default_config`): the model's recommended
one (mean-pooled keys under the fitted map for the default model), or the reading of the edits a
store already holds."""

import dataclasses
import json

import pytest
from helpers import make_synthetic_edit

from sola_vllm.cli import build_parser
from sola_vllm.commands import command_config, load_config
from sola_vllm.config import SolaConfig
from sola_vllm.default_config import LAST_TOKEN, RECOMMENDED, default_config, shipped_config
from sola_vllm.key_map import KeyMap
from sola_vllm.models import tiny_model
from sola_vllm.store import EditStore

MEAN_L6 = "smollm2-135m-instruct-mean-l6"  # the key map, and the configuration at its threshold
STRICT = "smollm2-135m-instruct-mean-l6-strict"  # the default model's recommended configuration
CHAT = "smollm2-135m-instruct-mean-l6-chat"  # its variant for edits trained with chat forms
MISSING_MODEL = "/nonexistent/model"  # the store decides: the weights are never needed


def _map_model() -> str:
    return KeyMap.load(MEAN_L6).info["model_fingerprint"]


def _store(tmp_path, model_fingerprint: str, **reading) -> EditStore:
    edit = make_synthetic_edit("e1", layers=(8, 9), model_fingerprint=model_fingerprint)
    store = EditStore(tmp_path / "store")
    store.add(dataclasses.replace(edit, **reading))
    return store


def test_the_shipped_last_token_configuration_is_the_library_default():
    assert shipped_config(LAST_TOKEN).to_dict() == SolaConfig().to_dict()
    assert load_config(LAST_TOKEN).to_dict() == SolaConfig().to_dict()
    assert RECOMMENDED[0] == STRICT
    strict, broad = load_config(STRICT), load_config(MEAN_L6)
    assert strict.edit == broad.edit
    assert strict.router.key_map == broad.router.key_map == MEAN_L6
    # stricter than the map's own threshold: same-subject, other-relation prompts stay unrouted
    assert strict.router.threshold == 0.037 < broad.router.threshold


def test_a_model_without_a_recommended_configuration_gets_last_token_keys():
    choice = default_config(tiny_model("llama"))
    assert choice.name == LAST_TOKEN and choice.config.to_dict() == SolaConfig().to_dict()


@pytest.mark.slow
def test_the_default_model_gets_its_recommended_configuration(default_model_path):
    choice = default_config(default_model_path)
    assert choice.name == STRICT
    assert choice.config.to_dict() == load_config(STRICT).to_dict()
    assert choice.config.edit.key_pool == "mean" and choice.config.router.key_map == MEAN_L6


def test_a_store_of_mean_l6_edits_for_the_maps_model_keeps_the_recommended_configuration(
        tmp_path):
    store = _store(tmp_path, _map_model(), key_pool="mean", route_layer=6)
    choice = default_config(MISSING_MODEL, store)
    assert choice.name == STRICT and choice.config.router.key_map == MEAN_L6


def test_a_store_of_chat_form_edits_keeps_training_chat_forms(tmp_path):
    store = _store(tmp_path, _map_model(), key_pool="mean", route_layer=6,
                   train_info={"steps": 3, "chat_form": True})
    choice = default_config(MISSING_MODEL, store)
    assert choice.name == CHAT and choice.config.train.chat_form
    strict = load_config(STRICT)
    assert choice.config.edit == strict.edit and choice.config.router == strict.router
    assert not strict.train.chat_form
    # chat forms' pooled keys sit closer together: chat-form keys route under a tighter
    # threshold (map_threshold_chat), raw keys under the default's
    assert strict.router.thresholds == {"raw": 0.037, "chat": 0.0069}


def test_a_store_of_last_token_edits_keeps_last_token_keys_on_the_default_model(tmp_path):
    """A store trained under the old default serves as it was trained."""
    store = _store(tmp_path, _map_model())
    choice = default_config(MISSING_MODEL, store)
    assert choice.name == LAST_TOKEN and choice.config.to_dict() == SolaConfig().to_dict()


def test_mean_l6_edits_of_another_model_do_not_get_the_maps_configuration(tmp_path):
    store = _store(tmp_path, "f" * 64, key_pool="mean", route_layer=6)
    assert default_config(MISSING_MODEL, store).name == LAST_TOKEN


def test_an_empty_store_leaves_the_choice_to_the_model(tmp_path):
    store = EditStore.create(tmp_path / "store")
    assert default_config(tiny_model("llama"), store).name == LAST_TOKEN
    with pytest.raises(FileNotFoundError):
        default_config(MISSING_MODEL, store)


def test_an_edit_imported_into_an_empty_store_decides_by_its_own_reading(tmp_path):
    store = EditStore.create(tmp_path / "store")
    plain = make_synthetic_edit("e1", layers=(8, 9), model_fingerprint=_map_model())
    pooled = dataclasses.replace(plain, key_pool="mean", route_layer=6)
    assert default_config(MISSING_MODEL, store, plain).name == LAST_TOKEN
    assert default_config(MISSING_MODEL, store, pooled).name == STRICT
    assert default_config(MISSING_MODEL, None, pooled).name == STRICT
    store.add(plain)  # the store's edits come first
    assert default_config(MISSING_MODEL, store, pooled).name == LAST_TOKEN


def test_an_explicit_config_wins_over_the_store(tmp_path):
    store = _store(tmp_path, _map_model(), key_pool="mean", route_layer=6)
    args = build_parser().parse_args(["generate", "--prompt", "x", "--config", LAST_TOKEN,
                                      "--model", MISSING_MODEL])
    assert command_config(args, store).to_dict() == SolaConfig().to_dict()
    args = build_parser().parse_args(["generate", "--prompt", "x", "--model", MISSING_MODEL])
    assert command_config(args, store).to_dict() == load_config(STRICT).to_dict()


def test_serve_passes_the_chosen_configuration_and_says_how_it_routes(tmp_path):
    from sola_vllm.serving.manager import CONFIG_ENV
    from sola_vllm.serving.serve import describe_routing, prepare

    args, extra = build_parser().parse_known_args(
        ["serve", "--store", str(tmp_path / "empty"), "--model", str(tiny_model("llama"))])
    _, env = prepare(args, extra)
    config = json.loads(env[CONFIG_ENV])
    assert config == SolaConfig().to_dict()
    assert describe_routing(config) == ("last-token keys entering the first edited layer, "
                                        "cosine distance < 0.006")
    assert describe_routing(load_config(MEAN_L6).to_dict()) == (
        f"mean-pooled keys entering layer 6 under key map {MEAN_L6}, cosine distance < 0.17")


@pytest.mark.slow
def test_a_store_of_pooled_edits_serves_with_their_reading(default_model_path, tmp_path):
    """Store summaries carry the edits' key reading, so `serve` builds the shape they were
    trained with (before, it read every store as last-token and refused pooled ones)."""
    from sola_vllm.arch import resolve
    from sola_vllm.serving.manager import CONFIG_ENV
    from sola_vllm.serving.serve import prepare

    config = load_config(STRICT)
    shape = resolve(config.edit, "llama", 30)
    edit = make_synthetic_edit("e1", layers=shape.layers, modules=shape.modules, hidden=576,
                               intermediate=1536, rank=8, model_fingerprint=_map_model(),
                               shape_fingerprint=shape.fingerprint())
    store = EditStore(tmp_path / "store")
    store.add(dataclasses.replace(edit, key_pool="mean", route_layer=6))
    assert store.list()[0]["key_pool"] == "mean" and store.list()[0]["route_layer"] == 6
    for given in ([], ["--config", STRICT]):
        args, extra = build_parser().parse_known_args(
            ["serve", "--store", str(store.path), "--model", str(default_model_path), *given])
        _, env = prepare(args, extra)
        served = json.loads(env[CONFIG_ENV])
        assert served["router"] == config.to_dict()["router"]
        assert (served["edit"]["key_pool"], served["edit"]["route_layer"]) == ("mean", 6)
