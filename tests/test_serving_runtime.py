"""SolaRuntime without vLLM: grouped apply against a per-token loop, routing decided once per
request at its key token, capacity and validation, and the plugin's idempotent register()."""

import numpy as np
import pytest
import torch
from helpers import make_synthetic_edit

from sola_vllm.arch import EditShape
from sola_vllm.edit import lora_name
from sola_vllm.serving.config import ServingConfig
from sola_vllm.serving.runtime import CapacityError, LoraTarget, SolaRuntime, StepMeta

HIDDEN, INTER, LAYERS, MODULES = 64, 128, (2, 3), ("mlp.up_proj", "mlp.down_proj")


def make_runtime(max_edits=4, max_keys=8, max_rank=4) -> SolaRuntime:
    shape = EditShape("llama", 4, LAYERS, MODULES, 4, 1.0)
    config = ServingConfig.from_shape(shape, "llama", "m" * 64, metric="l2", threshold=0.5,
                                      max_edits=max_edits, max_keys=max_keys, max_rank=max_rank)
    # like vLLM: up_proj is the second half of gate_up_proj, down_proj a linear of its own
    groups = []
    for layer in LAYERS:
        groups.append([LoraTarget(lora_name(layer, "mlp.up_proj"), INTER, INTER, HIDDEN)])
        groups.append([LoraTarget(lora_name(layer, "mlp.down_proj"), 0, HIDDEN, INTER)])
    return SolaRuntime(config, HIDDEN, groups, max_num_tokens=64)


def edit(i, **kw):
    return make_synthetic_edit(f"e{i}", layers=LAYERS, modules=MODULES, hidden=HIDDEN,
                               intermediate=INTER, seed=i, **kw)


def step(req_ids, lengths, positions_per_row, captures=None):
    rows = np.concatenate([np.full(len(p), r) for r, p in enumerate(positions_per_row)])
    pos = np.concatenate([np.asarray(p) for p in positions_per_row])
    return StepMeta(len(pos), rows, pos, np.asarray(lengths), list(req_ids),
                    captures or [None] * len(req_ids))


@pytest.mark.parametrize("popularity", ["distinct", "identical", "none", "mixed"])
def test_grouped_apply_matches_a_per_token_loop(popularity):
    runtime = make_runtime()
    edits = [edit(i) for i in range(3)]
    for e in edits:
        runtime.add_edit(e, e.keys)
    num_tokens = 11
    slots = {"distinct": torch.arange(num_tokens) % 3, "identical": torch.zeros(num_tokens),
             "none": torch.full((num_tokens,), -1),
             "mixed": torch.where(torch.arange(num_tokens) % 3 == 0, -1,
                                  torch.arange(num_tokens) % 3)}[popularity].int()
    runtime.set_token_slots(slots)
    x = torch.randn(num_tokens, HIDDEN)
    base = torch.randn(num_tokens, 2 * INTER)  # a gate_up_proj output
    y = base.clone()
    runtime.apply(0, y, x)  # group 0: layer 2's up_proj inside gate_up_proj
    for t in range(num_tokens):
        s = int(slots[t])
        if s < 0:
            assert torch.equal(y[t], base[t])  # -1 rows untouched, bit for bit
            continue
        a, b = edits[s].lora[lora_name(2, "mlp.up_proj")]
        assert torch.equal(y[t, :INTER], base[t, :INTER])  # gate half never touched
        torch.testing.assert_close(y[t, INTER:], base[t, INTER:] + b @ (a @ x[t]),
                                   atol=1e-5, rtol=1e-5)


def test_route_is_decided_once_at_the_key_token_and_kept():
    runtime = make_runtime()
    e = edit(0)
    runtime.add_edit(e, e.keys)
    hidden = torch.randn(6, HIDDEN) * 10
    hidden[2] = e.keys[0]  # request "a": its key token (position 2 of a 3-token prompt)
    runtime.step = step(["a", "b"], [3, 4], [[0, 1, 2], [0, 1, 2]])  # "b" still in prefill
    runtime.route(hidden)
    assert runtime.routes == {"a": 0}
    assert runtime.tok_slot[:6].tolist() == [-1, -1, 0, -1, -1, -1]
    # a decode step: "a" keeps its edit whatever its hidden state; "b" reaches its key token
    runtime.step = step(["a", "b"], [3, 4], [[3], [3]])
    runtime.route(torch.randn(2, HIDDEN) * 10)
    assert runtime.routes == {"a": 0, "b": -1}
    assert runtime.tok_slot[:2].tolist() == [0, -1]
    runtime.set_active("e0", False)  # revoke: in-flight "a" keeps its route
    runtime.step = step(["a", "c"], [3, 3], [[4], [0, 1, 2]])
    hidden = torch.randn(4, HIDDEN) * 10
    hidden[3] = e.keys[0]
    runtime.route(hidden)
    assert runtime.routes["a"] == 0 and runtime.routes["c"] == -1
    runtime.finish_requests(["a", "b", "c"])
    assert runtime.routes == {}


def test_no_step_metadata_means_no_routing():
    runtime = make_runtime()
    e = edit(0)
    runtime.add_edit(e, e.keys)
    runtime.tok_slot[:4] = 0
    runtime.route(e.keys.repeat(4, 1))  # a dummy/profile forward
    assert runtime.tok_slot[:4].tolist() == [-1] * 4 and runtime.routes == {}


def test_capacity_and_validation_refuse_without_changing_anything():
    runtime = make_runtime(max_edits=2, max_keys=3, max_rank=4)
    runtime.add_edit(edit(0), edit(0).keys)
    before = (runtime.list_edits(), runtime.key_owner.clone(), list(runtime.free_key_rows),
              list(runtime.free_slots))
    with pytest.raises(CapacityError, match="key rows"):
        runtime.add_edit(edit(1, num_keys=3), edit(1, num_keys=3).keys)
    with pytest.raises(CapacityError, match="max rank"):
        runtime.add_edit(edit(2, rank=8), edit(2, rank=8).keys)
    with pytest.raises(ValueError, match="base model"):
        runtime.add_edit(edit(3, model_fingerprint="f" * 64), edit(3).keys)
    with pytest.raises(ValueError, match="NaN"):
        runtime.add_edit(edit(4), edit(4).keys * float("nan"))
    with pytest.raises(ValueError, match="already loaded"):
        runtime.add_edit(edit(0), edit(0).keys)
    assert runtime.list_edits() == before[0]
    assert torch.equal(runtime.key_owner, before[1]) and list(runtime.free_key_rows) == before[2]
    assert list(runtime.free_slots) == before[3]
    runtime.add_edit(edit(5), edit(5).keys)
    with pytest.raises(CapacityError, match="edit slots"):
        runtime.add_edit(edit(6), edit(6).keys)


def test_register_is_idempotent():
    from vllm import ModelRegistry

    from sola_vllm.plugin import register

    register()
    register()
    archs = set(ModelRegistry.get_supported_archs())
    assert {"SolaLlamaForCausalLM", "SolaQwen2ForCausalLM", "SolaQwen3ForCausalLM",
            "SolaGPT2LMHeadModel"} <= archs


def test_only_announced_captures_record_keys_and_they_never_route():
    runtime = make_runtime()
    e = edit(0)
    runtime.add_edit(e, e.keys)
    runtime.expect_captures(["cap-ok"])
    hidden = e.keys.repeat(2, 1)  # both requests' key tokens match the edit
    runtime.step = step(["a", "b"], [1, 1], [[0], [0]], captures=["cap-ok", "cap-forged"])
    runtime.route(hidden)
    assert set(runtime.captures) == {"cap-ok"}  # the forged id recorded nothing...
    assert runtime.routes == {"a": -1, "b": 0}  # ...and was routed like any request
    assert torch.equal(runtime.take_captures(["cap-ok"])[0], e.keys[0])
    with pytest.raises(ValueError, match="no key was captured"):
        runtime.take_captures(["cap-forged"])


def test_freed_slots_are_reused_lowest_first_and_key_rows_in_freed_order():
    runtime = make_runtime(max_edits=4, max_keys=8)
    for i in range(3):
        runtime.add_edit(edit(i, num_keys=2), edit(i, num_keys=2).keys)
    assert [runtime.edits[f"e{i}"].slot for i in range(3)] == [0, 1, 2]
    runtime.remove_edit("e1")
    runtime.remove_edit("e0")
    assert runtime.stats()["keys_in_use"] == 2
    runtime.add_edit(edit(3, num_keys=3), edit(3, num_keys=3).keys)
    runtime.add_edit(edit(4), edit(4).keys)
    assert runtime.edits["e3"].slot == 0 and runtime.edits["e4"].slot == 1
    # never-used rows first (6, 7), then e1's (2, 3), then e0's (0, 1)
    assert runtime.edits["e3"].key_rows == [6, 7, 2] and runtime.edits["e4"].key_rows == [3]


def test_a_batch_add_is_all_or_nothing():
    runtime = make_runtime(max_edits=3, max_keys=8)
    good = [edit(i) for i in range(2)]
    bad = edit(9, model_fingerprint="f" * 64)
    for batch, error in (([*good, bad], "base model"), ([*good, good[0]], "twice"),
                         ([*good, edit(2), edit(3)], "4 edits need as many slots")):
        with pytest.raises(ValueError, match=error):
            runtime.add_edits(batch, [e.keys for e in batch])
        assert runtime.edits == {} and runtime.stats()["keys_in_use"] == 0
    runtime.add_edits(good, [e.keys for e in good])
    assert [runtime.edits[e.id].slot for e in good] == [0, 1]


def test_the_batch_add_rpc_uses_the_captured_keys_and_refuses_missing_ones():
    from sola_vllm.serving.worker_ext import SolaWorkerExtension

    runtime = make_runtime()

    class Worker(SolaWorkerExtension):
        def _sola(self):
            return runtime

    worker, edits = Worker(), [edit(0), edit(1)]
    captured = {"c0": torch.randn(HIDDEN), "c1": torch.randn(HIDDEN)}
    runtime.captures.update(captured)
    blobs = [e.to_bytes() for e in edits]
    reply = worker.sola_add_edits(blobs, [["c0"], ["missing"]], True)
    assert not reply["ok"] and "no key was captured" in reply["error"] and runtime.edits == {}
    runtime.captures.update(captured)
    reply = worker.sola_add_edits(blobs, [["c0"], ["c1"]], True)
    assert reply["ok"] and [s["id"] for s in reply["result"]] == ["e0", "e1"]
    assert torch.equal(runtime.keys[runtime.edits["e1"].key_rows[0]], captured["c1"])
    assert runtime.captures == {}


@pytest.mark.parametrize("parallel", [(2, 1, 1), (1, 2, 1), (1, 1, 2)])
def test_parallel_engines_are_refused_at_start(parallel):
    """Edit RPCs reach one engine's one worker: any other rank would route without them."""
    from types import SimpleNamespace

    from sola_vllm.serving.models import init_sola

    sola = ServingConfig("llama", (1,), ("mlp.up_proj",), "s" * 64, "m" * 64).to_dict()
    tp, pp, dp = parallel
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(sola=sola)),
        parallel_config=SimpleNamespace(tensor_parallel_size=tp, pipeline_parallel_size=pp,
                                        data_parallel_size=dp),
        lora_config=None)
    with pytest.raises(ValueError, match="parallel size 1"):
        init_sola(None, vllm_config)


def test_serve_starts_cuda_engines_eager_unless_told_otherwise():
    from sola_vllm.serving.serve import build_command

    kwargs = {"model": "/m/SmolLM2", "hf_overrides": {}, "worker_extension_cls": "x",
              "enforce_eager": True}
    assert build_command(kwargs, "127.0.0.1", 8000, [])[-1] == "--enforce-eager"
    chosen = build_command(kwargs, "127.0.0.1", 8000, ["-cc", '{"cudagraph_mode": "NONE"}'])
    assert "--enforce-eager" not in chosen and chosen[-2:] == ["-cc", '{"cudagraph_mode": "NONE"}']
    cpu = build_command({**kwargs, "enforce_eager": False}, "127.0.0.1", 8000, [])
    assert "--enforce-eager" not in cpu
    assert "--enforce-eager" not in build_command(kwargs, "127.0.0.1", 8000, ["-O3"])


def test_buffers_live_on_the_named_device_whatever_the_ambient_default():
    """vLLM builds the model (and so the runtime) under its device as torch's default, and runs
    the forward outside it: every buffer must be placed by the `device` argument, and the
    per-forward slots copied there. An ambient "meta" default stands in for CUDA here."""
    with torch.device("meta"):
        runtime = make_runtime()
    tensors = [runtime.keys, runtime.key_owner, runtime.slot_canary, runtime.tok_slot,
               runtime.lora.scale, *runtime.lora.a_rows.values(), *runtime.lora.b_rows.values()]
    assert {t.device.type for t in tensors} == {"cpu"}
    e = edit(0)
    runtime.add_edit(e, e.keys)
    runtime.step = step(["r0", "r1"], [3, 2], [[0, 1, 2], [0, 1]])
    hidden = torch.randn(5, HIDDEN)
    hidden[2] = e.keys[0]  # r0's key token sits on the edit's key: routed
    runtime.route(hidden)
    assert runtime.routes == {"r0": 0, "r1": -1}
    assert runtime.tok_slot[:5].tolist() == [-1, -1, 0, -1, -1]
    x, base = torch.randn(5, HIDDEN), torch.randn(5, 2 * INTER)
    y = base.clone()
    runtime.apply(0, y, x)
    assert torch.equal(y[[0, 1, 3, 4]], base[[0, 1, 3, 4]]) and not torch.equal(y[2], base[2])
