"""What the GPU benchmarks share: the device, CUDA graphs, event-timed runs, their options and
reports."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

# peak HBM bandwidth in GB/s, matched in order against torch.cuda.get_device_name()
PEAK_GBPS = [("H100 PCIe", 2000.0), ("H100 NVL", 3900.0), ("H200", 4800.0), ("H100", 3350.0)]


def peak_gbps(name: str) -> float | None:
    return next((g for k, g in PEAK_GBPS if k in name), None)


def cuda_device() -> tuple[str, float | None]:
    """(device name, peak HBM GB/s or None); exits where there is no CUDA device."""
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    name = torch.cuda.get_device_name()
    return name, peak_gbps(name)


def capture(fn, warm: int = 2) -> torch.cuda.CUDAGraph:
    """fn run `warm` times on a side stream, then captured in a CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warm):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


def event_ms(fn, warmup: int, repeats: int) -> list[float]:
    """Each of `repeats` calls of fn (after `warmup` untimed ones) timed with CUDA events."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def graph_ms(fn, warmup: int, repeats: int) -> list[float]:
    """fn captured in a CUDA graph, then each replay timed with CUDA events."""
    return event_ms(capture(fn, warm=3).replay, warmup, repeats)


def median_ms(fn, warmup: int, repeats: int) -> float:
    return statistics.median(event_ms(fn, warmup, repeats))


def add_timing_args(parser: argparse.ArgumentParser, warmup: int, repeats: int,
                    out: Path) -> None:
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--out", type=Path, default=out)


def save_report(out: Path, report: dict) -> None:
    """The report, with the command that made it, as JSON at `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), **report}, indent=1))
    print(f"wrote {out}")
