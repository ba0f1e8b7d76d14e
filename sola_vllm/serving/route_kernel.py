"""Which nearest-key search routes a step's key tokens in a worker, decided once at engine start.

"torch": `nearest_key_ref` (fp32, explicit differences; any device; the CPU path).
"triton": the Triton kernel `kernels.nearest_key` (CUDA; or Triton's interpreter, in tests):
the same semantics and tie-break, reading every key once per step (benchmarks/routing_kernel.py).
"auto": triton on CUDA, else torch (the interpreter is for tests). An explicit "triton" that
cannot run is refused with the reason, never quietly served by the other search.

Both return (edit slot int32 [S], distance fp32 [S], key index int64 [S]) for queries [S, d]
against the routed keys; `SolaRuntime` scatters the slots over the step's token slots on the
device, then reads them on the host (`_record`). A Triton router is
checked against the reference when the engine starts (`self_check`): a kernel that routes
otherwise (an untested GPU, a Triton upgrade) stops the engine instead of misrouting edits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sola_vllm.kernels import nearest_key as kernels

Nearest = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]

# The kernel's tl.dot ranking (3 or more key tokens in a step) runs as three TF32 tensor-core
# products (~fp32): on an H100, 64 key tokens against 10^5 keys of 4096 took 1.0 ms against
# 2.6 ms in full-fp32 "ieee" (results/routing_kernel.json), with the same routing on every case
# of benchmarks/routing_kernel.py. The winner's distance, and so the threshold test, is
# recomputed in fp32 by explicit differences on either path.
RANKING_PRECISION = "tf32x3"


class RouterCheckError(RuntimeError):
    """The Triton router disagrees with the torch reference on this machine."""


def interpreted() -> bool:
    """Triton's interpreter is on (TRITON_INTERPRET=1 before triton was imported)."""
    return type(kernels._nearest_key_partial_kernel).__name__ == "InterpretedFunction"


def triton_blocker(device: torch.device | str) -> str | None:
    """Why the Triton router cannot run for a model on `device`, or None."""
    if kernels.triton is None:
        return "triton is not installed"
    if torch.device(device).type != "cuda" and not interpreted():
        return (f"the model runs on {torch.device(device)}; the Triton router needs CUDA (or "
                "TRITON_INTERPRET=1)")
    return None


def choose_router(requested: str, device: torch.device | str) -> str:
    """"torch" or "triton" for ServingConfig.router; raises ValueError when "triton" is asked
    for where it cannot run. "auto" picks triton on CUDA only (the interpreter is for tests)."""
    blocker = triton_blocker(device)
    if requested == "auto":
        return "triton" if torch.device(device).type == "cuda" and blocker is None else "torch"
    if requested == "triton" and blocker:
        raise ValueError(f"sola router 'triton' cannot run here: {blocker} (use router 'torch' "
                         "or 'auto')")
    return requested


def prepare_keys(choice: str, keys: torch.Tensor, metric: str) -> torch.Tensor | None:
    """What the chosen search precomputes once per change of the routed keys: the unit keys
    for the torch search (cosine), the squared key norms for the kernel (its cosine and tl.dot
    paths then skip them; a few bytes per key), else None."""
    if choice == "torch":
        return kernels.unit_rows(keys) if metric == "cosine" else None
    return keys.square().sum(1)


def make_nearest(choice: str) -> Nearest:
    """nearest(queries, keys, owners, threshold, metric, prepared) for the chosen router;
    prepared: `prepare_keys(choice, keys, metric)` or None (then computed in the search)."""
    if choice == "torch":
        def nearest(queries, keys, owners, threshold, metric, prepared=None):
            return kernels.nearest_key_ref(queries, keys, owners, threshold, metric,
                                           key_units=prepared)
        return nearest

    def nearest(queries, keys, owners, threshold, metric, prepared=None):
        return kernels.nearest_key(queries.contiguous(), keys, owners, threshold, metric,
                                   key_norms=prepared, input_precision=RANKING_PRECISION)

    return nearest


def self_check(nearest: Nearest, hidden_size: int, device: torch.device | str, metric: str,
               threshold: float) -> None:
    """20 queries (8 copies of stored keys, which must route to their owners, and 12 random
    ones) against 37 random keys, through `nearest` and the reference: the same slots and key
    indices, or RouterCheckError. 20 queries take the kernel's tl.dot ranking path."""
    gen = torch.Generator().manual_seed(0)
    keys = torch.randn(37, hidden_size, generator=gen)
    owners = torch.arange(37, dtype=torch.int32) % 5
    copies = keys[[0, 3, 9, 17, 22, 30, 35, 36]]
    queries = torch.cat([copies, torch.randn(12, hidden_size, generator=gen) * 4])
    want = kernels.nearest_key_ref(queries, keys, owners, threshold, metric)
    on = dict(device=device)
    got = nearest(queries.to(**on), keys.to(**on), owners.to(**on), threshold, metric)
    for name, g, w in (("slots", got[0], want[0]), ("key indices", got[2], want[2])):
        if not torch.equal(g.cpu().to(w.dtype), w):
            raise RouterCheckError(
                f"the Triton router disagrees with the torch reference on {name} ({metric}, "
                f"{torch.device(device)}): {g.cpu().tolist()} vs {w.tolist()}; refusing to "
                "route through it (start with router 'torch')")
