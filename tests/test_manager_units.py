"""EditManager against a fake engine client: sent RPCs (acknowledged before the engine runs
them), and store/engine agreement when the engine refuses a change. The real server's side of
the same properties is in test_http_server (changes reach the next request under load)."""

import asyncio
import logging

import pytest
from helpers import make_synthetic_edit

from sola_vllm.serving.config import ServingConfig
from sola_vllm.serving.manager import EditManager, RequestError, Settings
from sola_vllm.store import EditStore


class FakeEngine:
    """vLLM's AsyncLLM as the manager sees it: `collective_rpc` hands its message to the engine
    before its first suspension (vLLM's client does the zmq send there), then waits for the
    reply, which comes only once the test lets the engine "finish its step"."""

    def __init__(self):
        self.sent: list[tuple[str, tuple]] = []
        self.step_done = asyncio.Event()
        self.refuse: dict[str, dict] = {}

    async def collective_rpc(self, method, args=()):
        self.sent.append((method, tuple(args)))
        await self.step_done.wait()
        if method in self.refuse:
            return [{"ok": False, **self.refuse[method]}]
        result = {"id": args[0], "state": args[1], "slot": 0, "hits": 0} if \
            method == "sola_set_state" else None
        return [{"ok": True, "result": result}]


def manager_with(tmp_path, *edits_and_states) -> tuple[EditManager, FakeEngine]:
    engine = FakeEngine()
    serving = ServingConfig("llama", (2, 3), ("mlp.up_proj", "mlp.down_proj"), "s" * 64,
                            "m" * 64)
    store = EditStore(tmp_path / "store")
    for edit, state in edits_and_states:
        store.add(edit, state=state)
    return EditManager(engine, serving, Settings(tmp_path / "store")), engine


def test_send_returns_once_the_message_is_handed_over_not_when_it_ran(tmp_path):
    async def scenario():
        manager, engine = manager_with(tmp_path)
        task = await manager.send("sola_drop_captures", ["c1"])
        assert engine.sent == [("sola_drop_captures", (["c1"],))]
        assert not task.done()  # the engine has not run it yet
        second = await manager.send("sola_drop_captures", ["c2"])
        assert [args for _, args in engine.sent] == [(["c1"],), (["c2"],)]  # in order
        engine.step_done.set()
        await manager.settle()
        assert task.done() and second.done() and not manager._sent

    asyncio.run(scenario())


def test_a_refused_sent_rpc_reaches_on_error_or_the_log(tmp_path, caplog):
    async def scenario():
        manager, engine = manager_with(tmp_path)
        engine.refuse["sola_set_state"] = {"type": "ValueError", "error": "broken worker"}
        seen = []
        await manager.send("sola_set_state", "e", "active", on_error=seen.append)
        await manager.send("sola_set_state", "e", "revoked")
        engine.step_done.set()
        await manager.settle()
        return seen

    with caplog.at_level(logging.ERROR, logger="vllm.sola_vllm"):
        (error,) = asyncio.run(scenario())
    assert isinstance(error, RequestError) and error.status == 422
    assert "broken worker" in error.message
    assert "the engine refused sola_set_state: broken worker" in caplog.text


def test_revoke_is_acknowledged_before_the_engine_step_ends(tmp_path):
    """Stored first, then the unrouting RPC sent: the reply does not wait for the engine."""
    async def scenario():
        manager, engine = manager_with(tmp_path, (make_synthetic_edit("e1"), "active"))
        reply = await asyncio.wait_for(manager.transition("e1", "revoke", author="ann"), 10)
        assert engine.sent == [("sola_set_state", ("e1", "revoked"))]
        assert not engine.step_done.is_set()
        engine.step_done.set()
        await manager.settle()
        return reply

    reply = asyncio.run(scenario())
    assert reply["edit"]["state"] == "revoked" and reply["serving"] == {"state": "revoked"}
    assert EditStore(tmp_path / "store").get("e1").state == "revoked"
    assert [h["op"] for h in reply["history"]] == ["add", "revoke"]


def test_unrouting_an_edit_the_engine_never_loaded_is_not_an_error(tmp_path, caplog):
    async def scenario():
        manager, engine = manager_with(tmp_path, (make_synthetic_edit("e1"), "active"))
        engine.refuse["sola_set_state"] = {"type": "KeyError", "error": "no edit e1 loaded"}
        engine.step_done.set()
        reply = await manager.transition("e1", "stage")
        await manager.settle()
        return reply

    with caplog.at_level(logging.ERROR, logger="vllm.sola_vllm"):
        reply = asyncio.run(scenario())
    assert reply["edit"]["state"] == "staged" and "refused" not in caplog.text


def test_a_refused_restore_is_undone_in_the_store(tmp_path):
    """Routing waits for the engine's reply: a refusal undoes the store transition."""
    async def scenario():
        manager, engine = manager_with(tmp_path, (make_synthetic_edit("e1"), "active"))
        engine.step_done.set()
        await manager.transition("e1", "revoke")
        engine.refuse["sola_set_state"] = {"type": "ValueError", "error": "broken worker"}
        with pytest.raises(RequestError, match="broken worker"):
            await manager.transition("e1", "restore")
        await manager.settle()

    asyncio.run(scenario())
    store = EditStore(tmp_path / "store")
    assert store.get("e1").state == "revoked"
    assert [h["op"] for h in store.history("e1")][-2:] == ["restore", "revoke"]
