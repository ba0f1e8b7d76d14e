"""Per-form thresholds: each routing key records the form of the prompt it was read from (raw,
or the chat form a /v1/chat/completions client sends, `Edit.key_forms`), and a query routes
when its distance to its nearest key is below that key's own form's threshold
(`RouterConfig.chat_threshold`): in the artifact, the routing table, the serving runtime, the
reference engine's routes and the pre-flight check."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import make_synthetic_edit

from sola_vllm.arch import EditShape
from sola_vllm.config import RouterConfig
from sola_vllm.edit import Edit, EditFormatError, lora_name
from sola_vllm.engine import Route
from sola_vllm.eval.stored import routes_at
from sola_vllm.preflight import KeyGroup, check
from sola_vllm.routing import KeyTable
from sola_vllm.serving import route_kernel
from sola_vllm.serving.config import ServingConfig
from sola_vllm.serving.runtime import LoraTarget, SolaRuntime, StepMeta

HIDDEN, INTER, LAYERS, MODULES = 64, 96, (1,), ("mlp.down_proj",)
THRESHOLDS = {"raw": 0.5, "chat": 0.1}  # l2; 0.1 is not an fp32 value: reports keep it exact


def two_form_edit(edit_id: str = "e", seed: int = 0) -> Edit:
    """Keys far apart (norm ~80): key 0 read from the raw prompt, key 1 from its chat form."""
    made = make_synthetic_edit(edit_id, layers=LAYERS, modules=MODULES, hidden=HIDDEN,
                               intermediate=INTER, seed=seed, num_keys=2)
    return dataclasses.replace(made, keys=made.keys * 10, prompts=["raw", "chat form"],
                               key_forms=["raw", "chat"])


def near(key: torch.Tensor, distance: float, seed: int = 0) -> torch.Tensor:
    """A point at l2 `distance` from `key`."""
    direction = torch.randn(key.shape[0], generator=torch.Generator().manual_seed(seed))
    return key + distance * direction / direction.norm()


# --- the artifact -----------------------------------------------------------------------------
def test_key_forms_survive_the_artifact_and_raw_only_edits_keep_their_bytes():
    edit = two_form_edit()
    back = Edit.from_bytes(edit.to_bytes())
    assert back.key_forms == ["raw", "chat"] and back.forms() == ["raw", "chat"]
    raw = make_synthetic_edit("r", num_keys=2)
    assert raw.key_forms is None and raw.forms() == ["raw", "raw"]
    assert "key_forms" not in raw.metadata()
    spelled = dataclasses.replace(raw, key_forms=["raw", "raw"])  # one spelling of all-raw
    assert spelled.key_forms is None and spelled.to_bytes() == raw.to_bytes()


@pytest.mark.parametrize("forms, message", [(["raw"], "1 key forms for 2 keys"),
                                            (["raw", "html"], "must each be one of"),
                                            ("rc", "must each be one of")])
def test_bad_key_forms_are_refused(forms, message):
    raw = make_synthetic_edit("r", num_keys=2)
    with pytest.raises(EditFormatError, match=message):
        dataclasses.replace(raw, key_forms=forms)


def test_chat_trained_artifacts_without_key_forms_get_them_from_their_prompts():
    """Edits trained with chat forms before key forms were recorded hold the given prompts,
    then one chat form each, one key per prompt."""
    legacy = dataclasses.replace(make_synthetic_edit("old", num_keys=4),
                                 prompts=["a", "b", "chat a", "chat b"],
                                 train_info={"chat_form": True})
    assert Edit.from_bytes(legacy.to_bytes()).forms() == ["raw", "raw", "chat", "chat"]
    odd = dataclasses.replace(legacy, keys=legacy.keys[:3], prompts=["a", "b", "chat a"])
    assert Edit.from_bytes(odd.to_bytes()).key_forms is None  # not what training wrote


# --- thresholds ---------------------------------------------------------------------------------
def test_the_router_config_gives_each_form_a_threshold():
    assert RouterConfig(threshold=0.2).thresholds == {"raw": 0.2, "chat": 0.2}
    assert RouterConfig(threshold=0.2, chat_threshold=0.05).thresholds == {"raw": 0.2,
                                                                           "chat": 0.05}
    for bad in (0, -1.0, float("nan"), "0.1"):
        with pytest.raises(ValueError, match="chat_threshold"):
            RouterConfig(threshold=0.2, chat_threshold=bad)
    with pytest.raises(ValueError, match="chat_threshold"):
        ServingConfig.from_shape(EditShape("llama", 2, LAYERS, MODULES, 4, 1.0), "llama",
                                 "m" * 64, chat_threshold=-0.1)


def test_the_table_holds_each_keys_own_threshold():
    edit, raw = two_form_edit(), make_synthetic_edit("r", hidden=HIDDEN, layers=LAYERS,
                                                     modules=MODULES, intermediate=INTER)
    table = KeyTable.build([edit], THRESHOLDS, blocking=[raw])
    assert table.forms == ["raw", "chat", "raw"]
    assert table.thresholds.tolist() == pytest.approx([0.5, 0.1, 0.5])


def test_a_route_is_read_under_its_nearest_keys_form():
    routes = [Route("a", 0.3, "raw"), Route("a", 0.3, "chat"), Route("a", 0.05, "chat"),
              Route(None, 0.0, "raw")]
    assert [r.under(THRESHOLDS) for r in routes] == ["a", None, "a", None]
    assert routes_at(routes, THRESHOLDS) == ["a", None, "a", None]
    assert routes_at(routes, 0.5) == ["a", "a", "a", None]  # one threshold for every key


# --- the serving runtime ------------------------------------------------------------------------
def make_runtime(router: str = "torch") -> SolaRuntime:
    shape = EditShape("llama", 2, LAYERS, MODULES, 4, 1.0)
    config = ServingConfig.from_shape(shape, "llama", "m" * 64, metric="l2",
                                      threshold=THRESHOLDS["raw"],
                                      chat_threshold=THRESHOLDS["chat"], max_edits=4,
                                      max_keys=8, max_rank=4, router=router, apply="torch")
    groups = [[LoraTarget(lora_name(1, "mlp.down_proj"), 0, HIDDEN, INTER)]]
    return SolaRuntime(config, HIDDEN, groups, max_num_tokens=16)


@pytest.mark.parametrize("router", ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not route_kernel.interpreted(), reason="the CPU runtime runs Triton interpreted only"))])
def test_the_runtime_routes_below_the_nearest_keys_own_threshold(router):
    """At distance 0.3 a request routes to a raw key (0.3 < 0.5) but not to a chat-form key
    (0.3 >= 0.1); at 0.05 it routes to either. (Triton runs interpreted on CPU.)"""
    runtime = make_runtime(router)
    edit = two_form_edit()
    runtime.add_edit(edit, edit.keys)
    raw_key, chat_key = edit.keys
    queries = [near(raw_key, 0.3), near(chat_key, 0.3, 1), near(chat_key, 0.05, 2),
               near(raw_key, 0.6, 3)]
    runtime.step = StepMeta(4, np.arange(4), np.zeros(4, dtype=np.int64), np.ones(4),
                            ["raw-0.3", "chat-0.3", "chat-0.05", "raw-0.6"], [None] * 4)
    runtime.route(torch.stack(queries))
    assert runtime.routes == {"raw-0.3": 0, "chat-0.3": -1, "chat-0.05": 0, "raw-0.6": -1}
    assert runtime.tok_slot[:4].tolist() == [0, -1, 0, -1]


def test_the_runtime_refuses_keys_that_do_not_match_the_edits_forms():
    runtime = make_runtime()
    edit = two_form_edit()
    with pytest.raises(ValueError, match="3 keys for 2 key forms"):
        runtime.add_edit(edit, torch.cat([edit.keys, edit.keys[:1]]))
    assert runtime.edits == {}


# --- pre-flight -----------------------------------------------------------------------------------
def group(edit: Edit, keys: torch.Tensor | None = None) -> KeyGroup:
    return KeyGroup(edit.id, "active", edit.keys if keys is None else keys, edit.prompts,
                    edit.forms())


def test_keys_collide_within_the_larger_of_their_thresholds():
    """A new raw key at 0.3 of a routed chat-form key collides: 0.3 < max(0.5, 0.1), so the
    routed chat prompt's query would route to the new key. Two chat-form keys at 0.3 do not
    (0.3 >= 0.1 for both)."""
    routed = two_form_edit("routed")
    chat_key = routed.keys[1]
    new_raw = KeyGroup("new", "new", near(chat_key, 0.3)[None], ["p"], ["raw"])
    new_chat = KeyGroup("new", "new", near(chat_key, 0.3)[None], ["p"], ["chat"])
    found = check(new_raw, [group(routed)], THRESHOLDS, "l2")
    assert not found["ok"] and found["collisions"][0]["threshold"] == 0.5  # exact, not fp32
    assert found["collisions"][0]["other_prompt"] == "chat form"
    assert check(new_chat, [group(routed)], THRESHOLDS, "l2")["ok"]
    close_chat = KeyGroup("new", "new", near(chat_key, 0.05)[None], ["p"], ["chat"])
    assert check(close_chat, [group(routed)], THRESHOLDS, "l2")["collisions"][0][
        "threshold"] == 0.1
    assert found["thresholds"] == THRESHOLDS and found["threshold"] == 0.5


def test_probes_route_below_their_nearest_keys_own_threshold():
    routed = two_form_edit("routed")
    new = KeyGroup("new", "new", torch.full((1, HIDDEN), 500.0), ["far"], ["raw"])
    probes = torch.stack([near(routed.keys[0], 0.3), near(routed.keys[1], 0.3, 1)])
    rows = check(new, [group(routed)], THRESHOLDS, "l2", ["near raw", "near chat"],
                 probes)["probes"]
    assert [r["route"] for r in rows] == ["routed", None]


def test_a_key_group_names_bad_forms():
    with pytest.raises(ValueError, match="key forms"):
        KeyGroup("x", "new", torch.zeros(2, 4), ["a", "b"], ["raw"])
    with pytest.raises(ValueError, match="key forms"):
        KeyGroup("x", "new", torch.zeros(1, 4), ["a"], ["markdown"])
