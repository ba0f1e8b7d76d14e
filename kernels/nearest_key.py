"""Batched nearest-key routing (SoLA, arXiv 2603.11239, Eq. 3): Triton kernel, fp32 torch reference.

Each query (the hidden state of a request's key token) is matched against every stored key;
the request routes to the owner of its nearest key when that distance is below the threshold.
Kernel: the floor is reading every key once, so a grid (query block, key split) has each
program stream its key range once for a block of query rows, keeping a running min/argmin per
row; a second kernel takes the first minimum over the splits, recomputes the winner's distance
by explicit differences and applies threshold, valid and owners. Tie-break, lowest key index:
first minimum inside a tile, strict `<` across tiles, splits merged in key order.
Imports only torch; triton is optional (without it `nearest_key` raises, the rest works).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # annotations stay strings (PEP 563), so the kernels below still define
    triton = tl = None

__all__ = ["nearest_key", "nearest_key_ref", "nearest_key_torch_cdist", "nearest_key_torch_mm",
           "pairwise_distance_ref"]

METRICS = ("l2", "cosine")
_COS_EPS = 1e-12
_PRECISIONS = ("ieee", "tf32x3", "tf32")


def _jit(fn):
    return fn if triton is None else triton.jit(fn)


@_jit
def _tile_distance(q_rows, mask_s, k_rows, mask_n, kn_ptr, offs_n, D, stride_qd, stride_kd,
                   IS_L2: tl.constexpr, HAS_KN: tl.constexpr, USE_DOT: tl.constexpr,
                   PRECISION: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr):
    # acc: <q, k> (dot path, cosine) or sum (q - k)^2 (explicit l2)   [BLOCK_S, BLOCK_N]
    acc = tl.zeros([BLOCK_S, BLOCK_N], dtype=tl.float32)
    q_sq = tl.zeros([BLOCK_S], dtype=tl.float32)
    k_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=mask_s[:, None] & mask_d[None, :],
                    other=0.0).to(tl.float32)  # [BLOCK_S, BLOCK_D]
        k = tl.load(k_rows + offs_d[None, :] * stride_kd, mask=mask_n[:, None] & mask_d[None, :],
                    other=0.0)  # [BLOCK_N, BLOCK_D]
        if USE_DOT:
            acc = tl.dot(q, tl.trans(k), acc, input_precision=PRECISION)
        elif IS_L2:
            diff = q[:, None, :] - k[None, :, :]
            acc += tl.sum(diff * diff, axis=2)
        else:
            acc += tl.sum(q[:, None, :] * k[None, :, :], axis=2)
        if USE_DOT or not IS_L2:  # norms are needed: key norms come free with the key read
            q_sq += tl.sum(q * q, axis=1)
            if not HAS_KN:
                k_sq += tl.sum(k * k, axis=1)
    if HAS_KN:
        k_sq = tl.load(kn_ptr + offs_n, mask=mask_n, other=0.0)
    if IS_L2:  # ranked by the squared distance: sqrt is monotone, the combine takes it
        if USE_DOT:
            acc = tl.maximum(q_sq[:, None] + k_sq[None, :] - 2.0 * acc, 0.0)
        dist = acc
    else:
        q_norm = tl.maximum(tl.sqrt(q_sq), 1e-12)
        k_norm = tl.maximum(tl.sqrt(k_sq), 1e-12)
        dist = tl.maximum(1.0 - acc / (q_norm[:, None] * k_norm[None, :]), 0.0)
    return dist


@_jit
def _nearest_key_partial_kernel(
        q_ptr, k_ptr, kn_ptr, part_dist_ptr, part_idx_ptr, S, N, D, keys_per_split, num_splits,
        stride_qs, stride_qd, stride_kn, stride_kd, IS_L2: tl.constexpr, HAS_KN: tl.constexpr,
        USE_DOT: tl.constexpr, PRECISION: tl.constexpr, BLOCK_S: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program (s-block, split): min and first argmin over keys [split * keys_per_split, ...);
    the min is of the ranking value (squared distance for l2, 1 - cos for cosine)."""
    pid_s, pid_split = tl.program_id(0), tl.program_id(1)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < S
    q_rows = q_ptr + offs_s.to(tl.int64)[:, None] * stride_qs  # [BLOCK_S, 1]
    n_start = pid_split * keys_per_split
    n_end = tl.minimum(n_start + keys_per_split, N)
    best = tl.full([BLOCK_S], float("inf"), dtype=tl.float32)
    best_idx = tl.zeros([BLOCK_S], dtype=tl.int32) + n_start
    for n0 in range(n_start, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        k_rows = k_ptr + offs_n.to(tl.int64)[:, None] * stride_kn  # [BLOCK_N, 1]
        dist = _tile_distance(q_rows, mask_s, k_rows, mask_n, kn_ptr, offs_n, D, stride_qd,
                              stride_kd, IS_L2, HAS_KN, USE_DOT, PRECISION, BLOCK_S, BLOCK_N,
                              BLOCK_D)
        dist = tl.where(mask_n[None, :], dist, float("inf"))
        tile_best, tile_arg = tl.min(dist, axis=1, return_indices=True,
                                     return_indices_tie_break_left=True)
        better = tile_best < best  # strict: an earlier tile keeps a tie
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_arg + n0, best_idx)
    out = offs_s * num_splits + pid_split
    tl.store(part_dist_ptr + out, best, mask=mask_s)
    tl.store(part_idx_ptr + out, best_idx, mask=mask_s)


@_jit
def _nearest_key_combine_kernel(
        q_ptr, k_ptr, owners_ptr, valid_ptr, key_thr_ptr, part_dist_ptr, part_idx_ptr, edit_ptr,
        dist_ptr, index_ptr, threshold, D, num_splits, stride_qs, stride_qd, stride_kn, stride_kd,
        IS_L2: tl.constexpr, HAS_VALID: tl.constexpr, PER_KEY_THR: tl.constexpr,
        BLOCK_SPLIT: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program s: first minimum over the splits (they are in key order), then the winner's
    distance again by explicit differences, like the reference; threshold (the winner's own
    with PER_KEY_THR), valid, owners."""
    s = tl.program_id(0)
    offs = tl.arange(0, BLOCK_SPLIT)
    part = tl.load(part_dist_ptr + s * num_splits + offs, mask=offs < num_splits,
                   other=float("inf"))
    _, j = tl.min(part, axis=0, return_indices=True, return_indices_tie_break_left=True)
    n = tl.load(part_idx_ptr + s * num_splits + j)
    q_row = q_ptr + s.to(tl.int64) * stride_qs
    k_row = k_ptr + n.to(tl.int64) * stride_kn
    qk = tl.zeros([BLOCK_D], dtype=tl.float32)  # l2: sum (q - k)^2
    qq = tl.zeros([BLOCK_D], dtype=tl.float32)
    kk = tl.zeros([BLOCK_D], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        q = tl.load(q_row + offs_d * stride_qd, mask=offs_d < D, other=0.0).to(tl.float32)
        k = tl.load(k_row + offs_d * stride_kd, mask=offs_d < D, other=0.0)
        if IS_L2:
            qk += (q - k) * (q - k)
        else:
            qk += q * k
            qq += q * q
            kk += k * k
    if IS_L2:  # IEEE sqrt and division (tl.sqrt and / are approximate on GPUs)
        dist = tl.sqrt_rn(tl.sum(qk, axis=0))
    else:
        q_norm = tl.maximum(tl.sqrt_rn(tl.sum(qq, axis=0)), 1e-12)
        k_norm = tl.maximum(tl.sqrt_rn(tl.sum(kk, axis=0)), 1e-12)
        dist = tl.maximum(1.0 - tl.div_rn(tl.sum(qk, axis=0), q_norm * k_norm), 0.0)
    if PER_KEY_THR:  # noqa: SIM108 (a constexpr branch, resolved at compile time)
        hit = dist < tl.load(key_thr_ptr + n)
    else:
        hit = dist < threshold
    index = n.to(tl.int64)
    if HAS_VALID:
        ok = tl.load(valid_ptr + s) != 0
        hit = hit & ok
        dist = tl.where(ok, dist, float("inf"))
        index = tl.where(ok, index, -1)
    owner = tl.load(owners_ptr + n).to(tl.int32)
    tl.store(edit_ptr + s, tl.where(hit, owner, -1))
    tl.store(dist_ptr + s, dist)
    tl.store(index_ptr + s, index)


class Launch(NamedTuple):
    """How `nearest_key` launches its partial kernel for one (S, N, d)."""
    use_dot: bool
    block_s: int
    block_n: int
    block_d: int
    keys_per_split: int
    num_splits: int
    num_warps: int
    num_stages: int


@functools.lru_cache
def _programs(device: torch.device, per_sm: int) -> int:
    """Target number of programs in the grid: `per_sm` per multiprocessor on CUDA."""
    if device.type != "cuda":
        return 4  # the interpreter: few programs, yet several splits to exercise the merge
    return per_sm * torch.cuda.get_device_properties(device).multi_processor_count


def _tiles(num_queries: int, dim: int) -> dict:
    """Tiles, warps, stages and programs per SM, from the sweep of
    benchmarks/routing_kernel_tune.py on an H100 (results/routing_kernel_tune.json) where it
    measured. tl.dot needs tiles of 16: from 3 queries on, padding the query tile costs less
    than the 3D broadcast path's registers; 1 or 2 queries take the broadcast path."""
    pow2 = triton.next_power_of_2
    if num_queries >= 64:  # measured at S = 64: 1.16x over 64x64x64 tiles at 4 programs/SM
        return dict(use_dot=True, block_s=64, block_n=128, block_d=max(16, min(32, pow2(dim))),
                    num_warps=4, num_stages=3, programs_per_sm=2)
    if num_queries >= 3:  # measured at S = 4 and 8: the broadcast path took 3x and 5.7x longer
        return dict(use_dot=True, block_s=max(16, pow2(num_queries)), block_n=64,
                    block_d=max(16, min(64, pow2(dim))), num_warps=4, num_stages=3,
                    programs_per_sm=4)
    block_s = pow2(num_queries)
    if dim >= 1024:  # measured at d = 4096: 72 % of HBM bandwidth (60 before)
        return dict(use_dot=False, block_s=block_s, block_n=32, block_d=256, num_warps=4,
                    num_stages=2, programs_per_sm=8)
    # measured at d = 576 and 64: 1.16x over 64x128 tiles at 4 programs/SM
    return dict(use_dot=False, block_s=block_s, block_n=64, block_d=min(64, pow2(dim)),
                num_warps=4, num_stages=1, programs_per_sm=16)


def _launch_config(num_queries: int, num_keys: int, dim: int, device: torch.device,
                   **override) -> Launch:
    """The partial kernel's tiles and grid (`_tiles`), each program streaming one key range
    once. `override` (block_s, block_n, block_d, num_warps, num_stages, programs_per_sm) is for
    benchmarks/routing_kernel_tune.py."""
    tiles = {**_tiles(num_queries, dim), **override}
    s_blocks = triton.cdiv(num_queries, tiles["block_s"])
    key_tiles = triton.cdiv(num_keys, tiles["block_n"])
    splits = max(1, min(key_tiles, _programs(device, tiles["programs_per_sm"]) // s_blocks))
    keys_per_split = triton.cdiv(key_tiles, splits) * tiles["block_n"]
    return Launch(tiles["use_dot"], tiles["block_s"], tiles["block_n"], tiles["block_d"],
                  keys_per_split, triton.cdiv(num_keys, keys_per_split), tiles["num_warps"],
                  tiles["num_stages"])


def _check_inputs(queries, keys, owners, metric):
    if metric not in METRICS:
        raise ValueError(f"metric {metric!r} is not one of {METRICS}")
    if keys.ndim != 2 or queries.ndim != 2 or keys.shape[1] != queries.shape[1]:
        raise ValueError(f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)} "
                         "must be [S, d] and [N, d] with the same d")
    if owners.shape != (keys.shape[0],):
        raise ValueError(f"owners {tuple(owners.shape)} must be [N={keys.shape[0]}]")


def _key_thresholds(threshold, num_keys: int, device: torch.device) -> torch.Tensor | None:
    """`threshold` as per-key thresholds (fp32 [N] on the keys' device), or None if a number."""
    if not isinstance(threshold, torch.Tensor):
        return None
    if threshold.dtype != torch.float32 or threshold.shape != (num_keys,):
        raise ValueError(f"per-key thresholds must be fp32 [N={num_keys}], got "
                         f"{threshold.dtype} {tuple(threshold.shape)}")
    if threshold.device != device:
        raise ValueError(f"per-key thresholds are on {threshold.device}, keys on {device}")
    return threshold


def _check_launch(queries, keys, owners, valid, key_norms, out, input_precision):
    """Dtype, shape and device asserts of `nearest_key`; returns its (edit, dist, index)."""
    num_queries, dev = queries.shape[0], queries.device
    assert queries.dtype in (torch.float32, torch.float16, torch.bfloat16), queries.dtype
    assert keys.dtype == torch.float32, keys.dtype
    assert owners.dtype in (torch.int32, torch.int64), owners.dtype
    assert valid is None or (valid.dtype == torch.bool and valid.shape == (num_queries,))
    assert key_norms is None or (key_norms.dtype == torch.float32 and key_norms.is_contiguous()
                                 and key_norms.shape == (keys.shape[0],))
    assert input_precision in _PRECISIONS, input_precision
    for t in (keys, owners, valid, key_norms):
        assert t is None or t.device == dev, f"all tensors must be on {dev}"
    if dev.type != "cuda" and type(_nearest_key_partial_kernel).__name__ != "InterpretedFunction":
        raise RuntimeError("nearest_key needs a CUDA device (or TRITON_INTERPRET=1 set before "
                           "triton is imported)")
    if out is None:
        return (torch.empty(num_queries, dtype=torch.int32, device=dev),
                torch.empty(num_queries, dtype=torch.float32, device=dev),
                torch.empty(num_queries, dtype=torch.int64, device=dev))
    assert [t.dtype for t in out] == [torch.int32, torch.float32, torch.int64]
    assert all(t.shape == (num_queries,) and t.is_contiguous() and t.device == dev for t in out)
    return out


def nearest_key(queries, keys, owners, threshold, metric="cosine", valid=None, key_norms=None,
                *, out=None, input_precision="ieee", launch_override=None):
    """Triton version of `nearest_key_ref`, same semantics and outputs:
    Semantics: n*[s] = argmin_n dist(q[s], k[n])   (ties -> the lowest key index n)
               edit[s] = owners[n*[s]] if valid[s] and dist(q[s], k[n*[s]]) < threshold else -1
               (with per-key thresholds: < threshold[n*[s]], the winner's own)
    queries: fp32/fp16/bf16 [S, d]  keys: fp32 [N, d]  owners: int32/int64 [N]  valid: bool [S]
    threshold: a number, or fp32 [N] on the keys' device (one per key)
    key_norms: fp32 [N] = keys.square().sum(1) or None (then computed in-kernel: one more
    reduction per key tile, which costs the cosine path bandwidth; the router passes them)
    out: optional preallocated (edit int32 [S], dist fp32 [S], index int64 [S]), written in place
    -> (edit, dist, index); dist inf and index -1 where skipped; all -1 (dist inf) when N == 0.
    Numerics: fp32 accumulation. With >= 3 queries keys are ranked by tl.dot: l2 through
    |q|^2 + |k|^2 - 2 q.k, clamped at 0 (`input_precision`: "ieee" full fp32, "tf32x3" ~fp32 on
    tensor cores, "tf32" ~1e-3); with fewer, by explicit differences. Either way the returned
    distance, and so the threshold test, is the winner's recomputed by explicit differences
    like the reference: a query equal to a key gets exactly 0. Keys whose distances differ by
    less than the ranking's rounding may be ordered unlike the reference: a few ulp, or for the
    l2 expansion ~1e-7 * (|q|^2 + |k|^2) / dist; exact ties (duplicate keys) go to the lowest
    index on every path. Rows with valid False are computed, then masked.
    Graph-safe: no host sync; a number `threshold` is baked into a captured graph, per-key
    thresholds are read from their tensor at replay.
    launch_override: tiles and grid (see `_launch_config`), for benchmarks/routing_kernel_tune.py.
    """
    if triton is None:
        raise RuntimeError("nearest_key needs triton; use nearest_key_ref or nearest_key_torch_mm")
    _check_inputs(queries, keys, owners, metric)
    key_thr = _key_thresholds(threshold, keys.shape[0], keys.device)
    edit, dist, index = _check_launch(queries, keys, owners, valid, key_norms, out,
                                      input_precision)
    (num_queries, dim), num_keys = queries.shape, keys.shape[0]
    if num_keys == 0 or num_queries == 0:
        return edit.fill_(-1), dist.fill_(float("inf")), index.fill_(-1)
    cfg = _launch_config(num_queries, num_keys, dim, queries.device, **(launch_override or {}))
    splits = cfg.num_splits
    part_dist = queries.new_empty(num_queries, splits, dtype=torch.float32)  # scratch
    part_idx = queries.new_empty(num_queries, splits, dtype=torch.int32)
    is_l2 = metric == "l2"
    _nearest_key_partial_kernel[(triton.cdiv(num_queries, cfg.block_s), splits)](
        queries, keys, keys if key_norms is None else key_norms, part_dist, part_idx,
        num_queries, num_keys, dim, cfg.keys_per_split, splits, *queries.stride(),
        *keys.stride(), IS_L2=is_l2,
        HAS_KN=key_norms is not None and (cfg.use_dot or not is_l2),
        USE_DOT=cfg.use_dot, PRECISION=input_precision, BLOCK_S=cfg.block_s,
        BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    _nearest_key_combine_kernel[(num_queries,)](
        queries, keys, owners, owners if valid is None else valid,
        keys if key_thr is None else key_thr, part_dist, part_idx, edit, dist, index,
        0.0 if key_thr is not None else float(threshold), dim, splits, *queries.stride(),
        *keys.stride(), IS_L2=is_l2, HAS_VALID=valid is not None,
        PER_KEY_THR=key_thr is not None, BLOCK_SPLIT=triton.next_power_of_2(splits),
        BLOCK_D=min(1024, triton.next_power_of_2(dim)))
    return edit, dist, index


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """Each row of x (fp32) divided by its norm (floored at 1e-12): what the cosine reference
    compares. A caller may keep `unit_rows(keys)` and pass it as `key_units` below."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(_COS_EPS)


def pairwise_distance_ref(queries: torch.Tensor, keys: torch.Tensor, metric: str,
                          key_units: torch.Tensor | None = None) -> torch.Tensor:
    """Semantics: dist[s, n] = ||q[s] - k[n]||_2            (metric "l2")
                  dist[s, n] = 1 - <q[s], k[n]> / (|q[s]| |k[n]|)   (metric "cosine")
    queries: [S, d]  keys: [N, d]  -> fp32 [S, N]. Computed by explicit differences, not the
    |q|^2 + |k|^2 - 2qk expansion, so a query equal to a key gives exactly 0.
    key_units: `unit_rows(keys)`, computed once by a caller that routes against the same keys
    many times (cosine only; the result is bit-identical to computing it here).
    """
    q, k = queries.float(), keys.float()
    if metric == "l2":
        return torch.cdist(q, k, p=2.0, compute_mode="donot_use_mm_for_euclid_dist")
    if metric == "cosine":
        kn = unit_rows(k) if key_units is None else key_units
        return (1.0 - unit_rows(q) @ kn.T).clamp_min(0.0)
    raise ValueError(f"metric {metric!r} is not one of {METRICS}")


def _finish(best, index, owners, threshold, valid):
    """Threshold (a number, or the winner's own of per-key thresholds), valid mask and owner
    lookup shared by the torch versions."""
    key_thr = _key_thresholds(threshold, owners.shape[0], owners.device)
    hit = best < (threshold if key_thr is None else key_thr[index.clamp_min(0)])
    if valid is not None:
        hit &= valid.bool()
        best = torch.where(valid.bool(), best, torch.full_like(best, float("inf")))
        index = torch.where(valid.bool(), index, torch.full_like(index, -1))
    edit = torch.where(hit, owners.to(torch.int32)[index.clamp_min(0)], -1).to(torch.int32)
    return edit, best, index


def _empty_result(queries):
    num_queries, dev = queries.shape[0], queries.device
    return (torch.full((num_queries,), -1, dtype=torch.int32, device=dev),
            torch.full((num_queries,), float("inf"), dtype=torch.float32, device=dev),
            torch.full((num_queries,), -1, dtype=torch.int64, device=dev))


def nearest_key_ref(
    queries: torch.Tensor,
    keys: torch.Tensor,
    owners: torch.Tensor,
    threshold: float,
    metric: str = "cosine",
    valid: torch.Tensor | None = None,
    key_units: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Semantics: n*[s] = argmin_n dist(q[s], k[n])   (ties -> the lowest key index n)
                  edit[s] = owners[n*[s]] if valid[s] and dist(q[s], k[n*[s]]) < threshold
                            else -1
                  (per-key thresholds: < threshold[n*[s]], the winning key's own)
    queries: [S, d]  keys: [N, d]  owners: int [N]  valid: bool [S] (None = all valid)
    threshold: a number, or fp32 [N] on the keys' device (one per key)
    key_units: `unit_rows(keys)` [N, d], precomputed (cosine only; see pairwise_distance_ref)
    -> (edit int32 [S], dist fp32 [S] (inf where skipped or N == 0), key index int64 [S] or -1)
    """
    if keys.shape[0] == 0 or queries.shape[0] == 0:
        return _empty_result(queries)
    _check_inputs(queries, keys, owners, metric)
    dist = pairwise_distance_ref(queries, keys, metric, key_units)  # [S, N]
    best, index = dist.min(dim=1)  # torch.min returns the first minimum: lowest index wins
    return _finish(best, index, owners, threshold, valid)


def _winner_distance(queries, keys, index, metric):
    """Distance of each query to its chosen key, by explicit differences like the reference."""
    q, k = queries.float(), keys.float()[index]  # [S, d] each
    if metric == "l2":
        return (q - k).norm(dim=1)
    qn = q / q.norm(dim=1, keepdim=True).clamp_min(_COS_EPS)
    kn = k / k.norm(dim=1, keepdim=True).clamp_min(_COS_EPS)
    return (1.0 - (qn * kn).sum(dim=1)).clamp_min(0.0)


def nearest_key_torch_mm(queries, keys, owners, threshold, metric="cosine", valid=None,
                         key_norms=None):
    """`nearest_key` in torch: rank by one matmul (|q|^2 + |k|^2 - 2 q.k for l2, unsquared not
    needed to rank) + min, then the winner's distance by explicit differences."""
    _check_inputs(queries, keys, owners, metric)
    if keys.shape[0] == 0 or queries.shape[0] == 0:
        return _empty_result(queries)
    q = queries.float()
    qk = q @ keys.float().T  # [S, N]
    k_sq = keys.float().square().sum(1) if key_norms is None else key_norms  # [N]
    if metric == "l2":
        rank = q.square().sum(1, keepdim=True) + k_sq - 2.0 * qk
    else:
        q_norm = q.norm(dim=1, keepdim=True).clamp_min(_COS_EPS)
        rank = 1.0 - qk / (q_norm * k_sq.sqrt().clamp_min(_COS_EPS))
    index = rank.min(dim=1).indices
    return _finish(_winner_distance(queries, keys, index, metric), index, owners, threshold, valid)


def nearest_key_torch_cdist(queries, keys, owners, threshold, metric="cosine", valid=None):
    """`nearest_key` in torch: rank by torch.cdist (default compute mode; cosine via the chord
    distance of unit vectors, 2 - 2 cos) + min, then the winner's distance exactly."""
    _check_inputs(queries, keys, owners, metric)
    if keys.shape[0] == 0 or queries.shape[0] == 0:
        return _empty_result(queries)
    q, k = queries.float(), keys.float()
    if metric == "cosine":
        q = q / q.norm(dim=1, keepdim=True).clamp_min(_COS_EPS)
        k = k / k.norm(dim=1, keepdim=True).clamp_min(_COS_EPS)
    index = torch.cdist(q, k).min(dim=1).indices
    return _finish(_winner_distance(queries, keys, index, metric), index, owners, threshold, valid)
