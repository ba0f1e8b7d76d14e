"""SoLA's forward ops as torch custom ops: opaque to Dynamo/Inductor, so their data-dependent
CPU implementations (nonzero, unique, host-side route table) run as written at every step.

`sola::route` mutates the runtime's token-slot buffer, and `sola::lora_apply` reads it: the data
dependency through that buffer keeps every apply after the route in a compiled graph.
"""

from __future__ import annotations

import torch

_RUNTIMES: dict[int, object] = {}


def register_runtime(runtime) -> int:
    """Runtimes are looked up by id inside the ops (custom ops take tensors and scalars only)."""
    runtime_id = id(runtime)
    _RUNTIMES[runtime_id] = runtime
    return runtime_id


@torch.library.custom_op("sola::route", mutates_args=("tok_slot",))
def route(hidden: torch.Tensor, tok_slot: torch.Tensor, runtime_id: int) -> None:
    """hidden: [T, d] residual entering the route layer; writes tok_slot[:T] (-1 = no edit)."""
    runtime = _RUNTIMES[runtime_id]
    assert tok_slot.data_ptr() == runtime.tok_slot.data_ptr()
    runtime.route(hidden)


@route.register_fake
def _route_fake(hidden, tok_slot, runtime_id) -> None:
    return None


@torch.library.custom_op("sola::lora_apply", mutates_args=("y",))
def lora_apply(y: torch.Tensor, x: torch.Tensor, tok_slot: torch.Tensor, runtime_id: int,
               group: int) -> None:
    """y: [T, out] base output (updated in place), x: [T, in] input: adds each routed token's
    LoRA delta; rows of tokens with no edit are not written."""
    _RUNTIMES[runtime_id].apply(group, y, x)


@lora_apply.register_fake
def _lora_apply_fake(y, x, tok_slot, runtime_id, group) -> None:
    return None
