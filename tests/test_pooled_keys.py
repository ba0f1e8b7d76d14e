"""Pooled routing keys and fitted key maps on the reference engine: the pooling against a
per-row loop, the key map file and its refusals, the configuration's rules, and routing on a
tiny model with mean-pooled keys read at an earlier layer, under a map."""

import json

import pytest
import torch
import torch.nn.functional as F
from helpers import FACTS, ZSRE, needs_data

from sola_vllm.arch import EditShape, resolve
from sola_vllm.config import EditConfig, RouterConfig, SolaConfig, TrainConfig, fingerprint
from sola_vllm.edit import Edit
from sola_vllm.engine import EditMismatchError, RoutedEngine
from sola_vllm.eval.data import DataError, load
from sola_vllm.eval.fit_map import fit, load_pairs
from sola_vllm.eval.metric_study import FitConfig
from sola_vllm.key_map import KeyMap, KeyMapError, resolve_path
from sola_vllm.keys import pool_keys
from sola_vllm.models import tiny_model
from sola_vllm.train import residuals_at

PROMPT = "The secret password of the castle is"
TARGET = "blue harbor seven lantern"
OTHER = "A completely different sentence about gardening"
TRAIN = TrainConfig(steps=150, lr=5e-2, stop_loss=3.0, append_eos=False)
MEAN = EditConfig(layers=(2, 3), key_pool="mean", route_layer=1)


# --- pooling ------------------------------------------------------------------------------------
def _loop_mean(states, mask, key_pos):
    out = []
    for row in range(states.shape[0]):
        real = mask[row].nonzero().flatten().tolist()
        first, last = real[0], int(key_pos[row])
        cols = [c for c in real if c <= last and (c > first or last == first)]
        out.append(states[row, cols].float().mean(dim=0))
    return torch.stack(out)


@pytest.mark.parametrize("side", ["left", "right"])
def test_mean_pool_averages_prompt_tokens_but_the_first_up_to_the_key_token(side):
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(4, 7, 5, generator=gen)
    lengths = [7, 4, 1, 3]  # a one-token prompt keeps its only state
    mask = torch.zeros(4, 7, dtype=torch.long)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, 7 - n:] = 1
        else:
            mask[row, :n] = 1
    key_pos = torch.tensor([6, 6, 6, 6]) if side == "left" else torch.tensor([4, 3, 0, 2])
    got = pool_keys(states, mask, key_pos, "mean")  # row 0 right-padded: targets after key_pos
    assert torch.allclose(got, _loop_mean(states, mask, key_pos), atol=1e-6)
    assert torch.equal(pool_keys(states, mask, key_pos, "last"), states[torch.arange(4), key_pos])
    with pytest.raises(ValueError, match="key pool 'max'"):
        pool_keys(states, mask, key_pos, "max")


# --- configuration ------------------------------------------------------------------------------
def test_default_keys_keep_the_layer_set_fingerprint_and_other_keys_change_it():
    shape = resolve(EditConfig(layers=(2, 3)), "llama", 4)
    legacy = fingerprint({"arch": "llama", "layers": [2, 3],
                          "modules": ["mlp.up_proj", "mlp.down_proj"]})
    assert shape.fingerprint() == legacy  # stores written before pooled keys stay valid
    assert resolve(EditConfig(layers=(2, 3), route_layer=2), "llama", 4).fingerprint() == legacy
    pooled = {resolve(MEAN, "llama", 4).fingerprint(),
              resolve(EditConfig(layers=(2, 3), key_pool="mean"), "llama", 4).fingerprint(),
              resolve(EditConfig(layers=(2, 3), route_layer=0), "llama", 4).fingerprint()}
    assert legacy not in pooled and len(pooled) == 3


def test_route_layer_after_the_first_edited_layer_and_unknown_pools_are_refused():
    with pytest.raises(ValueError, match="route_layer 3 comes after the first edited layer 2"):
        EditConfig(layers=(2, 3), route_layer=3)
    with pytest.raises(ValueError, match="route_layer 25 comes after"):
        resolve(EditConfig(route_layer=25), "llama", 30)  # default layers 24-26
    with pytest.raises(ValueError, match="key_pool 'max'"):
        EditConfig(key_pool="max")
    with pytest.raises(ValueError, match="route_layer must be a non-negative int"):
        EditConfig(route_layer=-1)


# --- the key map file ---------------------------------------------------------------------------
def _map(d=6, k=3, **info):
    gen = torch.Generator().manual_seed(1)
    base = {"model_fingerprint": "m" * 64, "hidden_size": d, "key_pool": "mean",
            "route_layer": 1}
    return KeyMap(torch.randn(d, generator=gen), 2.5, torch.randn(d, k, generator=gen),
                  {**base, **info})


def test_key_map_file_round_trips_and_maps_as_documented(tmp_path):
    key_map = _map(threshold=0.2)
    key_map.save(tmp_path / "m.safetensors")
    again = KeyMap.load(tmp_path / "m.safetensors")
    x = torch.randn(4, 6)
    assert torch.equal(again(x), (x - key_map.mean) / 2.5 @ key_map.proj)
    assert again.fingerprint() == key_map.fingerprint() and again.threshold == 0.2
    assert again.info["path"] == str(tmp_path / "m.safetensors")


def test_key_map_refuses_another_model_key_kind_or_size():
    key_map = _map()
    key_map.check_fits("m" * 64, 6, "mean", 1)
    for args, what in ((("x" * 64, 6, "mean", 1), "model_fingerprint"),
                       (("m" * 64, 6, "last", 1), "key_pool"),
                       (("m" * 64, 6, "mean", 2), "route_layer"),
                       (("m" * 64, 8, "mean", 1), "hidden size")):
        with pytest.raises(KeyMapError, match=what):
            key_map.check_fits(*args)


def test_malformed_key_map_files_get_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(KeyMapError, match="not a sola-vllm key map"):
        KeyMap.load(garbage)
    with pytest.raises(KeyMapError, match="cannot read key map"):
        KeyMap.load(tmp_path / "missing.safetensors")
    with pytest.raises(KeyMapError, match="no shipped map of that name"):
        resolve_path("no-such-map")
    with pytest.raises(KeyMapError, match="does not fit mean"):
        KeyMap(torch.zeros(4), 1.0, torch.zeros(5, 2))
    with pytest.raises(KeyMapError, match="NaN or Inf"):
        KeyMap(torch.full((4,), float("nan")), 1.0, torch.zeros(4, 2))
    with pytest.raises(KeyMapError, match="scale must be positive"):
        KeyMap(torch.zeros(4), 0.0, torch.zeros(4, 2))


def test_router_threshold_defaults_to_the_maps_calibrated_one(tmp_path):
    _map(threshold=0.25).save(tmp_path / "cal.safetensors")
    _map().save(tmp_path / "plain.safetensors")
    assert RouterConfig().threshold == 0.006
    assert RouterConfig(key_map=str(tmp_path / "cal.safetensors")).threshold == 0.25
    assert RouterConfig(key_map=str(tmp_path / "cal.safetensors"), threshold=0.1).threshold == 0.1
    with pytest.raises(ValueError, match="carries no calibrated threshold"):
        RouterConfig(key_map=str(tmp_path / "plain.safetensors"))


# --- the reference engine -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine():
    return RoutedEngine.from_pretrained(tiny_model("llama"), SolaConfig(edit=MEAN, train=TRAIN))


@pytest.fixture(scope="module")
def trained(engine):
    return engine.train([PROMPT], TARGET, edit_id="secret")


def _route_layer_states(engine, prompt):
    ids = torch.tensor([engine.encode(prompt)])
    return residuals_at(engine, [1], ids, torch.ones_like(ids),
                        torch.arange(ids.shape[1])[None])[1][0]  # [T, d]


def test_pooled_key_is_the_mean_of_route_layer_states_and_queries_match_it(engine, trained):
    states = _route_layer_states(engine, PROMPT)
    assert torch.allclose(trained.keys[0], states[1:].float().mean(dim=0), atol=1e-5)
    assert torch.allclose(engine.key_queries([PROMPT])[0], trained.keys[0], atol=1e-5)
    assert (trained.key_pool, trained.route_layer) == ("mean", 1)
    again = Edit.from_bytes(trained.to_bytes())
    assert (again.key_pool, again.route_layer) == ("mean", 1)
    assert again.summary()["key_pool"] == "mean"


def test_mean_keyed_edit_routes_generates_and_revokes_exactly(clean, trained):
    engine = clean
    base = engine.generate([OTHER, PROMPT], max_new_tokens=4)
    base_logits, _ = engine.last_logits([OTHER, PROMPT])
    engine.add(trained)
    got = engine.generate([OTHER, PROMPT], max_new_tokens=4)
    assert [g.route.edit_id for g in got] == [None, "secret"]
    assert got[1].text == " " + TARGET and got[0].token_ids == base[0].token_ids
    engine.revoke("secret")
    logits, routes = engine.last_logits([OTHER, PROMPT])
    assert [r.edit_id for r in routes] == [None, None]
    assert torch.equal(logits, base_logits)


def test_an_edit_keyed_otherwise_is_refused_with_the_reason(engine, trained):
    last = RoutedEngine.from_pretrained(tiny_model("llama"),
                                        SolaConfig(edit=EditConfig(layers=(2, 3)), train=TRAIN))
    with pytest.raises(EditMismatchError, match="routing keys were read otherwise"):
        last.add(trained)


def test_routing_under_a_key_map_takes_cosine_after_the_map(tmp_path, trained):
    pairs = [(PROMPT, PROMPT + " indeed", "a"), (OTHER, OTHER + " today", "b"),
             ("Paris is the capital of", "The capital city is", "c")]
    plain = RoutedEngine.from_pretrained(tiny_model("llama"), SolaConfig(edit=MEAN, train=TRAIN))
    key_map = fit(plain, pairs, FitConfig(dim=4, steps=5))
    assert key_map.info["key_pool"] == "mean" and key_map.info["route_layer"] == 1
    key_map.info["threshold"] = 0.5
    key_map.save(tmp_path / "map.safetensors")
    router = RouterConfig(key_map=str(tmp_path / "map.safetensors"))
    mapped = RoutedEngine.from_pretrained(tiny_model("llama"),
                                          SolaConfig(edit=MEAN, router=router, train=TRAIN))
    mapped.add(trained)
    query = _route_layer_states(mapped, OTHER)[1:].float().mean(dim=0)
    want = 1 - F.cosine_similarity(key_map(query), key_map(trained.keys[0]), dim=0)
    route = mapped.nearest([OTHER])[0]
    assert route.edit_id == "secret" and route.distance == pytest.approx(float(want), abs=1e-5)
    other_model = KeyMap(key_map.mean, key_map.scale, key_map.proj,
                         {**key_map.info, "model_fingerprint": "x" * 64})
    other_model.save(tmp_path / "foreign.safetensors")
    with pytest.raises(KeyMapError, match="model_fingerprint"):
        RoutedEngine.from_pretrained(tiny_model("llama"), SolaConfig(
            edit=MEAN, router=RouterConfig(key_map=str(tmp_path / "foreign.safetensors"),
                                           threshold=0.1)))


# --- fit-metric's pairs file --------------------------------------------------------------------
@pytest.mark.parametrize("line, message", [
    ("not json", "not JSON"),
    ('{"prompt": "a"}', "non-empty strings"),
    ('{"prompt": "a", "paraphrase": "b", "extra": 1}', "optional group"),
    ('{"prompt": "a", "paraphrase": "b", "group": 3}', "group must be a string"),
])
def test_pairs_file_errors_name_the_line(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "p", "paraphrase": "q"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=f"pairs.jsonl:2: .*{message}"):
        load_pairs(path)


def test_pairs_file_needs_two_pairs_and_groups_default_to_the_prompt(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "p", "paraphrase": "q"}\n')
    with pytest.raises(DataError, match="at least 2 pairs"):
        load_pairs(path)
    path.write_text('{"prompt": "p", "paraphrase": "q"}\n\n'
                    '{"prompt": "r", "paraphrase": "s", "group": "g"}\n')
    assert load_pairs(path) == [("p", "q", "p"), ("r", "s", "g")]


def test_shapes_resolve_their_route_layer():
    shape = EditShape("llama", 4, (2, 3), ("mlp.up_proj",), 4, 1.0)
    assert shape.route_layer == 2 and shape.default_keys
    with pytest.raises(ValueError, match="comes after the first edited layer"):
        EditShape("llama", 4, (2, 3), ("mlp.up_proj",), 4, 1.0, "mean", 3)


# --- fit-metric and the shipped configuration ---------------------------------------------------
def _cli(capsys, *argv):
    from sola_vllm.cli import main

    code = main([*map(str, argv), "--json"])
    return code, json.loads(capsys.readouterr().out)


@needs_data
def test_fit_metric_writes_a_map_calibrated_on_dev_data(capsys, tmp_path):
    config = tmp_path / "pooled.json"
    config.write_text(json.dumps({"edit": {"layers": [2, 3], "key_pool": "mean",
                                           "route_layer": 1}}))
    out = tmp_path / "map.safetensors"
    code, result = _cli(capsys, "fit-metric", "--model", tiny_model("llama"), "--config", config,
                        "--data", FACTS, ZSRE, "--calibrate", ZSRE, FACTS, "--dim", 4,
                        "--steps", 5, "--out", out)
    assert code == 0, result
    key_map = KeyMap.load(out)
    assert key_map.out_dim == 4 and key_map.info["route_layer"] == 1
    assert key_map.info["fit"]["data"] == [str(FACTS), str(ZSRE)]
    dev_pairs = sum(1 for path in (FACTS, ZSRE) for c in load(path).split("dev") if c.paraphrases)
    assert key_map.info["fit"]["pairs"] == dev_pairs  # both files' dev pairs, pooled
    zsre, facts = calibration = key_map.info["calibration"]
    assert (zsre["data"], facts["data"]) == ("zsre", "counterfact")
    # the map keeps the stricter of the two files' thresholds; each file's rates are at it
    assert key_map.threshold == min(zsre["own_threshold"], facts["own_threshold"]) > 0
    for cal in calibration:
        assert cal["fitted_on"]  # both files' dev pairs fitted the map
        assert cal["threshold"] == key_map.threshold <= cal["own_threshold"]
        assert cal["split"] == "dev" and cal["keys"] > 50
        assert cal["hard_negative_routed"] <= 0.01 and cal["unrelated_routed"] <= 0.01
    router = RouterConfig(key_map=str(out))  # the threshold comes with the map
    assert router.threshold == key_map.threshold
    code, result = _cli(capsys, "fit-metric", "--model", tiny_model("llama"), "--config", config,
                        "--data", FACTS, "--calibrate", ZSRE, FACTS, "--dim", 4, "--steps", 1,
                        "--out", tmp_path / "facts.safetensors")
    assert code == 0, result
    assert [cal["fitted_on"] for cal in result["calibration"]] == [False, True]
    assert "optimistic" not in result["text"].splitlines()[1]
    assert "optimistic: its pairs fitted the map" in result["text"].splitlines()[2]
    code, result = _cli(capsys, "fit-metric", "--model", tiny_model("llama"), "--data", FACTS,
                        "--pairs", tmp_path / "pairs.jsonl", "--out", out)
    assert code == 2 and "exactly one of --data" in result["error"]


@pytest.mark.slow
def test_the_shipped_configuration_fits_the_default_model(default_model_path):
    from sola_vllm.commands import load_config
    from sola_vllm.models import model_fingerprint

    config = load_config("smollm2-135m-instruct-mean-l6")
    shape = resolve(config.edit, "llama", 30)
    key_map = config.router.load_key_map()
    key_map.check_fits(model_fingerprint(default_model_path), 576, shape.key_pool,
                       shape.route_layer)
    assert config.router.threshold == key_map.threshold
    # fitted and calibrated without test data
    assert all(cal["split"] == "dev" for cal in key_map.info["calibration"])


def test_same_subject_other_relation_prompts_bind_the_calibrated_threshold():
    from pathlib import Path

    import torch

    from sola_vllm.eval.fit_map import DevDistances

    far = torch.full((100,), 0.5)
    without = DevDistances("cf", Path("x"), 10, torch.zeros(4), [True] * 4, far, far)
    other = torch.cat([torch.full((1,), 0.01), torch.full((99,), 0.04)])
    with_group = DevDistances("cf", Path("x"), 10, torch.zeros(4), [True] * 4, far, far, other)
    assert without.threshold(0.99) == 0.5
    assert with_group.threshold(0.99) == pytest.approx(0.04)  # one of 100 (0.01) may route
    assert with_group.threshold(1.0) == pytest.approx(0.01)  # none may
    report = with_group.report(0.04, 0.04, 0.99)
    assert report["other_relation_routed"] == pytest.approx(0.01)
    assert without.report(0.5, 0.5, 0.99)["other_relation_routed"] is None
