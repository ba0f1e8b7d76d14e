"""CUDA graphs with SoLA routing (`sola_vllm.serving.graphs`): piecewise graphs split at the
router, the punica apply captured inside them.

What CPU can check, and does here:
- the configuration: vLLM's own piecewise splitting ops plus `sola::route`, and the settings
  refused at engine start;
- the split: vLLM's `split_graph`, on the graph Dynamo traces from a routed forward, puts the
  router alone in an eager piece and every LoRA apply in captured pieces;
- the replay: the apply's launches (Triton grids, scalars, tensor addresses) and torch ops,
  recorded when vLLM would capture (a dummy batch, every slot -1), are identical to those of
  every later step of the same padded size, whatever the routes, edits added or revoked; and
  replaying the recorded launches gives the eager apply's result (`launch_recorder`).
The kernels run in Triton's interpreter here; with TRITON_INTERPRET=0 on a CUDA machine the
replay test runs vLLM's compiled kernels. No CUDA graph has been captured on a GPU yet.
"""

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from interpreted_kernels import clear_pointer_caches, interpreted_vllm_modules
from launch_recorder import LaunchRecorder
from test_punica_backend import DEVICE, DTYPE, GROUPS, HIDDEN, VS_REF, WIDTHS, config, edit, step
from vllm.config import CompilationConfig, CUDAGraphMode

from sola_vllm.serving.graphs import (
    ROUTE_OP,
    graph_compilation_config,
    graphs_blocker,
    vllm_default_splitting_ops,
)
from sola_vllm.serving.ops import register_runtime
from sola_vllm.serving.runtime import SolaRuntime

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not INTERPRETED and not CUDA,
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")


# --- configuration ----------------------------------------------------------------------------
def test_the_graph_config_is_vllms_piecewise_split_plus_the_router():
    compilation = CompilationConfig(**graph_compilation_config())
    compilation.set_splitting_ops_for_v1("naive")  # what VllmConfig does with it
    assert compilation.cudagraph_mode == CUDAGraphMode.PIECEWISE
    assert compilation.splitting_ops_contain_attention()
    assert set(vllm_default_splitting_ops()) | {ROUTE_OP} == set(compilation.splitting_ops)
    assert graphs_blocker(compilation, "punica") is None


def compilation(mode: str, splitting_ops=None):
    return SimpleNamespace(cudagraph_mode=CUDAGraphMode[mode], splitting_ops=splitting_ops)


WITH_ROUTE = [*vllm_default_splitting_ops(), ROUTE_OP]


@pytest.mark.parametrize("mode", ["FULL", "FULL_AND_PIECEWISE", "FULL_DECODE_ONLY"])
def test_full_graphs_are_refused_because_they_capture_the_router(mode):
    assert "captures whole forwards" in graphs_blocker(compilation(mode, WITH_ROUTE), "punica")


def test_piecewise_graphs_need_the_router_split_the_punica_apply_and_no_breakable_graphs():
    assert "would capture the router" in graphs_blocker(
        compilation("PIECEWISE", vllm_default_splitting_ops()), "punica")
    assert "would capture the router" in graphs_blocker(compilation("PIECEWISE", None),
                                                        "punica")
    assert "not graph-safe" in graphs_blocker(compilation("PIECEWISE", WITH_ROUTE), "torch")
    assert "breakable" in graphs_blocker(compilation("PIECEWISE", WITH_ROUTE), "punica",
                                         breakable=True)
    for eager in (compilation("NONE"), SimpleNamespace(cudagraph_mode=None)):
        assert graphs_blocker(eager, "torch") is None


def test_the_engine_refuses_graphs_that_would_replay_a_stale_route():
    from sola_vllm.serving.graphs import check_graphs

    check_graphs(SimpleNamespace(compilation_config=compilation("NONE")), "torch")
    check_graphs(SimpleNamespace(compilation_config=compilation("PIECEWISE", WITH_ROUTE)),
                 "punica")
    with pytest.raises(ValueError, match="FULL_AND_PIECEWISE.*--cuda-graphs.*--enforce-eager"):
        check_graphs(SimpleNamespace(compilation_config=compilation("FULL_AND_PIECEWISE")),
                     "punica")


def test_serve_passes_the_graph_config_and_refuses_a_second_one(monkeypatch):
    import json

    from sola_vllm.serving import llm
    from sola_vllm.serving.serve import build_command, check_apply

    with pytest.raises(ValueError, match="--cuda-graphs needs the punica apply"):
        check_apply("torch", cuda_graphs=True)
    with pytest.raises(ValueError, match="need a CUDA device"):
        llm.cuda_graphs_config()  # this machine has no GPU (on one, the config itself)
    monkeypatch.setattr(llm, "on_cuda", lambda: True)
    kwargs = {"model": "/m/SmolLM2", "hf_overrides": {}, "worker_extension_cls": "x",
              "compilation_config": llm.cuda_graphs_config()}
    cmd = build_command(kwargs, "127.0.0.1", 8000, ["--dtype", "bfloat16"])
    passed = json.loads(cmd[cmd.index("--compilation-config") + 1])
    assert passed == graph_compilation_config() and "--enforce-eager" not in cmd
    for flag in (["--enforce-eager"], ["-O3"], ["-cc", "{}"]):
        with pytest.raises(ValueError, match=f"--cuda-graphs sets .* drop {flag[0]}"):
            build_command(kwargs, "127.0.0.1", 8000, flag)


# --- the split --------------------------------------------------------------------------------
class _RoutedLayer(torch.nn.Module):
    """The shape of a patched decoder layer: the router, then edited linears."""

    def __init__(self, runtime: SolaRuntime):
        super().__init__()
        self.up = torch.nn.Linear(HIDDEN, WIDTHS[1], bias=False)
        self.down = torch.nn.Linear(WIDTHS[1] // 2, HIDDEN, bias=False)
        self.tok_slot, self.runtime_id = runtime.tok_slot, register_runtime(runtime)

    def forward(self, hidden):
        torch.ops.sola.route(hidden, self.tok_slot, self.runtime_id)
        up = self.up(hidden)
        torch.ops.sola.lora_apply(up, hidden, self.tok_slot, self.runtime_id, 1)
        act = torch.nn.functional.silu(up[:, :WIDTHS[1] // 2]) * up[:, WIDTHS[1] // 2:]
        down = self.down(act)
        torch.ops.sola.lora_apply(down, act, self.tok_slot, self.runtime_id, 2)
        return hidden + down


def test_vllms_split_runs_the_router_eagerly_between_captured_pieces():
    from vllm.compilation.backends import split_graph

    runtime = SolaRuntime(config("torch"), HIDDEN, GROUPS, max_num_tokens=64)
    layer = _RoutedLayer(runtime)
    traced = []

    def backend(graph, example_inputs):  # what vLLM's piecewise backend is handed
        traced.append(graph)
        return graph.forward

    hidden = torch.randn(6, HIDDEN)
    out = torch.compile(layer, backend=backend, fullgraph=True)(hidden)
    torch.testing.assert_close(out, layer(hidden))
    _, pieces = split_graph(traced[0], graph_compilation_config()["splitting_ops"])

    def ops_in(piece) -> list[str]:
        return [str(n.target) for n in piece.graph.graph.nodes if n.op == "call_function"
                and str(n.target).startswith("sola.")]

    routed = [p for p in pieces if any("sola.route" in op for op in ops_in(p))]
    applying = [p for p in pieces if any("sola.lora_apply" in op for op in ops_in(p))]
    assert len(routed) == 1 and routed[0].is_splitting_graph  # run eagerly, every step
    calls = [n for n in routed[0].graph.graph.nodes if n.op == "call_function"]
    assert len(calls) == 1  # the router alone: the linears stay in captured pieces
    assert applying and not any(p.is_splitting_graph for p in applying)
    assert all(p.graph_id > routed[0].graph_id for p in applying)


# --- the replay -------------------------------------------------------------------------------
KERNEL_NAMES = ("_lora_shrink_kernel", "_lora_expand_kernel", "_lora_shrink_reduce_kernel")
CAPTURE_SIZE = 16  # the padded token count vLLM captured for


@pytest.fixture(scope="module")
def recorder_and_kernels():
    if INTERPRETED:
        mods = interpreted_vllm_modules(small=True)
        modules = [mods["lora_shrink_op"], mods["lora_expand_op"]]
    else:  # CUDA: vLLM's installed modules
        from vllm.lora.ops.triton_ops import lora_expand_op, lora_shrink_op

        modules = [lora_shrink_op, lora_expand_op]
    # the Python launchers, not the registered custom ops: the recorder must see the launchers'
    # own torch ops (a custom op is one opaque call to the dispatcher)
    kernels = (modules[0]._lora_shrink, modules[1]._lora_expand)
    recorder = LaunchRecorder(modules, KERNEL_NAMES)
    yield recorder, kernels
    recorder.restore()


def padded(hidden: torch.Tensor) -> torch.Tensor:
    out = torch.randn(CAPTURE_SIZE, HIDDEN) * 10
    out[: hidden.shape[0]] = hidden
    return out.to(DEVICE)


def later_steps(runtime: SolaRuntime, edits: list) -> list:
    """(change before the step, step, hidden): a prefill routing a -> e0, b nowhere, c -> e1;
    their decode; then e2 added and e0 revoked while a decodes, d (e0's key) and e (e2's key)
    arrive. Each padded to CAPTURE_SIZE tokens."""
    e0, e1, e2 = edits
    prefill = torch.randn(9, HIDDEN) * 10
    prefill[2], prefill[8] = e0.keys[0], e1.keys[0]
    mixed = torch.randn(6, HIDDEN) * 10
    mixed[3], mixed[5] = e0.keys[0], e2.keys[0]

    def add_and_revoke():
        runtime.add_edit(e2, e2.keys)
        runtime.set_active(e0.id, False)

    return [(lambda: None, step("abc", [3] * 3, [[0, 1, 2]] * 3), prefill),
            (lambda: None, step("abc", [3] * 3, [[3]] * 3), torch.randn(3, HIDDEN) * 10),
            (add_and_revoke, step("acde", [3, 3, 2, 2], [[4], [4], [0, 1], [0, 1]]), mixed)]


@needs_triton
def test_the_captured_apply_replays_the_routes_of_every_later_step(recorder_and_kernels):
    recorder, kernels = recorder_and_kernels
    clear_pointer_caches()
    runtime = SolaRuntime(config("punica"), HIDDEN, GROUPS, max_num_tokens=64, dtype=DTYPE,
                          device=DEVICE, max_seqs=8, kernels=kernels)
    edits = [edit(0, 4, 1.0), edit(1, 8, 0.5), edit(2, 4, 2.0)]
    for e in edits[:2]:
        runtime.add_edit(e, e.keys)
    # the captured piece's static buffers: each edited linear's input and output
    xs = [torch.zeros(CAPTURE_SIZE, g[0].in_features, dtype=DTYPE, device=DEVICE)
          for g in GROUPS]
    ys = [torch.zeros(CAPTURE_SIZE, w, dtype=DTYPE, device=DEVICE) for w in WIDTHS]

    def captured_piece():
        for group in range(len(GROUPS)):
            runtime.apply(group, ys[group], xs[group])

    # vLLM warms up, then captures on a dummy batch: no step, so every slot is -1
    runtime.step = None
    runtime.route(padded(torch.zeros(0, HIDDEN)))
    captured_piece()
    with recorder.recording():
        captured_piece()
    capture, capture_calls = list(recorder.events), list(recorder.calls)
    assert recorder.launches() >= 2 * len(GROUPS) and not recorder.allocations

    gen = torch.Generator().manual_seed(7)
    for change, meta, hidden in later_steps(runtime, edits):
        change()
        runtime.step = meta
        runtime.route(padded(hidden))  # the eager piece: routes, slots, kernel metadata
        tok = runtime.tok_slot[:CAPTURE_SIZE].cpu()
        assert (tok[meta.num_tokens:] == -1).all() and (tok[: meta.num_tokens] >= 0).any()
        bases = []
        for x, y in zip(xs, ys, strict=True):
            x.copy_(torch.randn(x.shape, generator=gen))
            bases.append(torch.randn(y.shape, generator=gen).to(DEVICE, DTYPE))
            y.copy_(bases[-1])
        with recorder.recording():  # what this step launches, run eagerly
            captured_piece()
        assert recorder.events == capture and not recorder.allocations
        eager = [y.clone() for y in ys]
        for y, base in zip(ys, bases, strict=True):
            y.copy_(base)
        recorder.calls = capture_calls
        recorder.replay()  # the graph captured on the dummy batch
        unrouted = (tok < 0).to(DEVICE)
        for y, want, base in zip(ys, eager, bases, strict=True):
            if INTERPRETED:
                assert torch.equal(y, want)
            else:  # split-K atomics may add in another order
                torch.testing.assert_close(y, want, **VS_REF)
            assert torch.equal(y[unrouted], base[unrouted])  # padding and unrouted rows
            assert not torch.equal(y[~unrouted], base[~unrouted])
    assert runtime.routes == {"a": 0, "b": -1, "c": 1, "d": -1, "e": 2}
    assert np.array_equal(runtime.hits[:3], [1, 1, 1])
