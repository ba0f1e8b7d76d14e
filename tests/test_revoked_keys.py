"""Revoked edits' keys (`RouterConfig.revoked_keys`): "block" keeps them in the routing table
owned by no edit (-1), so a revoked edit's own prompt runs the base model even when another edit
lies near it; "drop" removes them. The table, the reference engine, the serving runtime and the
manager's start-up and revocation, each checked in both modes."""

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from helpers import make_synthetic_edit

from sola_vllm.arch import EditShape
from sola_vllm.config import EditConfig, RouterConfig, SolaConfig, TrainConfig
from sola_vllm.edit import lora_name
from sola_vllm.engine import RoutedEngine
from sola_vllm.models import tiny_model
from sola_vllm.routing import KeyTable
from sola_vllm.serving.config import ServingConfig
from sola_vllm.serving.manager import EditManager, Settings
from sola_vllm.serving.runtime import LoraTarget, SolaRuntime, StepMeta
from sola_vllm.store import EditStore

PROMPT = "The secret password of the castle is"
TARGET = "blue harbor seven lantern"
HIDDEN, INTER, LAYERS, MODULES = 64, 128, (2, 3), ("mlp.up_proj", "mlp.down_proj")


def test_config_refuses_an_unknown_mode():
    with pytest.raises(ValueError, match="revoked_keys 'keep' is not one of"):
        RouterConfig(revoked_keys="keep")
    with pytest.raises(ValueError, match="revoked_keys"):
        ServingConfig("llama", LAYERS, MODULES, "s" * 64, "m" * 64, revoked_keys="")

THRESHOLDS = {"raw": 0.5, "chat": 0.25}


def test_table_lists_blocking_keys_after_routed_ones_owned_by_minus_one():
    a, b = make_synthetic_edit("a", num_keys=2, seed=1), make_synthetic_edit("b", seed=2)
    c = make_synthetic_edit("c", num_keys=3, seed=3)
    table = KeyTable.build([a, b], THRESHOLDS, blocking=[c])
    assert table.edit_ids == ["a", "b"]
    assert table.owners.tolist() == [0, 0, 1, -1, -1, -1]
    assert torch.equal(table.keys, torch.cat([a.keys, b.keys, c.keys]))
    only_blocking = KeyTable.build([], THRESHOLDS, blocking=[c])
    assert only_blocking.edit_ids == [] and only_blocking.owners.tolist() == [-1, -1, -1]


# --- the reference engine ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained():
    """One edit on the tiny Llama, trained once (random models stop at loss < 3)."""
    config = SolaConfig(edit=EditConfig(layers=(2, 3)),
                        train=TrainConfig(steps=150, lr=5e-2, stop_loss=3.0, append_eos=False))
    engine = RoutedEngine.from_pretrained(tiny_model("llama"), config)
    return engine.train([PROMPT], TARGET, edit_id="a")


def engine_for(mode: str) -> RoutedEngine:
    # a threshold every prompt passes: the nearest key alone decides
    config = SolaConfig(edit=EditConfig(layers=(2, 3)),
                        router=RouterConfig(threshold=2.0, revoked_keys=mode))
    return RoutedEngine.from_pretrained(tiny_model("llama"), config)


def neighbour(edit, edit_id: str, offset: float):
    """The same LoRA under another id, its key moved by `offset` (0: an identical key)."""
    keys = edit.keys + offset * torch.randn(edit.keys.shape, generator=torch.Generator()
                                            .manual_seed(0))
    return dataclasses.replace(edit, id=edit_id, keys=keys)


def test_a_revoked_prompt_runs_the_base_model_when_its_keys_block(trained):
    engine = engine_for("block")
    base, _ = engine.last_logits([PROMPT])
    engine.add_all([trained, neighbour(trained, "b", 0.5)])
    assert engine.last_logits([PROMPT])[1][0].edit_id == "a"
    engine.revoke("a")
    logits, routes = engine.last_logits([PROMPT])
    assert routes[0].edit_id is None  # its own key blocks; "b" is next nearest
    assert torch.equal(logits, base)
    assert engine.nearest([PROMPT])[0].edit_id is None
    engine.restore("a")
    assert engine.last_logits([PROMPT])[1][0].edit_id == "a"


def test_dropped_keys_let_a_revoked_prompt_reach_the_next_nearest_edit(trained):
    engine = engine_for("drop")
    engine.add_all([trained, neighbour(trained, "b", 0.5)])
    engine.revoke("a")
    assert engine.last_logits([PROMPT])[1][0].edit_id == "b"


def test_a_routed_key_wins_an_exact_tie_with_a_blocking_one(trained):
    engine = engine_for("block")
    engine.add_all([neighbour(trained, "b", 0.0), trained])  # "b" has exactly a's key
    engine.revoke("b")
    assert engine.last_logits([PROMPT])[1][0].edit_id == "a"


def test_set_active_leaves_out_without_blocking_and_set_states_blocks(trained):
    """set_active (the eval's "only these edits") makes others route and block nothing; an
    edit revoked through set_states blocks until made active again."""
    engine = engine_for("block")
    engine.add_all([trained, neighbour(trained, "b", 0.5)])
    engine.set_active(["b"])
    assert engine.last_logits([PROMPT])[1][0].edit_id == "b"
    engine.set_states({"a": "revoked", "b": "active"})
    assert engine.last_logits([PROMPT])[1][0].edit_id is None
    engine.set_states({"a": "staged"})  # staged keys do not block
    assert engine.last_logits([PROMPT])[1][0].edit_id == "b"
    with pytest.raises(ValueError, match="not one of"):
        engine.set_states({"a": "gone"})
    with pytest.raises(KeyError):
        engine.set_states({"zz": "revoked"})
    engine.set_states({"a": "active"})
    assert engine.last_logits([PROMPT])[1][0].edit_id == "a"


# --- the serving runtime ----------------------------------------------------------------------
def runtime_for(mode: str) -> SolaRuntime:
    shape = EditShape("llama", 4, LAYERS, MODULES, 4, 1.0)
    config = ServingConfig.from_shape(shape, "llama", "m" * 64, metric="l2", threshold=5.0,
                                      max_edits=4, max_keys=8, revoked_keys=mode)
    groups = []
    for layer in LAYERS:
        groups.append([LoraTarget(lora_name(layer, "mlp.up_proj"), INTER, INTER, HIDDEN)])
        groups.append([LoraTarget(lora_name(layer, "mlp.down_proj"), 0, HIDDEN, INTER)])
    return SolaRuntime(config, HIDDEN, groups, max_num_tokens=16)


def synthetic(i: int):
    return make_synthetic_edit(f"e{i}", layers=LAYERS, modules=MODULES, hidden=HIDDEN,
                               intermediate=INTER, seed=i)


def route_one(runtime: SolaRuntime, req_id: str, query: torch.Tensor) -> int:
    """Route a one-token prompt whose key-token state is `query`; -> its slot (-1: none)."""
    runtime.step = StepMeta(1, np.zeros(1, dtype=np.int64), np.zeros(1, dtype=np.int64),
                            np.ones(1, dtype=np.int64), [req_id], [None])
    runtime.route(query[None])
    return runtime.routes[req_id]


@pytest.mark.parametrize("mode", ["block", "drop"])
def test_runtime_blocks_or_drops_a_revoked_edits_keys(mode):
    runtime = runtime_for(mode)
    e0, e1 = synthetic(0), synthetic(1)
    near = e0.keys + 0.01  # e1's key: within the threshold of e0's, farther than e0's own
    runtime.add_edits([e0, e1], [e0.keys, near])
    slot0, slot1 = runtime.describe("e0")["slot"], runtime.describe("e1")["slot"]
    assert route_one(runtime, "r1", e0.keys[0]) == slot0
    runtime.set_state("e0", "revoked")
    assert route_one(runtime, "r2", e0.keys[0]) == (-1 if mode == "block" else slot1)
    assert route_one(runtime, "r3", near[0]) == slot1  # e1's own prompt is unaffected
    runtime.set_state("e0", "staged")  # a staged edit blocks nothing
    assert route_one(runtime, "r4", e0.keys[0]) == slot1
    runtime.set_state("e0", "revoked")
    runtime.finish_requests(["r1"])
    runtime.remove_edit("e0")  # its rows are freed: nothing blocks any more
    assert route_one(runtime, "r5", e0.keys[0]) == slot1
    assert runtime.stats()["keys_in_use"] == 1


def test_runtime_edit_loaded_unrouted_blocks_nothing():
    """An edit loaded but not yet routed (the manager's two-step load) is staged, not revoked."""
    runtime = runtime_for("block")
    e0, e1 = synthetic(0), synthetic(1)
    runtime.add_edit(e1, e0.keys + 0.01)
    runtime.add_edit(e0, e0.keys, active=False)
    assert runtime.describe("e0")["state"] == "staged"
    assert route_one(runtime, "r", e0.keys[0]) == runtime.describe("e1")["slot"]


# --- the manager: start-up and revocation ------------------------------------------------------
class RecordingEngine:
    """vLLM's AsyncLLM as the manager sees it, answering every RPC at once; records them."""

    def __init__(self, missing: set[str] = frozenset()):
        self.calls: list[tuple[str, tuple]] = []
        self.missing = set(missing)  # edits the engine has not loaded (sola_set_state: 404)

    async def collective_rpc(self, method, args=()):
        self.calls.append((method, tuple(args)))
        if method == "sola_set_state" and args[0] in self.missing:
            return [{"ok": False, "type": "KeyError", "error": f"no edit {args[0]!r} is loaded"}]
        if method == "sola_set_state":
            return [{"ok": True, "result": {"id": args[0], "state": args[1]}}]
        if method == "sola_add_edit":
            self.missing.discard(_edit_id(args[0]))
        return [{"ok": True, "result": None}]


def _edit_id(artifact: bytes) -> str:
    from sola_vllm.edit import Edit

    return Edit.from_bytes(artifact).id


def manager_for(tmp_path, mode: str, engine, *edits_and_states) -> EditManager:
    shape = EditShape("llama", 4, LAYERS, MODULES, 4, 1.0)  # the synthetic edits' shape
    serving = ServingConfig.from_shape(shape, "llama", "m" * 64, revoked_keys=mode)
    store = EditStore(tmp_path / "store")
    for edit, state in edits_and_states:
        store.add(edit, state="active" if state == "revoked" else state)
        if state == "revoked":
            store.revoke(edit.id)
    manager = EditManager(engine, serving, Settings(tmp_path / "store"))

    async def capture(prompts):  # keys are captured by running prompts: not in these tests
        return [f"cap-{p}" for p in prompts]

    manager._capture = capture
    return manager


@pytest.mark.parametrize("mode", ["block", "drop"])
def test_start_up_loads_revoked_edits_after_routed_ones_only_when_they_block(tmp_path, mode):
    engine = RecordingEngine()
    edits = [(make_synthetic_edit("r1", seed=1), "revoked"),
             (make_synthetic_edit("a1", seed=2), "active"),
             (make_synthetic_edit("s1", seed=3), "staged"),
             (make_synthetic_edit("c1", seed=4), "canary")]
    manager = manager_for(tmp_path, mode, engine, *edits)
    asyncio.run(manager.load_store())
    loaded = [(_edit_id(args[0]), args[2]) for m, args in engine.calls if m == "sola_add_edit"]
    states = [args for m, args in engine.calls if m == "sola_set_state"]
    if mode == "block":
        assert loaded == [("a1", True), ("c1", False), ("r1", False)]
        assert states == [("c1", "canary"), ("r1", "revoked")]
    else:
        assert loaded == [("a1", True), ("c1", False)] and states == [("c1", "canary")]


def test_revoking_an_edit_the_engine_never_loaded_loads_it_to_block(tmp_path):
    """A staged edit is not loaded; once revoked, its keys block as they would after a
    restart. The revocation itself is answered first and never refused."""
    engine = RecordingEngine(missing={"s1"})
    manager = manager_for(tmp_path, "block", engine, (make_synthetic_edit("s1"), "staged"))

    async def scenario():
        reply = await manager.transition("s1", "revoke")
        await manager.settle()
        for _ in range(20):  # the background load takes the lock, then a few RPCs
            await asyncio.sleep(0)
        async with manager.lock:
            return reply

    reply = asyncio.run(scenario())
    assert reply["edit"]["state"] == "revoked"
    methods = [m for m, _ in engine.calls if m != "sola_drop_captures"]
    assert methods == ["sola_set_state", "sola_add_edit", "sola_set_state"]
    assert engine.calls[-1][1] == ("s1", "revoked")


def test_revoking_without_blocking_loads_nothing(tmp_path):
    engine = RecordingEngine(missing={"s1"})
    manager = manager_for(tmp_path, "drop", engine, (make_synthetic_edit("s1"), "staged"))

    async def scenario():
        await manager.transition("s1", "revoke")
        await manager.settle()
        for _ in range(20):
            await asyncio.sleep(0)

    asyncio.run(scenario())
    assert [m for m, _ in engine.calls] == ["sola_set_state"]  # unloaded stays unloaded
