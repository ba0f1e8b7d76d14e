"""Hot add and revoke on a live `sola-vllm serve`: latency until the change is visible to new
requests, at several load levels, and memory per resident edit against the formula.

For each load level (concurrent streaming clients sending unrelated questions the whole time),
`--changes` edits are pushed and revoked one after another:

    add:    POST /v1/sola/edits (the artifact) until 201; the server answers only after the edit
            is stored, its key captured by the engine and activated, so the next request routes
            to it: checked by sending its prompt and seeing the engine's routed count go up by 1.
    revoke: DELETE /v1/sola/edits/{id} until 200; checked the same way (the count stays).

Memory (resident set of the server's processes; vLLM's engine runs in children): what a slot
takes at start (a ready server minus a one-slot server, per slot: slots are preallocated) plus
what a push adds (growth over `--memory-edits` quiet pushes, per push), against the formula
rank*(in+out)*4 bytes per edited module plus keys*d*4.

    .venv/bin/python benchmarks/edit_ops.py [--loads 0,4,16] [--changes 20] [--memory-edits 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_load import Server, _load, push, routed_requests, start_servers  # noqa: E402
from serving_workload import (  # noqa: E402
    RESULTS,
    edit_prompts,
    machine,
    model_sizes,
    percentiles,
    synthetic_edits,
    write_json,
    zsre_prompts,
)


def revoke(server: Server, edit_id: str) -> float:
    req = urllib.request.Request(f"{server.url}/v1/sola/edits/{edit_id}", method="DELETE")
    started = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        resp.read()
    return time.perf_counter() - started


def complete(server: Server, prompt: str) -> None:
    body = json.dumps({"model": server.model, "prompt": prompt, "max_tokens": 1,
                       "temperature": 0}).encode()
    req = urllib.request.Request(server.url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as resp:
        resp.read()


def routes_now(server: Server, prompt: str) -> bool:
    """Does a new request with this prompt route to an edit? (the engine's routed count)"""
    before = routed_requests(server)
    complete(server, prompt)
    return routed_requests(server) == before + 1


class Background:
    """`clients` streaming clients sending unrelated questions until stopped."""

    def __init__(self, server: Server, prompts: list[str], clients: int):
        self.server, self.prompts, self.clients = server, prompts, clients
        self.stop_flag, self.served, self.tpot = False, 0, []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_flag and self.clients:
            done = asyncio.run(_load(self.server.url, self.server.model,
                                     self.prompts[: self.clients], 16, self.clients))
            self.served += done["requests"]
            if done["tpot_s"].get("p50") is not None:
                self.tpot.append(done["tpot_s"]["p50"])  # ~ the engine's step time

    def __enter__(self) -> Background:
        self.thread.start()
        time.sleep(2 if self.clients else 0)  # let the load reach the engine
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag = True
        self.thread.join()


def rss_bytes(pid: int) -> int:
    """Resident set of a process and all its descendants."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(x for x in status.splitlines() if x.startswith("VmRSS")).split()[1])
            todo += [int(c) for t in Path(f"/proc/{p}/task").iterdir()
                     for c in (t / "children").read_text().split()]
        except (OSError, StopIteration):
            continue
    return total * 1024


def formula_bytes(serving, rank: int, keys: int = 1) -> int:
    hidden, dims = model_sizes(serving)
    per_layer = sum(rank * (d_in + d_out) * 4 for d_in, d_out in dims.values())
    return per_layer * len(serving.layers) + keys * hidden * 4


def latency_at(server: Server, load: int, edits, unrelated, results: dict) -> None:
    adds, revokes, invisible = [], [], 0
    with Background(server, unrelated, load) as background:
        for edit in edits:
            adds.append(push(server, edit.to_bytes()))
            invisible += not routes_now(server, edit.prompts[0])
            revokes.append(revoke(server, edit.id))
            invisible += routes_now(server, edit.prompts[0])
        served = background.served
        step = float(np.median(background.tpot)) if background.tpot else None
    results[f"load_{load}_clients"] = {
        "clients": load, "changes": len(edits), "add_s": percentiles(adds),
        "revoke_s": percentiles(revokes), "not_visible_to_next_request": invisible,
        "background_requests_served": served, "background_tpot_p50_s": step}
    print(f"  load {load:2d} clients: add p50 {percentiles(adds)['p50'] * 1e3:6.0f} ms p99 "
          f"{percentiles(adds)['p99'] * 1e3:6.0f} ms | revoke p50 "
          f"{percentiles(revokes)['p50'] * 1e3:6.0f} ms p99 "
          f"{percentiles(revokes)['p99'] * 1e3:6.0f} ms | not visible: {invisible}", flush=True)


def memory(server: Server, serving, edits, ready_rss: int, work: Path, results: dict) -> None:
    """Every slot of this server holds an edit once `edits` are pushed (the latency runs filled
    the others): the cost of a resident edit is the difference to a server with one slot."""
    from sola_vllm.models import fetch_default_model

    _, small = start_servers(fetch_default_model(progress=False), work / "store-small", 1,
                             work / "small", plain=False)
    try:
        time.sleep(5)
        small_rss = rss_bytes(small.proc.pid)
    finally:
        small.stop()
    slots = server_capacity(server)
    before = rss_bytes(server.proc.pid)
    for edit in edits:
        push(server, edit.to_bytes())
    time.sleep(2)
    full = rss_bytes(server.proc.pid)
    rank = edits[0].rank
    results["memory"] = {
        "slots": slots, "rank": rank, "rss_one_slot_bytes": small_rss,
        "rss_ready_bytes": ready_rss, "rss_full_bytes": full,
        "measured_bytes_per_resident_edit": per_resident_edit(small_rss, ready_rss, slots,
                                                              full - before, len(edits)),
        "measured_bytes_per_empty_slot": (ready_rss - small_rss) / (slots - 1),
        "formula_bytes_per_edit": formula_bytes(serving, rank),
        "rss_growth_last_pushes_bytes": full - before, "last_pushes": len(edits)}
    m = results["memory"]
    print(f"  memory per resident edit: measured "
          f"{m['measured_bytes_per_resident_edit'] / 1024:.0f} KiB (a slot, allocated at start: "
          f"{m['measured_bytes_per_empty_slot'] / 1024:.0f} KiB; a push: "
          f"{(full - before) / len(edits) / 1024:.0f} KiB), formula "
          f"{m['formula_bytes_per_edit'] / 1024:.0f} KiB", flush=True)


def per_resident_edit(small_rss: int, ready_rss: int, slots: int, growth: int,
                      pushes: int) -> float:
    """What a slot takes at start (a ready server minus a one-slot server, per slot) plus what a
    push adds (the growth over the last, quiet pushes, per push). The full server's resident set
    minus the ready one's is not used: it also holds KV-cache pages first touched by the latency
    runs' load (110 MB in the first run, against 1.8 MB over its last 200 pushes)."""
    return (ready_rss - small_rss) / (slots - 1) + growth / pushes


def server_capacity(server: Server) -> int:
    with urllib.request.urlopen(server.url + "/v1/sola/edits", timeout=600) as resp:
        return int(json.loads(resp.read())["stats"]["max_edits"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=lambda s: [int(x) for x in s.split(",")],
                        default=[0, 4, 16], help="concurrent background clients")
    parser.add_argument("--changes", type=int, default=20, help="adds and revokes per load")
    parser.add_argument("--memory-edits", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "edit_ops.json")
    args = parser.parse_args()
    from http_load import default_serving

    from sola_vllm.config import EditConfig
    from sola_vllm.models import fetch_default_model

    questions, unrelated = zsre_prompts()
    serving = default_serving()
    total = args.changes * len(args.loads) + args.memory_edits
    edits = synthetic_edits(serving, edit_prompts(total, questions), EditConfig().rank)
    work = Path(tempfile.mkdtemp(prefix="sola-bench-ops-"))
    _, server = start_servers(fetch_default_model(progress=False), work / "store", total, work,
                              plain=False)
    results = {"command": " ".join(sys.argv), "machine": machine(), "logs": str(work)}
    time.sleep(5)
    ready_rss = rss_bytes(server.proc.pid)
    try:
        for i, load in enumerate(args.loads):
            latency_at(server, load, edits[i * args.changes:(i + 1) * args.changes],
                       unrelated, results)
            write_json(args.out, results)
        memory(server, serving, edits[len(args.loads) * args.changes:], ready_rss, work,
               results)
    finally:
        server.stop()
    write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
