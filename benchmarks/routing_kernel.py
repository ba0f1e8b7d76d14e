"""Nearest-key routing: the Triton kernel against torch (cdist + min, matmul + min, the reference).

The floor is reading every key once (N * d * 4 bytes of fp32 keys); on CUDA each provider's
latency (CUDA events, median of the repeats) is turned into achieved bytes/s of that floor and
a fraction of the device's peak memory bandwidth. On CPU only the torch providers run, on a
reduced sweep: Triton needs a GPU, and interpreter timings say nothing. Needs only torch (and
triton for the kernel): the kernel file is imported by path, not through sola_vllm. Writes JSON.

    python benchmarks/routing_kernel.py --out benchmarks/results/routing_kernel.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "kernels"))
import nearest_key as nk  # noqa: E402
from cuda_timing import event_ms, peak_gbps, save_report  # noqa: E402

THRESHOLD = {"l2": 0.5, "cosine": 1e-3}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


TAKES_KEY_NORMS = ("triton", "triton_tf32x3", "torch_mm")


def providers(device: str) -> dict:
    """name -> fn(queries, keys, owners, threshold, metric, **kw); those in TAKES_KEY_NORMS get
    the squared key norms, computed once outside the timing (the router keeps them per change
    of its keys: route_kernel.prepare_keys). The router ranks in "tf32x3"."""
    torch_ones = {"torch_cdist": nk.nearest_key_torch_cdist, "torch_mm": nk.nearest_key_torch_mm,
                  "torch_ref": nk.nearest_key_ref}
    if device != "cuda" or nk.triton is None:
        return torch_ones
    return {"triton": nk.nearest_key,
            "triton_tf32x3": lambda *a, **kw: nk.nearest_key(*a, **kw, input_precision="tf32x3"),
            **torch_ones}


def make_case(num_keys, dim, num_queries, dtype, device):
    """Keys ~ N(0, 1); even queries sit at 1e-3 of a key (hits), odd ones are random (misses)."""
    keys = torch.randn(num_keys, dim, device=device)
    near = keys[torch.randint(0, num_keys, (num_queries,), device=device)]
    near = near + 1e-3 * torch.randn(num_queries, dim, device=device)
    far = torch.randn(num_queries, dim, device=device)
    even = (torch.arange(num_queries, device=device) % 2 == 0)[:, None]
    owners = torch.arange(num_keys, dtype=torch.int32, device=device)
    return torch.where(even, near, far).to(dtype), keys, owners


def time_ms(fn, warmup: int, repeats: int, device: str) -> list[float]:
    if device == "cuda":
        return event_ms(fn, warmup, repeats)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def run_setup(setup: dict, provs: dict, args, device: str, peak_gbps: float | None) -> list:
    dtype = DTYPES[args.dtype]
    queries, keys, owners = make_case(setup["N"], setup["d"], setup["S"], dtype, device)
    call = (queries, keys, owners, THRESHOLD[setup["metric"]], setup["metric"])
    want = nk.nearest_key_ref(*call)
    floor_bytes = setup["N"] * setup["d"] * 4  # every fp32 key read once
    rows = []
    key_norms = keys.square().sum(1)
    for name, fn in provs.items():
        kw = {"key_norms": key_norms} if name in TAKES_KEY_NORMS else {}
        got = fn(*call, **kw)
        agrees = bool(torch.equal(got[0], want[0]) and torch.equal(got[2], want[2]))
        times = time_ms(lambda fn=fn, kw=kw: fn(*call, **kw), args.warmup, args.repeats, device)
        median = statistics.median(times)
        gbps = floor_bytes / (median * 1e-3) / 1e9
        rows.append({"setup": setup, "provider": name, "agrees_with_ref": agrees,
                     "latency_ms": {"median": median, "mean": statistics.fmean(times),
                                    "std": statistics.pstdev(times), "min": min(times)},
                     "floor_bytes": floor_bytes, "achieved_gbps": gbps,
                     "frac_of_peak": gbps / peak_gbps if peak_gbps else None})
    base = rows[0]["latency_ms"]["median"]  # ratios against the first provider (triton on CUDA)
    for row in rows:
        row[f"x_vs_{rows[0]['provider']}"] = row["latency_ms"]["median"] / base
    return rows


def print_rows(rows: list, first: bool) -> None:
    if first:
        print(f"{'N':>7} {'d':>5} {'S':>4} {'metric':>6} {'provider':>14} {'ms':>9} "
              f"{'GB/s':>8} {'%peak':>6} {'x vs ' + rows[0]['provider']:>17} ok")
    for r in rows:
        s, peak = r["setup"], r["frac_of_peak"]
        ratio = next(v for k, v in r.items() if k.startswith("x_vs_"))
        print(f"{s['N']:>7} {s['d']:>5} {s['S']:>4} {s['metric']:>6} {r['provider']:>14} "
              f"{r['latency_ms']['median']:>9.3f} {r['achieved_gbps']:>8.1f} "
              f"{'-' if peak is None else f'{100 * peak:.1f}':>6} {ratio:>17.2f} "
              f"{'yes' if r['agrees_with_ref'] else 'NO'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metric", nargs="+", default=["cosine", "l2"], choices=nk.METRICS)
    parser.add_argument("--dtype", default="fp32", choices=list(DTYPES), help="query dtype")
    parser.add_argument("--keys", type=int, nargs="+", help="N values (default by device)")
    parser.add_argument("--dims", type=int, nargs="+", help="d values (default by device)")
    parser.add_argument("--queries", type=int, nargs="+", help="S values (default by device)")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--peak-gbps", type=float, default=None,
                        help="peak memory bandwidth; default from the device name (H100, H200)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/routing_kernel.json")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    keys = args.keys or ([1_000, 10_000, 100_000] if cuda else [1_000, 10_000])
    dims = args.dims or ([576, 4096] if cuda else [576])
    num_queries = args.queries or ([1, 8, 64, 256] if cuda else [1, 64])
    args.warmup = args.warmup if args.warmup is not None else (5 if cuda else 1)
    args.repeats = args.repeats or (50 if cuda else 5)
    name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    peak = args.peak_gbps or (peak_gbps(name) if cuda else None)
    provs = providers(args.device)
    print(f"device: {name}; peak {peak} GB/s; queries {args.dtype}, keys fp32; "
          f"providers: {', '.join(provs)}; {args.warmup} warmup + {args.repeats} repeats, median")
    if not cuda:
        print("CPU: torch providers only, reduced sweep. Triton needs a GPU; its interpreter "
              "(TRITON_INTERPRET=1) checks correctness and its timings mean nothing.")
    torch.manual_seed(0)
    results = []
    for metric in args.metric:
        for n in keys:
            for d in dims:
                for s in num_queries:
                    setup = {"N": n, "d": d, "S": s, "metric": metric, "dtype": args.dtype}
                    rows = run_setup(setup, provs, args, args.device, peak)
                    print_rows(rows, first=not results)
                    results += rows
    save_report(args.out, {
        "device": name, "peak_gbps": peak, "torch": torch.__version__,
        "triton": getattr(nk.triton, "__version__", None), "providers": list(provs),
        "warmup": args.warmup, "repeats": args.repeats, "results": results})
    return 0 if all(r["agrees_with_ref"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
