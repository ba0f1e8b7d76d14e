"""Writer processes for the store's concurrency and crash tests (run as a script).

    python tests/store_writer.py STORE    a fork server reading commands on stdin, each
                                          answered by one line on stdout:
        churn SEED PREFIX  -> fork a writer that adds / revokes / restores edits until it is
                              killed; prints its pid
        add GO_FILE ID...  -> fork a writer that waits for GO_FILE to exist, adds the IDs,
                              revokes the first one and exits 0; prints its pid
        reap PID           -> wait for that writer; prints its wait status

The server pays torch's import once, so tests can start (and SIGKILL) many writers quickly.
"""

from __future__ import annotations

import os
import random
import sys
import time
import traceback
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import torch  # noqa: E402
from helpers import make_synthetic_edit  # noqa: E402

from sola_vllm.store import EditStore  # noqa: E402

# small edits keep the post-kill verification of hundreds of edits fast
SMALL = {"layers": (1,), "hidden": 16, "intermediate": 32, "rank": 2}


def small_edit(edit_id: str, seed: int):
    return make_synthetic_edit(edit_id, seed=seed, **SMALL)


def add_mode(store_path: str, go_file: str, ids: list[str]) -> None:
    store = EditStore(store_path, lock_timeout=30.0)
    edits = [small_edit(edit_id, seed) for seed, edit_id in enumerate(ids)]
    while not os.path.exists(go_file):  # start together with the other writers
        time.sleep(0.002)
    for edit in edits:
        store.add(edit, author=f"pid {os.getpid()}")
    store.revoke(ids[0], note="concurrent revoke")


def churn(store_path: str, seed: int, prefix: str) -> None:
    """Random add / revoke / restore forever; the test kills it at a random moment."""
    rng = random.Random(seed)
    store = EditStore(store_path)
    states = {s["id"]: s["state"] for s in store.list()}
    for k in range(10**9):
        active = sorted(i for i, s in states.items() if s == "active")
        revoked = sorted(i for i, s in states.items() if s == "revoked")
        roll = rng.random()
        if roll < 0.5 or not states:
            edit_id = f"{prefix}-{k}"
            store.add(small_edit(edit_id, seed * 1000 + k), note=f"churn {k}")
            states[edit_id] = "active"
        elif roll < 0.75 and active:
            edit_id = rng.choice(active)
            store.revoke(edit_id)
            states[edit_id] = "revoked"
        elif revoked:
            edit_id = rng.choice(revoked)
            store.restore(edit_id)
            states[edit_id] = "active"


def _fork(work) -> int:
    pid = os.fork()
    if pid == 0:  # the writer: never returns into the server loop
        code = 1
        try:
            work()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def serve(store_path: str) -> None:
    torch.set_num_threads(1)  # no thread pool in the parent: forking stays safe
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "churn":
            print(_fork(lambda: churn(store_path, int(args[0]), args[1])), flush=True)
        elif cmd == "add":
            print(_fork(lambda: add_mode(store_path, args[0], args[1:])), flush=True)
        elif cmd == "reap":
            print(os.waitpid(int(args[0]), 0)[1], flush=True)
        else:
            print(f"unknown command {cmd!r}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    serve(sys.argv[1])
