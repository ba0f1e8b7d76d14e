"""Batched nearest-key routing (SoLA, arXiv 2603.11239, Eq. 3): pure-torch fp32 reference.

Each query (the hidden state of a request's key token) is matched against every stored key;
the request routes to the owner of its nearest key when that distance is below the threshold.
"""

from __future__ import annotations

import torch

METRICS = ("l2", "cosine")
_COS_EPS = 1e-12


def pairwise_distance_ref(queries: torch.Tensor, keys: torch.Tensor, metric: str) -> torch.Tensor:
    """Semantics: dist[s, n] = ||q[s] - k[n]||_2            (metric "l2")
                  dist[s, n] = 1 - <q[s], k[n]> / (|q[s]| |k[n]|)   (metric "cosine")
    queries: [S, d]  keys: [N, d]  -> fp32 [S, N]. Computed by explicit differences, not the
    |q|^2 + |k|^2 - 2qk expansion, so a query equal to a key gives exactly 0.
    """
    q, k = queries.float(), keys.float()
    if metric == "l2":
        return torch.cdist(q, k, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    if metric == "cosine":
        qn = q / q.norm(dim=-1, keepdim=True).clamp_min(_COS_EPS)
        kn = k / k.norm(dim=-1, keepdim=True).clamp_min(_COS_EPS)
        return (1.0 - qn @ kn.T).clamp_min(0.0)
    raise ValueError(f"metric {metric!r} is not one of {METRICS}")


def nearest_key_ref(
    queries: torch.Tensor,
    keys: torch.Tensor,
    owners: torch.Tensor,
    threshold: float,
    metric: str = "cosine",
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Semantics: n*[s] = argmin_n dist(q[s], k[n])   (ties -> the lowest key index n)
                  edit[s] = owners[n*[s]] if valid[s] and dist(q[s], k[n*[s]]) < threshold
                            else -1
    queries: [S, d]  keys: [N, d]  owners: int [N]  valid: bool [S] (None = all valid)
    -> (edit int32 [S], dist fp32 [S] (inf where skipped or N == 0), key index int64 [S] or -1)
    """
    num_queries = queries.shape[0]
    edit = torch.full((num_queries,), -1, dtype=torch.int32)
    best = torch.full((num_queries,), float("inf"), dtype=torch.float32)
    index = torch.full((num_queries,), -1, dtype=torch.int64)
    if keys.shape[0] == 0 or num_queries == 0:
        return edit, best, index
    if keys.ndim != 2 or queries.ndim != 2 or keys.shape[1] != queries.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} "
                         "must be [S, d] and [N, d] with the same d")
    if owners.shape != (keys.shape[0],):
        raise ValueError(f"owners {tuple(owners.shape)} must be [N={keys.shape[0]}]")
    dist = pairwise_distance_ref(queries, keys, metric)  # [S, N]
    best, index = dist.min(dim=1)  # torch.min returns the first minimum: lowest index wins
    hit = best < threshold
    if valid is not None:
        hit &= valid.bool()
        best = torch.where(valid.bool(), best, torch.full_like(best, float("inf")))
        index = torch.where(valid.bool(), index, torch.full_like(index, -1))
    edit = torch.where(hit, owners.to(torch.int32)[index.clamp_min(0)], edit)
    return edit, best, index
