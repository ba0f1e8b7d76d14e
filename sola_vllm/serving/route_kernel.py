"""Which nearest-key search routes a step's key tokens in a worker, decided once at engine start.

"torch": `nearest_key_ref` (fp32, explicit differences; any device; the CPU path).
"triton": the Triton kernel `kernels.nearest_key` (CUDA; or Triton's interpreter, in tests):
the same semantics and tie-break, reading every key once per step (benchmarks/routing_kernel.py).
"auto": triton where it can run, else torch. An explicit "triton" that cannot run is refused
with the reason, never quietly served by the other search.

Both return (edit slot int32 [S], distance fp32 [S], key index int64 [S]) for queries [S, d]
against the routed keys; `SolaRuntime._route_tokens` reads them on the host.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from sola_vllm.kernels import nearest_key as kernels

Nearest = Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


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


def make_nearest(choice: str) -> Nearest:
    """nearest(queries, keys, owners, threshold, metric, key_units) for the chosen router;
    key_units (`unit_rows(keys)`, cosine) serve the torch search, the kernel normalizes itself."""
    if choice == "torch":
        return kernels.nearest_key_ref

    def nearest(queries, keys, owners, threshold, metric, key_units=None):
        return kernels.nearest_key(queries.contiguous(), keys, owners, threshold, metric)

    return nearest
