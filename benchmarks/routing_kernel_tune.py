"""Launch-configuration sweep of the nearest-key kernel: the evidence behind `_launch_config`.

For each shape (N keys of d, S key tokens) every combination of tiles (block_n, block_d, and
block_s on the dot path), warps, pipeline stages and programs per SM is launched, checked
against the reference (edit and key index equal) and timed (CUDA graph replays, CUDA events,
median). Prints the default configuration's time, the best one's and their ratio per shape;
writes every timing to JSON. Needs a CUDA device.

    python benchmarks/routing_kernel_tune.py --out benchmarks/results/routing_kernel_tune.json
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "kernels"))
import nearest_key as nk  # noqa: E402
from cuda_timing import add_timing_args, cuda_device, graph_ms, save_report  # noqa: E402
from routing_kernel import make_case  # noqa: E402

BROADCAST_SPACE = dict(block_n=[16, 32, 64], block_d=[64, 128, 256], num_warps=[4, 8],
                       num_stages=[1, 2, 3], programs_per_sm=[4, 8, 16])
DOT_SPACE = dict(block_s=[32, 64], block_n=[32, 64, 128], block_d=[32, 64], num_warps=[4, 8],
                 num_stages=[2, 3], programs_per_sm=[2, 4])


def candidates(space: dict):
    names = list(space)
    for values in itertools.product(*(space[n] for n in names)):
        yield dict(zip(names, values))


def fits(override: dict, num_queries: int) -> bool:
    """The broadcast path's 3D tile [S, n, d] must stay in registers (<= 16384 fp32)."""
    if num_queries >= 16:
        return override.get("block_s", 16) <= triton_pow2(num_queries)
    return triton_pow2(num_queries) * override["block_n"] * override["block_d"] <= 16384


def triton_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def time_config(case, want, metric, precision, override, args) -> float | None:
    queries, keys, owners = case

    def call(out=None):
        return nk.nearest_key(queries, keys, owners, 1e-3, metric, out=out,
                              input_precision=precision, launch_override=override)
    try:
        got = call()
    except Exception as exc:  # a configuration Triton cannot compile (shared memory, ...)
        print(f"  skipped {override}: {type(exc).__name__}: {str(exc)[:80]}")
        return None
    if not (torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])):
        raise SystemExit(f"configuration {override} routes unlike the reference")
    return statistics.median(graph_ms(lambda: call(got), args.warmup, args.repeats))


def sweep_shape(num_keys, dim, num_queries, metric, precision, peak, args) -> dict:
    case = make_case(num_keys, dim, num_queries, torch.float32, "cuda")
    want = nk.nearest_key_ref(*case, 1e-3, metric)
    space = DOT_SPACE if num_queries >= 16 else BROADCAST_SPACE
    default = time_config(case, want, metric, precision, None, args)
    timings = []
    for override in candidates(space):
        if fits(override, num_queries):
            ms = time_config(case, want, metric, precision, override, args)
            if ms is not None:
                timings.append({"override": override, "ms": ms})
    best = min(timings, key=lambda t: t["ms"])
    floor_bytes = num_keys * dim * 4
    pct = (lambda ms: 100 * floor_bytes / (ms * 1e-3) / (peak * 1e9)) if peak else (lambda ms: 0)
    print(f"N={num_keys:>6} d={dim:>4} S={num_queries:>3} {metric} {precision}: default "
          f"{default:.4f} ms ({pct(default):.1f}% of peak), best {best['ms']:.4f} ms "
          f"({pct(best['ms']):.1f}%) = {default / best['ms']:.2f}x with {best['override']}")
    return {"N": num_keys, "d": dim, "S": num_queries, "metric": metric, "precision": precision,
            "default_ms": default, "default": nk._launch_config(
                num_queries, num_keys, dim, torch.device("cuda"))._asdict(),
            "best": best, "floor_bytes": floor_bytes, "timings": timings}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["100000x4096x1", "100000x4096x64",
                                                        "100000x576x1", "100000x64x1"],
                        help="NxdxS")
    parser.add_argument("--metric", default="cosine", choices=nk.METRICS)
    parser.add_argument("--precision", default="tf32x3", help="dot path input precision")
    add_timing_args(parser, 3, 10, ROOT / "benchmarks/results/routing_kernel_tune.json")
    args = parser.parse_args()
    name, peak = cuda_device()
    torch.manual_seed(0)
    print(f"device: {name}; peak {peak} GB/s; fp32 keys and queries; median of {args.repeats} "
          "graph replays per configuration")
    rows = []
    for shape in args.shapes:
        num_keys, dim, num_queries = (int(x) for x in shape.split("x"))
        rows.append(sweep_shape(num_keys, dim, num_queries, args.metric, args.precision, peak,
                                args))
    save_report(args.out, {
        "device": name, "peak_gbps": peak, "torch": torch.__version__,
        "triton": nk.triton.__version__, "repeats": args.repeats, "shapes": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
