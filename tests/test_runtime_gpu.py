"""End to end on a GPU: SolaRuntime with the punica apply (vLLM's Triton LoRA kernels) and the
Triton router on CUDA in bf16, against the same runtime with the torch apply and the torch
router on CPU (fp32 weights). A prefill step, then decode steps, of routed and unrouted requests,
with last-token and mean-pooled keys, with and without a key map: routes and per-token slots
are equal; rows of tokens without an edit leave every edited linear's base output bit for bit;
routed rows agree within bf16 rounding; a revoked edit keeps its in-flight request, and the
same prompt sent again gets the base output.

Run on a CUDA machine with TRITON_INTERPRET=0. (Where vLLM is not installed, a stand-in package
of vLLM 0.32's LoRA op modules, with stubs for the little they import, can go on PYTHONPATH:
that is how these ran on an H100 without vLLM; the stand-in is not part of the repository.)
On CPU (TRITON_INTERPRET=1, tests/conftest.py) the `gpu` tests skip and the same bodies run in
Triton's interpreter, vLLM's kernels injected (`interpreted_kernels`), in fp16 (bf16 is broken
in the interpreter, see test_punica_apply.py).

States are small integers: exact in bf16 and in fp32 sums, so a routed request's query equals
its edit's key on both devices and routing cannot differ by rounding.
"""

import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from helpers import make_synthetic_edit
from interpreted_kernels import clear_pointer_caches, interpreted_vllm_ops
from test_punica_backend import GROUPS, HIDDEN, INTER, KV, MODULES, WIDTHS

from sola_vllm.arch import EditShape
from sola_vllm.key_map import KeyMap
from sola_vllm.keys import pool_keys
from sola_vllm.serving.config import ServingConfig
from sola_vllm.serving.punica_backend import PunicaBackend
from sola_vllm.serving.runtime import LoraTarget, SolaRuntime, StepMeta

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
interpreted = pytest.mark.skipif(not INTERPRETED, reason="the interpreted run needs "
                                 "TRITON_INTERPRET=1")

MODEL = "m" * 64  # the layer of test_punica_backend: q, v, gate, up, down in three linears
MAX_TOKENS, MAX_SEQS = 64, 8
# kernels vs the torch runtime (fp32 weights, unrounded shrink): test_punica_apply.py's bounds
TOLERANCE = {torch.bfloat16: dict(atol=6e-2, rtol=4e-2),
             torch.float16: dict(atol=5e-3, rtol=5e-3)}

# (key pool, metric, threshold, key map): distances between unrelated integer states are in
# the hundreds (l2) or near 1 (cosine); a routed query equals its key
CASES = {"last-l2": ("last", "l2", 10.0, False),
         "last-cosine-map": ("last", "cosine", 0.01, True),
         "mean-cosine": ("mean", "cosine", 0.01, False),
         "mean-l2-map": ("mean", "l2", 10.0, True)}
PROMPTS = {"hit0": 5, "miss": 4, "hit1": 3, "one": 1, "far": 6}  # prompt lengths
ROUTED = {"hit0": "e0", "hit1": "e1", "one": "e2"}  # request -> the edit its key is
RESENT = "hit0-again"  # hit0's prompt, sent again after e0 is revoked
LENGTHS = {**PROMPTS, RESENT: PROMPTS["hit0"]}


@dataclass(frozen=True)
class Target:
    """Where the runtime under test runs: device, model dtype, and the LoRA kernels (None:
    vLLM's registered torch.ops.vllm.lora_shrink/lora_expand)."""

    device: str
    dtype: torch.dtype
    kernels: tuple | None


@dataclass
class Pair:
    under_test: SolaRuntime  # punica apply, Triton router, on `target`
    reference: SolaRuntime  # torch apply, torch router, fp32 on CPU
    target: Target


@pytest.fixture(params=[pytest.param("cuda", marks=[gpu, pytest.mark.gpu]),
                        pytest.param("interpreted", marks=interpreted)])
def target(request) -> Target:
    if request.param == "cuda":
        return Target("cuda", torch.bfloat16, None)
    return Target("cpu", torch.float16, interpreted_vllm_ops(small=True))


@pytest.fixture(autouse=True)
def _fresh_pointer_caches():
    clear_pointer_caches()


# --- building the two runtimes -----------------------------------------------------------------
def edit_shape(key_pool: str) -> EditShape:
    return EditShape("llama", 1, (0,), MODULES, 8, 1.0, key_pool, 0)


def write_key_map(tmp_path, key_pool: str) -> str:
    gen = torch.Generator().manual_seed(7)
    key_map = KeyMap(torch.randn(HIDDEN, generator=gen), 2.0,
                     torch.randn(HIDDEN, 16, generator=gen),
                     {"model_fingerprint": MODEL, "key_pool": key_pool, "route_layer": 0})
    path = tmp_path / "map.safetensors"
    key_map.save(path)
    return str(path)


def serving_config(case: str, apply: str, router: str, key_map: str | None) -> ServingConfig:
    key_pool, metric, threshold, _ = CASES[case]
    return ServingConfig.from_shape(edit_shape(key_pool), "llama", MODEL, metric=metric,
                                    threshold=threshold, max_edits=4, max_keys=8, max_rank=8,
                                    apply=apply, router=router, key_map=key_map)


def make_pair(case: str, target: Target, tmp_path) -> Pair:
    key_map = write_key_map(tmp_path, CASES[case][0]) if CASES[case][3] else None
    under_test = SolaRuntime(serving_config(case, "punica", "triton", key_map), HIDDEN, GROUPS,
                             MAX_TOKENS, dtype=target.dtype, device=target.device,
                             max_seqs=MAX_SEQS, kernels=target.kernels)
    reference = SolaRuntime(serving_config(case, "torch", "torch", key_map), HIDDEN, GROUPS,
                            MAX_TOKENS)
    assert isinstance(under_test.lora, PunicaBackend) and under_test.router == "triton"
    assert reference.router == "torch" and (reference.key_map is None) == (key_map is None)
    return Pair(under_test, reference, target)


def integer_states(length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-50, 50, (length, HIDDEN), generator=gen).float()


def prompt_states() -> dict[str, torch.Tensor]:
    """Each request's states entering the route layer, prompt then decode positions."""
    states = {r: integer_states(n + 5, seed=i) for i, (r, n) in enumerate(PROMPTS.items())}
    return {**states, RESENT: states["hit0"]}


def reference_key(states: torch.Tensor, key_pool: str) -> torch.Tensor:
    """`keys.pool_keys` of one whole prompt's states [P, d]: what the edit was trained on."""
    mask = torch.ones(1, states.shape[0], dtype=torch.long)
    return pool_keys(states[None], mask, torch.tensor([states.shape[0] - 1]), key_pool)


def add_edits(pair: Pair, states: dict, key_pool: str) -> None:
    """e0, e1, e2 (slots 0, 1, 2; ranks 4, 8, 4), keyed on the prompts of ROUTED."""
    fingerprint = edit_shape(key_pool).fingerprint()
    for i, (req, edit_id) in enumerate(ROUTED.items()):
        edit = make_synthetic_edit(edit_id, layers=(0,), modules=MODULES, hidden=HIDDEN,
                                   intermediate=INTER, kv_dim=KV, rank=(4, 8, 4)[i],
                                   scale=(1.0, 0.5, 2.0)[i], seed=i,
                                   shape_fingerprint=fingerprint)
        edit.keys = reference_key(states[req][:PROMPTS[req]], key_pool)
        for runtime in (pair.under_test, pair.reference):
            assert runtime.add_edit(edit, edit.keys)["slot"] == i


# --- one step through both runtimes --------------------------------------------------------------
def step_inputs(rows_of_step: list, states: dict) -> tuple[StepMeta, torch.Tensor]:
    """rows_of_step: [(request, positions)]; hidden rows are states[request][positions]."""
    req_ids = [r for r, _ in rows_of_step]
    rows = np.concatenate([np.full(len(p), i) for i, (_, p) in enumerate(rows_of_step)])
    pos = np.concatenate([np.asarray(p, dtype=np.int64) for _, p in rows_of_step])
    hidden = torch.cat([states[r][list(p)] for r, p in rows_of_step])
    meta = StepMeta(len(pos), rows, pos, np.asarray([LENGTHS[r] for r in req_ids]), req_ids,
                    [None] * len(req_ids))
    return meta, hidden


def prefill(req_ids) -> list:
    return [(r, range(LENGTHS[r])) for r in req_ids]


def decode(req_ids, k: int) -> list:
    """The k-th generated token (k >= 0) of each request."""
    return [(r, [LENGTHS[r] + k]) for r in req_ids]


def expected_slots(meta: StepMeta, routes: dict) -> torch.Tensor:
    """A request's route applies from its key token (its prompt's last) on."""
    slots = [routes[meta.req_ids[row]] if pos >= meta.row_prompt_len[row] - 1 else -1
             for row, pos in zip(meta.tok_row, meta.tok_pos, strict=True)]
    return torch.tensor(slots, dtype=torch.int32)


def run_step(pair: Pair, rows_of_step: list, states: dict, seed: int) -> StepMeta:
    """Routes the step in both runtimes, checks the decisions are equal, then runs every
    edited linear through both (`check_every_linear`)."""
    meta, hidden = step_inputs(rows_of_step, states)
    target = pair.target
    pair.under_test.step = pair.reference.step = meta
    pair.under_test.route(hidden.to(target.device, target.dtype))
    pair.reference.route(hidden)
    tok = pair.under_test.tok_slot[:meta.num_tokens].cpu()
    assert pair.under_test.routes == pair.reference.routes
    assert torch.equal(tok, pair.reference.tok_slot[:meta.num_tokens])
    assert torch.equal(tok, expected_slots(meta, pair.reference.routes))
    check_every_linear(pair, tok, seed)
    return meta


def edited_columns(targets: list[LoraTarget], width: int) -> torch.Tensor:
    edited = torch.zeros(width, dtype=torch.bool)
    for t in targets:
        edited[t.offset:t.offset + t.out_features] = True
    return edited


def check_every_linear(pair: Pair, tok: torch.Tensor, seed: int) -> None:
    """Random inputs and base outputs in the model dtype through each edited linear: rows
    without an edit and unedited columns (k_proj's) exactly the base, routed rows close to the
    reference and changed by their edit."""
    device, dtype = pair.target.device, pair.target.dtype
    gen = torch.Generator().manual_seed(seed)
    unrouted = tok < 0
    for group, (targets, width) in enumerate(zip(GROUPS, WIDTHS, strict=True)):
        x = torch.randn(tok.shape[0], targets[0].in_features, generator=gen).to(dtype)
        base = torch.randn(tok.shape[0], width, generator=gen).to(dtype)
        got = base.clone().to(device)
        pair.under_test.apply(group, got, x.to(device))
        got = got.cpu()
        want = base.clone()
        pair.reference.apply(group, want, x)
        assert torch.equal(got[unrouted], base[unrouted])
        untouched = ~edited_columns(targets, width)
        assert torch.equal(got[:, untouched], base[:, untouched])
        torch.testing.assert_close(got, want, **TOLERANCE[dtype])
        if not unrouted.all():
            assert not torch.equal(got[~unrouted], base[~unrouted])


def rows_of(meta: StepMeta, req_id: str) -> np.ndarray:
    return np.flatnonzero(meta.tok_row == meta.req_ids.index(req_id))


# --- the test ----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_the_gpu_runtime_routes_and_applies_as_the_cpu_reference(case, target, tmp_path):
    key_pool = CASES[case][0]
    pair = make_pair(case, target, tmp_path)
    states = prompt_states()
    add_edits(pair, states, key_pool)
    everyone = list(PROMPTS)
    run_step(pair, prefill(everyone), states, seed=0)
    assert pair.reference.routes == {"hit0": 0, "miss": -1, "hit1": 1, "one": 2, "far": -1}
    for k in range(2):
        run_step(pair, decode(everyone, k), states, seed=1 + k)

    for runtime in (pair.under_test, pair.reference):
        runtime.set_active("e0", False)
    # in flight: hit0 keeps e0 (a response is wholly edited or wholly base)
    meta = run_step(pair, decode(everyone, 2), states, seed=3)
    assert pair.under_test.tok_slot[rows_of(meta, "hit0")].tolist() == [0]
    for runtime in (pair.under_test, pair.reference):
        runtime.finish_requests(["hit0"])
    others = [r for r in everyone if r != "hit0"]
    meta = run_step(pair, prefill([RESENT]) + decode(others, 3), states, seed=4)
    assert pair.reference.routes[RESENT] == -1
    # every row of the resent prompt is -1, so `check_every_linear` found them exactly base
    assert (pair.under_test.tok_slot[rows_of(meta, RESENT)] == -1).all()
    meta = run_step(pair, decode([RESENT], 0) + decode(others, 4), states, seed=5)
    assert (pair.under_test.tok_slot[rows_of(meta, RESENT)] == -1).all()


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["last-l2", "mean-cosine"])
def test_steps_without_key_tokens_route_without_a_host_sync(case, tmp_path):
    """On CUDA a step routes inside the forward, between captured pieces: only a step with key
    tokens may wait for the GPU (its decisions are read on the host). Decode steps and prompt
    chunks before their key token must not, block sums (prefix caching) included."""
    pair = make_pair(case, Target("cuda", torch.bfloat16, None), tmp_path)
    states = prompt_states()
    add_edits(pair, states, CASES[case][0])
    runtime = pair.under_test
    run_step(pair, prefill(list(PROMPTS)), states, seed=0)  # key tokens: reads on the host
    chunk_before_key = [(RESENT, range(3))]
    for rows_of_step in (decode(list(PROMPTS), 0) + chunk_before_key, decode(list(PROMPTS), 1)):
        meta, hidden = step_inputs(rows_of_step, states)
        meta.row_blocks = np.arange(4 * len(meta.req_ids), dtype=np.int32).reshape(-1, 4)
        meta.block_size, meta.num_kv_blocks = 4, 64
        runtime.step = meta
        route_without_syncs(runtime, hidden.to("cuda", torch.bfloat16))
        got = runtime.tok_slot[:meta.num_tokens].cpu()
        assert torch.equal(got, expected_slots(meta, runtime.routes))
    runtime._slot_staging = None  # the check catches a plain (pageable, syncing) slot copy
    with pytest.raises(RuntimeError, match="synchroniz"):
        route_without_syncs(runtime, hidden.to("cuda", torch.bfloat16))


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("case", ["last-cosine-map", "mean-l2-map"])
def test_a_step_with_key_tokens_waits_for_the_gpu_only_once_all_is_queued(case, tmp_path):
    """The host reads a step's routing decisions only after the search, the token slots and
    the apply's state are queued: a wait before would leave the GPU idle while they launch."""
    pair = make_pair(case, Target("cuda", torch.bfloat16, None), tmp_path)
    states = prompt_states()
    add_edits(pair, states, CASES[case][0])
    runtime = pair.under_test
    prepare = runtime.lora.prepare

    def prepare_then_allow_syncs(tok_slot):
        state = prepare(tok_slot)
        torch.cuda.set_sync_debug_mode("default")
        return state

    runtime.lora.prepare = prepare_then_allow_syncs
    meta, hidden = step_inputs(prefill(list(PROMPTS)), states)
    runtime.step = pair.reference.step = meta
    route_without_syncs(runtime, hidden.to("cuda", torch.bfloat16))
    pair.reference.route(hidden)
    assert runtime.routes == pair.reference.routes == {"hit0": 0, "miss": -1, "hit1": 1,
                                                       "one": 2, "far": -1}
    assert torch.equal(runtime.tok_slot[:meta.num_tokens].cpu(),
                       expected_slots(meta, runtime.routes))


def route_without_syncs(runtime: SolaRuntime, hidden: torch.Tensor) -> None:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # raises on any synchronizing CUDA call
    try:
        runtime.route(hidden)
    finally:
        torch.cuda.set_sync_debug_mode("default")
