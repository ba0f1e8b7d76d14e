"""nearest_key_ref against a plain per-query loop, plus its tie-break and threshold rules."""

import math

import pytest
import torch

from sola_vllm.kernels.nearest_key import nearest_key_ref, pairwise_distance_ref


def loop_reference(queries, keys, owners, threshold, metric):
    edits, dists = [], []
    for q in queries.double():
        best, best_n = math.inf, -1
        for n, k in enumerate(keys.double()):
            if metric == "l2":
                d = float((q - k).norm())
            else:
                d = 1.0 - float(q @ k / (q.norm() * k.norm()))
            if d < best:  # strict: the first (lowest index) minimum wins
                best, best_n = d, n
        edits.append(int(owners[best_n]) if best < threshold else -1)
        dists.append(best)
    return edits, dists


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("num_queries, num_keys, dim", [(1, 1, 3), (7, 13, 60), (33, 5, 577)],
                         ids=lambda v: str(v))
def test_matches_loop(metric, num_queries, num_keys, dim):
    keys = torch.randn(num_keys, dim) * 3
    owners = torch.randint(0, 4, (num_keys,), dtype=torch.int32)
    # half the queries sit near a key (hits), half are random (misses)
    near = keys[torch.randint(0, num_keys, (num_queries,))] + 1e-3 * torch.randn(num_queries, dim)
    far = torch.randn(num_queries, dim) * 3
    queries = torch.where((torch.arange(num_queries) % 2 == 0)[:, None], near, far)
    threshold = 0.05 if metric == "l2" else 1e-4
    edit, dist, _ = nearest_key_ref(queries, keys, owners, threshold, metric)
    want_edit, want_dist = loop_reference(queries, keys, owners, threshold, metric)
    assert edit.tolist() == want_edit
    want = torch.tensor(want_dist, dtype=torch.float64)
    torch.testing.assert_close(dist.double(), want, atol=1e-5, rtol=1e-5)


def test_identical_query_has_distance_exactly_zero():
    keys = torch.randn(4, 576) * 10
    edit, dist, index = nearest_key_ref(keys[2:3].clone(), keys, torch.arange(4), 1e-9, "l2")
    assert dist.item() == 0.0 and index.item() == 2 and edit.item() == 2


def test_tie_goes_to_the_lowest_key_index():
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    owners = torch.tensor([10, 20, 30])
    edit, _, index = nearest_key_ref(torch.tensor([[0.0, 1.0]]), keys, owners, 0.5, "l2")
    assert index.item() == 1 and edit.item() == 20


def test_threshold_is_strict_and_invalid_rows_are_skipped():
    keys = torch.tensor([[0.0, 0.0]])
    queries = torch.tensor([[1.0, 0.0], [0.5, 0.0], [0.0, 0.0]])
    edit, dist, _ = nearest_key_ref(queries, keys, torch.tensor([3]), 1.0, "l2")
    assert edit.tolist() == [-1, 3, 3]  # distance 1.0 is not < 1.0
    edit, dist, index = nearest_key_ref(queries, keys, torch.tensor([3]), 1.0, "l2",
                                        valid=torch.tensor([True, False, True]))
    assert edit.tolist() == [-1, -1, 3] and math.isinf(dist[1]) and index[1] == -1


def test_no_keys_routes_nothing():
    edit, dist, index = nearest_key_ref(torch.randn(3, 8), torch.zeros(0, 8),
                                        torch.zeros(0, dtype=torch.int32), 1.0, "cosine")
    assert edit.tolist() == [-1, -1, -1] and torch.isinf(dist).all()


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="same d"):
        nearest_key_ref(torch.randn(2, 8), torch.randn(3, 9), torch.zeros(3), 1.0, "l2")
    with pytest.raises(ValueError, match="metric"):
        nearest_key_ref(torch.randn(2, 8), torch.randn(3, 8), torch.zeros(3), 1.0, "dot")


def test_precomputed_unit_keys_give_bit_identical_results():
    from sola_vllm.kernels.nearest_key import unit_rows

    gen = torch.Generator().manual_seed(3)
    keys, queries = torch.randn(257, 61, generator=gen), torch.randn(9, 61, generator=gen)
    queries[4] = keys[100]  # the same vector: its own key wins either way
    owners = torch.arange(257, dtype=torch.int32)
    fresh = nearest_key_ref(queries, keys, owners, 0.5, "cosine")
    cached = nearest_key_ref(queries, keys, owners, 0.5, "cosine", key_units=unit_rows(keys))
    for a, b in zip(fresh, cached, strict=True):
        assert torch.equal(a, b)
    assert fresh[0][4] == 100 and fresh[1][4] < 1e-6


def test_per_key_thresholds_test_the_winning_keys_own():
    """Two keys, the query at distance 0.5 of key 0 and 1.5 of key 1: key 0 wins, and the
    route depends on key 0's threshold only (key 1's, however large, does not matter)."""
    keys = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    query = torch.tensor([[0.5, 0.0]])
    owners = torch.tensor([7, 8])
    routed = nearest_key_ref(query, keys, owners, torch.tensor([0.6, 0.1]), "l2")
    blocked = nearest_key_ref(query, keys, owners, torch.tensor([0.5, 10.0]), "l2")
    assert routed[0].tolist() == [7] and blocked[0].tolist() == [-1]  # strict: 0.5 !< 0.5
    assert blocked[2].tolist() == [0] and blocked[1].tolist() == [0.5]


@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_per_key_thresholds_match_a_loop(metric):
    torch.manual_seed(0)
    queries, keys = torch.randn(9, 6), torch.randn(13, 6)
    owners = torch.arange(13) % 4
    dist = pairwise_distance_ref(queries, keys, metric)
    best, index = dist.min(dim=1)
    key_thr = torch.full((13,), float(best.median()))  # about half the queries hit...
    key_thr[::2] *= 1.5  # ...more where their nearest key is an even one
    edit, _, _ = nearest_key_ref(queries, keys, owners, key_thr, metric)
    want = [int(owners[i]) if b < key_thr[i] else -1 for b, i in zip(best, index)]
    assert edit.tolist() == want and -1 in want and any(w >= 0 for w in want)


def test_per_key_thresholds_must_be_one_fp32_per_key():
    q, k, owners = torch.randn(2, 4), torch.randn(3, 4), torch.zeros(3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"fp32 \[N=3\]"):
        nearest_key_ref(q, k, owners, torch.ones(2), "l2")
    with pytest.raises(ValueError, match=r"fp32 \[N=3\]"):
        nearest_key_ref(q, k, owners, torch.ones(3, dtype=torch.float64), "l2")
