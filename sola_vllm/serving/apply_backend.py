"""Which apply adds the routed LoRA deltas in a worker, decided once at engine start.

"torch": `LoraStacks` (fp32 tables, one fused gather pair per module; the CPU path).
"punica": `PunicaBackend` (vLLM's Triton `lora_shrink`/`lora_expand` on slot-stacked weights in
the model dtype; needs CUDA, vLLM's Triton and a float16/bfloat16 model).
"auto": punica where it can run, else torch. An explicit "punica" that cannot run is refused
with the reason, never quietly served by the other backend.

Both backends offer what `SolaRuntime` uses: names(), in_out(name), write(slot, lora, rank,
scale), clear(slot), prepare(tok_slot) -> per-forward state with `num_tokens`, and
apply(group, y, x, state).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from .config import ServingConfig
from .lora_stacks import LoraStacks
from .punica_apply import KERNEL_DTYPES
from .punica_backend import PunicaBackend

if TYPE_CHECKING:
    from .runtime import LoraTarget

Kernels = tuple[Callable, Callable]  # (lora_shrink, lora_expand)


def has_triton() -> bool:
    """vLLM's own verdict: False on the CPU wheel, where its Triton ops cannot launch."""
    from vllm.triton_utils import HAS_TRITON

    return bool(HAS_TRITON)


def punica_blocker(device: torch.device | str, dtype: torch.dtype,
                   injected: bool = False) -> str | None:
    """Why the punica apply cannot run for this model, or None. Injected kernels (tests: vLLM's
    kernels in Triton's interpreter) are the caller's word that they run on `device`."""
    if dtype not in KERNEL_DTYPES:
        return f"the model dtype is {dtype}; vLLM's LoRA kernels need float16 or bfloat16"
    return None if injected else host_blocker(device)


def host_blocker(device: torch.device | str) -> str | None:
    """Why vLLM's LoRA kernels cannot run on `device` whatever the model dtype, or None."""
    if torch.device(device).type != "cuda":
        return f"the model runs on {torch.device(device)}; vLLM's LoRA kernels need CUDA"
    if not has_triton():
        return "vLLM's Triton kernels are unavailable (vllm.triton_utils.HAS_TRITON is False)"
    return None


def choose_apply(requested: str, device: torch.device | str, dtype: torch.dtype,
                 injected: bool = False) -> str:
    """"torch" or "punica" for ServingConfig.apply; raises ValueError when "punica" is asked
    for where it cannot run."""
    blocker = punica_blocker(device, dtype, injected)
    if requested == "auto":
        return "torch" if blocker else "punica"
    if requested == "punica" and blocker:
        raise ValueError(f"sola apply 'punica' cannot run here: {blocker} (use apply 'torch' "
                         "or 'auto')")
    return requested


def make_lora_backend(config: ServingConfig, targets: Sequence[Sequence[LoraTarget]],
                      max_tokens: int, *, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu", max_seqs: int | None = None,
                      kernels: Kernels | None = None):
    """The one place a runtime's apply backend is chosen and built. `max_seqs` bounds the
    distinct edits in one forward (one per request; default: every slot). `kernels` replaces
    vLLM's registered ops (production passes None); a punica backend checks them at once."""
    choice = choose_apply(config.apply, device, dtype, injected=kernels is not None)
    if choice == "torch":
        return LoraStacks(list(targets), config.max_edits, config.max_rank, device=device)
    return PunicaBackend(targets, config.max_edits, config.max_rank, max_tokens, dtype=dtype,
                         device=device, max_seqs=max_seqs, kernels=kernels)
