"""The router's nearest-key search (`ServingConfig.router`, `serving/route_kernel.py`): the Triton
kernel of kernels/ routes a runtime exactly as the torch search does, and the choice is made
once, refusing a Triton router that cannot run. The kernel runs in Triton's interpreter here
(TRITON_INTERPRET=1, tests/conftest.py); on a CUDA machine with TRITON_INTERPRET=0 the same
routing test runs it compiled on the GPU."""

import dataclasses

import numpy as np
import pytest
import torch
from helpers import make_synthetic_edit

from sola_vllm.arch import EditShape
from sola_vllm.edit import lora_name
from sola_vllm.serving import route_kernel
from sola_vllm.serving.config import ServingConfig
from sola_vllm.serving.route_kernel import choose_router
from sola_vllm.serving.runtime import LoraTarget, SolaRuntime, StepMeta

HIDDEN, INTER, LAYERS, MODULES = 64, 96, (1,), ("mlp.down_proj",)
SHAPE = EditShape("llama", 2, LAYERS, MODULES, 4, 1.0)
CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not route_kernel.interpreted() and not CUDA,
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA and not route_kernel.interpreted() else "cpu"


def runtime(router: str, metric: str, threshold: float,
            chat_threshold: float | None = None) -> SolaRuntime:
    config = ServingConfig.from_shape(SHAPE, "llama", "m" * 64, metric=metric,
                                      threshold=threshold, chat_threshold=chat_threshold,
                                      max_edits=64, max_keys=256, max_rank=4, router=router,
                                      apply="torch")
    groups = [[LoraTarget(lora_name(1, "mlp.down_proj"), 0, HIDDEN, INTER)]]
    return SolaRuntime(config, HIDDEN, groups, max_num_tokens=128, device=DEVICE)


def edit(i: int, num_keys: int):
    """Keys after the first are chat-form keys (`Edit.key_forms`) for every other edit."""
    made = make_synthetic_edit(f"e{i}", layers=LAYERS, modules=MODULES, hidden=HIDDEN,
                               intermediate=INTER, seed=i, num_keys=num_keys, rank=4)
    forms = ["raw"] + ["chat"] * (num_keys - 1) if i % 2 else None
    return dataclasses.replace(made, key_forms=forms)


def prefill(num_requests: int, prompt_len: int = 2) -> StepMeta:
    rows = np.repeat(np.arange(num_requests), prompt_len)
    pos = np.tile(np.arange(prompt_len), num_requests)
    return StepMeta(len(pos), rows, pos, np.full(num_requests, prompt_len),
                    [f"r{i}" for i in range(num_requests)], [None] * num_requests,
                    [i % 5 == 0 for i in range(num_requests)])  # every fifth opts in


@needs_triton
@pytest.mark.parametrize("metric, threshold, chat_threshold, between",
                         [("l2", 0.5, 0.2, 0.04), ("cosine", 0.01, 0.001, 0.06)])
def test_the_triton_router_routes_every_request_as_the_torch_router(metric, threshold,
                                                                    chat_threshold, between):
    """40 edits (1 to 3 keys, chat-form keys among them, some canaries, some revoked), 48
    requests: queries equal to a key, near one (under both thresholds, between the chat-form
    and the raw one, over both), and far from all; routes, per-token slots, hits and recorded
    distances agree."""
    gen = torch.Generator().manual_seed(1)
    edits = [edit(i, 1 + i % 3) for i in range(40)]
    runtimes = [runtime("triton", metric, threshold, chat_threshold),
                runtime("torch", metric, threshold, chat_threshold)]
    assert [r.router for r in runtimes] == ["triton", "torch"]
    for r in runtimes:
        for i, e in enumerate(edits):
            r.add_edit(e, e.keys)
            if i % 7 == 3:
                r.set_state(e.id, "canary")
            elif i % 11 == 5:
                r.set_active(e.id, False)
    meta = prefill(48)
    hidden = torch.randn(meta.num_tokens, HIDDEN, generator=gen) * 3
    for i in range(48):
        key = edits[i % 40].keys[i % edits[i % 40].keys.shape[0]]
        kind = i % 5  # 0: the key itself, 1: near it, 2: between the thresholds, 3: further,
        noise = torch.randn(HIDDEN, generator=gen)  # 4: far from every key
        if kind < 4:
            hidden[2 * i + 1] = key + noise * (0, 0.002, between, 0.2)[kind] * key.norm() / 8
    for r in runtimes:
        r.step = meta
        r.route(hidden.to(DEVICE))
    triton, torch_ = runtimes
    table, _, prepared, _ = triton.routed_keys(False)
    assert torch.equal(prepared, table.square().sum(1))  # key norms, no unit-key copy
    assert (torch_.routed_keys(False)[2] is None) == (metric == "l2")
    assert triton.routes == torch_.routes
    assert torch.equal(triton.tok_slot.cpu(), torch_.tok_slot.cpu())
    assert np.array_equal(triton.hits, torch_.hits)
    routed = sum(slot >= 0 for slot in torch_.routes.values())
    assert 10 < routed < 48  # hits and misses both exercised
    # the per-key thresholds decided: some distance between the two routed, some did not
    records = [torch_.request_log.records[f"r{i}"] for i in range(48)]
    between = [r for r in records if chat_threshold <= r.distance < threshold]
    assert any(r.edit_id is None for r in between) and any(r.edit_id for r in between)
    for req in torch_.routes:
        got, want = triton.request_log.records[req], torch_.request_log.records[req]
        assert got.edit_id == want.edit_id
        assert got.distance == pytest.approx(want.distance, rel=1e-5, abs=1e-6)


@needs_triton
def test_the_triton_router_without_keys_routes_nowhere():
    r = runtime("triton", "cosine", 0.01)
    r.step = prefill(3)
    r.route(torch.randn(6, HIDDEN, device=DEVICE))
    assert r.routes == {"r0": -1, "r1": -1, "r2": -1}


@needs_triton
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_a_triton_router_that_routes_otherwise_stops_the_engine_at_start(monkeypatch, metric):
    route_kernel.self_check(route_kernel.make_nearest("triton"), HIDDEN, DEVICE, metric, 0.01)
    kernels = route_kernel.kernels

    def off_by_one(queries, keys, owners, threshold, metric, prepared=None):
        slot, dist, index = kernels.nearest_key(queries.contiguous(), keys, owners, threshold,
                                                metric)
        return torch.where(slot >= 0, (slot + 1) % 5, slot), dist, index

    monkeypatch.setattr(route_kernel, "make_nearest", lambda choice: off_by_one)
    monkeypatch.setattr("sola_vllm.serving.runtime.make_nearest", lambda choice: off_by_one)
    with pytest.raises(route_kernel.RouterCheckError, match="disagrees .* on slots"):
        runtime("triton", metric, 0.01)
    assert runtime("torch", metric, 0.01).router == "torch"  # the reference is never checked


def test_the_router_is_chosen_once_and_an_impossible_triton_router_is_refused(monkeypatch):
    assert choose_router("auto", "cpu") == "torch"  # the interpreter is for tests only
    assert choose_router("torch", "cuda") == "torch"
    assert choose_router("auto", "cuda") == "triton"
    monkeypatch.setattr(route_kernel, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="router 'triton' cannot run here: .*needs CUDA"):
        choose_router("triton", "cpu")
    monkeypatch.setattr(route_kernel.kernels, "triton", None)
    assert choose_router("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="triton is not installed"):
        choose_router("triton", "cuda")


def test_serve_refuses_an_impossible_triton_router_before_vllm_starts(monkeypatch):
    from sola_vllm.serving import serve

    serve.check_router("torch")
    monkeypatch.setattr(route_kernel, "interpreted", lambda: False)
    monkeypatch.setattr(serve, "on_cuda", lambda: False)
    with pytest.raises(ValueError, match="--router triton cannot run here: .*needs CUDA"):
        serve.check_router("triton")


@pytest.mark.parametrize("bad", ["cuda", "Triton", "", None])
def test_the_router_option_is_validated(bad):
    with pytest.raises(ValueError, match="router .* is not one of"):
        ServingConfig.from_shape(SHAPE, "llama", "m" * 64, router=bad)
