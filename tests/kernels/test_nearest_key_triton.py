"""`nearest_key` (Triton) and its torch alternatives against `nearest_key_ref`.

On CPU the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set by tests/conftest.py).
With TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled on the GPU, and so do the
`gpu` ones (bf16, large N, CUDA graphs): `TRITON_INTERPRET=0 pytest tests/kernels -m gpu`.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import sola_vllm.kernels.nearest_key as nk
from sola_vllm.kernels.nearest_key import (
    nearest_key,
    nearest_key_ref,
    nearest_key_torch_cdist,
    nearest_key_torch_mm,
)

INTERPRETED = type(nk._nearest_key_partial_kernel).__name__ == "InterpretedFunction"
CUDA = torch.cuda.is_available()
DEVICE = "cpu" if INTERPRETED or not CUDA else "cuda"
pytestmark = pytest.mark.skipif(not INTERPRETED and not CUDA,
                                reason="Triton needs CUDA or TRITON_INTERPRET=1")
gpu = pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
PROVIDERS = {"triton": nearest_key, "torch_mm": nearest_key_torch_mm,
             "torch_cdist": nearest_key_torch_cdist}

# dist tolerance by query dtype. Queries are upcast to fp32 exactly and the winner's distance is
# recomputed by explicit differences like the reference, so only the fp32 summation order
# differs (~sqrt(d) ulp): the same bound serves every dtype.
TOLERANCE = {
    torch.float32: dict(atol=1e-5, rtol=1e-5),  # cosine: absolute error of 1 - cos near 0
    torch.float16: dict(atol=1e-5, rtol=1e-5),  # fp16 -> fp32 is exact
    torch.bfloat16: dict(atol=1e-5, rtol=1e-5),  # bf16 -> fp32 is exact
}


def assert_same_routing(got, want, dtype):
    """edit and key index must match exactly (keys are well separated), dist within tolerance."""
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[2].cpu(), want[2])
    assert got[0].dtype == torch.int32 and got[1].dtype == torch.float32
    assert got[2].dtype == torch.int64
    torch.testing.assert_close(got[1].cpu(), want[1], **TOLERANCE[dtype])


def routing_case(num_queries, num_keys, dim, metric, dtype, tries=20):
    """Keys with random norms in [1, 4]; query s sits next to key target[s], at 1e-3 (even s:
    hits) or 1e-1 (odd s: misses) of the closest key pair's separation, so its nearest key is
    target[s] beyond rounding; the threshold sits geometrically between hits and misses. A draw
    whose hits round to distance 0 in `dtype` (many keys in few dimensions: fp16 cannot place a
    query that near its key) leaves no threshold between them and is drawn again."""
    for _ in range(tries):
        case = _draw_routing_case(num_queries, num_keys, dim, metric, dtype)
        if case[3] > 0:
            return case
    raise AssertionError(f"no routable case in {tries} draws")


def _draw_routing_case(num_queries, num_keys, dim, metric, dtype):
    unit = torch.nn.functional.normalize(torch.randn(num_keys, dim), dim=1)
    keys = unit * (1 + 3 * torch.rand(num_keys, 1))
    if num_keys > 2048:  # random directions in high d: pairwise chords are ~1.4
        sep = torch.tensor(1.0)
    elif num_keys > 1:
        sep = torch.pdist(keys if metric == "l2" else unit).min()
    else:
        sep = torch.tensor(1.0)
    target = torch.randint(0, num_keys, (num_queries,))
    scale = torch.where(torch.arange(num_queries) % 2 == 0, 1e-3, 1e-1) * sep  # [S]
    if metric == "cosine":  # a chord of the unit sphere, scaled by the key's norm
        scale = scale * keys[target].norm(dim=1)
    noise = torch.nn.functional.normalize(torch.randn(num_queries, dim), dim=1)
    queries = (keys[target] + scale[:, None] * noise).to(dtype)
    dist = nk.pairwise_distance_ref(queries, keys, metric)[torch.arange(num_queries), target]
    hit = torch.arange(num_queries) % 2 == 0
    threshold = 1.0
    if hit.any() and (~hit).any():
        assert dist[hit].max() * 10 < dist[~hit].min(), "case too tight for exact routing"
        threshold = float((dist[hit].max() * dist[~hit].min()).sqrt())
    owners = torch.randint(0, 5, (num_keys,), dtype=torch.int64)
    valid = None if num_queries == 1 else torch.arange(num_queries) % 3 != 2
    return queries, keys, owners, threshold, valid, target


SHAPES = [(1, 1, 3), (1, 130, 577), (3, 7, 60), (3, 130, 3), (17, 7, 577), (17, 130, 60),
          (65, 40, 24)]


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "S{}-N{}-d{}".format(*s))
def test_matches_reference(shape, metric, dtype, provider):
    queries, keys, owners, threshold, valid, target = routing_case(*shape, metric, dtype)
    want = nearest_key_ref(queries, keys, owners, threshold, metric, valid)
    kept = valid if valid is not None else torch.ones(shape[0], dtype=torch.bool)
    assert torch.equal(want[2][kept], target[kept])  # the case is as separated as intended
    if shape[0] > 1:
        assert (want[0] >= 0).any() and ((want[0] == -1) & kept).any()  # hits and misses
    args = [t.to(DEVICE) if t is not None else None for t in (queries, keys, owners, valid)]
    got = PROVIDERS[provider](*args[:3], threshold, metric, args[3])
    assert_same_routing(got, want, dtype)


@pytest.mark.parametrize("num_queries", [1, 17], ids=["S1-broadcast", "S17-dot"])
@pytest.mark.parametrize("metric, first, second, factor", [
    ("l2", 3, 4, 1.0), ("l2", 5, 100, 1.0), ("l2", 5, 200, 1.0),
    ("cosine", 3, 4, 1.0), ("cosine", 5, 100, 1.0), ("cosine", 5, 200, 1.0),
    ("cosine", 7, 290, 2.0),  # only cosine ties a key with its multiple
], ids=["l2-same-tile", "l2-other-tile", "l2-other-split", "cosine-same-tile",
        "cosine-other-tile", "cosine-other-split", "cosine-scaled-x2"])
def test_tie_goes_to_the_lowest_key_index(metric, first, second, factor, num_queries):
    num_keys, dim = 300, 60
    # 64-key tiles, 128-key splits: 3 and 4 share a tile, 5 and 100 a split, 200 is in another
    config = nk._launch_config(num_queries, num_keys, dim, torch.device(DEVICE))
    if DEVICE == "cpu":
        assert (config.block_n, config.keys_per_split, config.num_splits) == (64, 128, 3)
    keys = torch.nn.functional.normalize(torch.randn(num_keys, dim), dim=1) * 3
    keys[second] = keys[first] * factor  # x2 is exact in fp32: a bitwise tie for cosine
    queries = keys[first] + 1e-3 * torch.randn(num_queries, dim)
    owners = torch.arange(num_keys, dtype=torch.int32) + 100
    want = nearest_key_ref(queries, keys, owners, 0.5, metric)
    assert (want[2] == first).all()
    for provider in PROVIDERS.values():
        got = provider(queries.to(DEVICE), keys.to(DEVICE), owners.to(DEVICE), 0.5, metric)
        assert_same_routing(got, want, torch.float32)


@pytest.mark.parametrize("num_queries", [1, 6], ids=["S1-broadcast", "S6-dot"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_a_blocking_key_routes_to_no_edit_and_loses_exact_ties(metric, num_queries):
    """Revoked edits' keys (`RouterConfig.revoked_keys="block"`) are owned by -1 and listed
    after the routed ones: nearest one routes nowhere, an exact tie goes to the routed key."""
    num_keys, dim = 300, 60
    keys = torch.nn.functional.normalize(torch.randn(num_keys, dim), dim=1) * 3
    owners = torch.arange(num_keys, dtype=torch.int32)
    owners[200:] = -1  # keys 200.. block
    keys[250] = keys[7]  # a blocking key identical to a routed one
    # even queries next to blocking key 210, odd ones exactly on key 7 (and so on key 250)
    queries = torch.stack([keys[210] + 1e-3 * torch.randn(dim) if s % 2 == 0 else keys[7]
                           for s in range(num_queries)])
    want = nearest_key_ref(queries, keys, owners, 0.5, metric)
    assert want[0].tolist() == [-1 if s % 2 == 0 else 7 for s in range(num_queries)]
    assert want[2].tolist() == [210 if s % 2 == 0 else 7 for s in range(num_queries)]
    for provider in PROVIDERS.values():
        got = provider(queries.to(DEVICE), keys.to(DEVICE), owners.to(DEVICE), 0.5, metric)
        assert_same_routing(got, want, torch.float32)


@pytest.mark.parametrize("num_queries", [1, 17], ids=["S1-broadcast", "S17-dot"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_identical_query_has_distance_exactly_zero(dtype, num_queries):
    keys = (torch.randn(40, 576) * 10).to(dtype).float().to(DEVICE)  # fp16-representable
    rows = torch.arange(num_queries, device=DEVICE) % 40
    edit, dist, index = nearest_key(keys[rows].to(dtype), keys, torch.arange(40, device=DEVICE),
                                    1e-9, "l2")
    assert (dist == 0).all() and torch.equal(index, rows) and torch.equal(edit, rows.int())


def test_threshold_is_strict_and_invalid_rows_are_skipped():
    keys = torch.tensor([[0.0, 0.0]], device=DEVICE)
    queries = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, 0.0]], device=DEVICE)
    owners = torch.tensor([3], device=DEVICE)
    edit, _, _ = nearest_key(queries, keys, owners, 1.0, "l2")
    assert edit.tolist() == [-1, 3, 3]  # distance 1.0 is not < 1.0
    valid = torch.tensor([True, False, True], device=DEVICE)
    edit, dist, index = nearest_key(queries, keys, owners, 1.0, "l2", valid)
    assert edit.tolist() == [-1, -1, 3] and dist[1].isinf() and index.tolist() == [0, -1, 0]


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("num_queries", [1, 6, 20], ids=["S1", "S6", "S20-dot"])
def test_per_key_thresholds_route_as_the_reference(num_queries, metric, provider):
    """Per-key thresholds (one per key; the winner's own decides): half the keys get a
    threshold above every distance, half one below, so each path must read the winner's."""
    queries, keys, owners, threshold, valid, _ = routing_case(num_queries, 130, 60, metric,
                                                              torch.float32)
    key_thr = torch.where(torch.arange(130) % 2 == 0, 1e9, 0.0).float()
    want = nearest_key_ref(queries, keys, owners, key_thr, metric, valid)
    kept = valid if valid is not None else torch.ones(num_queries, dtype=torch.bool)
    even = want[2] % 2 == 0
    assert torch.equal(want[0] >= 0, even & kept)  # the winner's threshold decided
    args = [t.to(DEVICE) if t is not None else None for t in (queries, keys, owners, valid)]
    got = PROVIDERS[provider](*args[:3], key_thr.to(DEVICE), metric, args[3])
    assert_same_routing(got, want, torch.float32)


@pytest.mark.parametrize("num_queries", [0, 3], ids=["S0", "S3"])
def test_no_keys_routes_nothing(num_queries):
    out = (torch.zeros(num_queries, dtype=torch.int32, device=DEVICE),
           torch.zeros(num_queries, device=DEVICE),
           torch.zeros(num_queries, dtype=torch.int64, device=DEVICE))
    got = nearest_key(torch.randn(num_queries, 8, device=DEVICE), torch.zeros(0, 8, device=DEVICE),
                      torch.zeros(0, dtype=torch.int32, device=DEVICE), 1.0, "cosine", out=out)
    assert all(g is o for g, o in zip(got, out))
    assert (got[0] == -1).all() and got[1].isinf().all() and (got[2] == -1).all()


def test_out_buffers_key_norms_and_strided_queries():
    queries, keys, owners, threshold, valid, _ = routing_case(20, 50, 33, "l2", torch.float32)
    queries, keys, owners, valid = (t.to(DEVICE) for t in (queries, keys, owners, valid))
    want = nearest_key(queries, keys, owners, threshold, "l2", valid)
    out = (torch.empty(20, dtype=torch.int32, device=DEVICE), torch.empty(20, device=DEVICE),
           torch.empty(20, dtype=torch.int64, device=DEVICE))
    strided = queries.T.contiguous().T  # [S, d] with strides (1, S)
    got = nearest_key(strided, keys, owners, threshold, "l2", valid,
                      key_norms=keys.square().sum(1), out=out)
    assert all(g is o for g, o in zip(got, out))
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert torch.equal(got[1], want[1])  # the winner's distance is recomputed the same way


@pytest.mark.parametrize("num_queries", [1, 6, 20], ids=["S1", "S6", "S20-dot"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_precomputed_key_norms_route_as_the_reference(metric, num_queries):
    """The router passes squared key norms on every path (the broadcast cosine path then skips
    its in-loop key reduction): routing and distances stay the reference's."""
    queries, keys, owners, threshold, valid, _ = routing_case(num_queries, 300, 96, metric,
                                                              torch.float32)
    want = nearest_key_ref(queries, keys, owners, threshold, metric, valid)
    args = [t.to(DEVICE) if t is not None else None for t in (queries, keys, owners, valid)]
    got = nearest_key(*args[:3], threshold, metric, args[3], key_norms=args[1].square().sum(1))
    assert_same_routing(got, want, torch.float32)


def test_bad_arguments_are_refused():
    q, k, owners = torch.randn(2, 8), torch.randn(3, 8), torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match="metric"):
        nearest_key(q, k, owners, 1.0, "dot")
    with pytest.raises(ValueError, match="same d"):
        nearest_key(q, torch.randn(3, 9), owners, 1.0, "l2")
    with pytest.raises(AssertionError):
        nearest_key(q, k.half(), owners, 1.0, "l2")  # keys must be fp32
    with pytest.raises(ValueError, match=r"fp32 \[N=3\]"):
        nearest_key(q, k, owners, torch.ones(4), "l2")  # one threshold per key


def test_module_imports_and_refers_without_triton():
    code = ("import sys; sys.modules['triton'] = None; import torch, nearest_key as nk\n"
            "e, d, i = nk.nearest_key_ref(torch.eye(2), torch.eye(2), torch.arange(2), 0.5, 'l2')\n"
            "assert e.tolist() == [0, 1]\n"
            "try:\n    nk.nearest_key(torch.eye(2), torch.eye(2), torch.arange(2), 0.5, 'l2')\n"
            "except RuntimeError as err:\n    assert 'needs triton' in str(err)\n"
            "else:\n    raise SystemExit('no error')\n")
    kernels_dir = Path(nk.__file__).parent
    subprocess.run([sys.executable, "-c", code], cwd=kernels_dir, check=True, timeout=120)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["ieee", "tf32x3"])
@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("num_queries", [1, 8, 64, 256], ids=lambda s: f"S{s}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_large_matches_reference_on_gpu(dtype, num_queries, metric, precision):
    queries, keys, owners, threshold, valid, _ = routing_case(num_queries, 100_000, 576, metric,
                                                              dtype)
    keys[99_000] = keys[7]  # a tie across splits
    queries[0] = keys[7].to(dtype)
    want = nearest_key_ref(queries.cuda(), keys.cuda(), owners.cuda(), threshold, metric,
                           None if valid is None else valid.cuda())
    want = tuple(t.cpu() for t in want)
    got = nearest_key(queries.cuda(), keys.cuda(), owners.cuda(), threshold, metric,
                      None if valid is None else valid.cuda(), input_precision=precision)
    assert_same_routing(got, want, dtype)
    assert got[2][0] == 7


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("num_queries", [1, 64], ids=lambda s: f"S{s}")
def test_cuda_graph_replay_is_bit_identical(num_queries):
    queries, keys, owners, threshold, valid, _ = routing_case(num_queries, 5000, 576, "cosine",
                                                              torch.float16)
    queries, keys, owners = queries.cuda(), keys.cuda(), owners.cuda()
    valid = None if valid is None else valid.cuda()
    eager = nearest_key(queries, keys, owners, threshold, "cosine", valid)  # compiles
    out = tuple(torch.empty_like(t) for t in eager)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        nearest_key(queries, keys, owners, threshold, "cosine", valid, out=out)
    graph.replay()
    torch.cuda.synchronize()
    assert all(torch.equal(g, e) for g, e in zip(out, eager))
