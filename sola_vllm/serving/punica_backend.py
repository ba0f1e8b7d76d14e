"""SolaRuntime's CUDA apply: the edits' LoRAs in `PunicaLoraStacks` on the model's device,
applied by vLLM's Triton `lora_shrink`/`lora_expand` (`apply_punica`).

Per forward, `prepare` builds the kernels' metadata once from the token slots (`PunicaMeta`: no
host sync; its first buffer is the device copy of tok_slot) and every edited linear of the
forward reuses it. Slot writes and clears are in place: vLLM caches the weights' `data_ptr`s.

At construction, `self_check` runs one small random apply per edited linear through the kernels
and compares it with `apply_punica_ref`: a kernel that computes something else (a vLLM upgrade,
an unsupported GPU, a bad tile config) stops the engine at start instead of serving wrong edits.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .punica_apply import PunicaLoraStacks, PunicaMeta, _vllm_ops, apply_punica, apply_punica_ref

if TYPE_CHECKING:
    from .runtime import LoraTarget

__all__ = ["KernelCheckError", "PunicaBackend", "PunicaStep", "SELF_CHECK_TOLERANCE"]

# Kernel vs apply_punica_ref: both round at the same points, only the fp32 accumulation order
# differs (about 1 ulp of y; the same bounds as tests/test_punica_apply.py).
SELF_CHECK_TOLERANCE = {torch.float16: dict(atol=2e-3, rtol=2e-3),
                        torch.bfloat16: dict(atol=2e-2, rtol=1.6e-2)}
SELF_CHECK_SLOTS = [-1, 0, 1, -1, 0, 1, 0]  # token slots of the check (1 becomes 0 if 1 slot)


class KernelCheckError(RuntimeError):
    """vLLM's LoRA kernels disagree with the torch reference on this machine."""


@dataclass
class PunicaStep:
    """One forward's kernel metadata, built once and reused by every edited linear."""

    num_tokens: int
    meta: tuple[torch.Tensor, ...]


class PunicaBackend:
    def __init__(self, targets: Sequence[Sequence[LoraTarget]], max_edits: int, max_rank: int,
                 max_tokens: int, *, dtype: torch.dtype, device: torch.device | str,
                 max_seqs: int | None = None,
                 kernels: tuple[Callable, Callable] | None = None):
        self.targets = [list(group) for group in targets]
        self.device = torch.device(device)
        self.stacks = PunicaLoraStacks(self.targets, max_edits, max_rank, max_tokens, dtype,
                                       self.device)
        # distinct slot values in one forward: one edit per request, plus -1
        segments = min(max_edits, max_seqs or max_edits) + 1
        self.meta = PunicaMeta(max_tokens, max(segments, 2), self.device)
        self.shrink, self.expand = kernels if kernels is not None else _vllm_ops()
        self.self_check()

    def names(self) -> set[str]:
        return set(self.stacks.a)

    def in_out(self, name: str) -> tuple[int, int]:
        return self.stacks.a[name].shape[2], self.stacks.b[name].shape[1]

    def write(self, slot: int, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
              scale: float) -> None:
        """lora: name -> (A [rank, in], B [out, rank]); modules the edit lacks get zeros."""
        self.stacks.clear_slot(slot)
        for name, (a, b) in lora.items():
            self.stacks.set_slot(slot, name, a, b, rank, scale)

    def clear(self, slot: int) -> None:
        self.stacks.clear_slot(slot)

    def prepare(self, tok_slot: torch.Tensor) -> PunicaStep:
        """tok_slot: int [T] (-1 = no edit), on any device: `build` copies it into its own
        device buffer."""
        return PunicaStep(int(tok_slot.shape[0]), self.meta.build(tok_slot))

    def apply(self, group: int, y: torch.Tensor, x: torch.Tensor, step: PunicaStep) -> None:
        """y: [T, out] base output of linear `group` (in place), x: [T, in] its input, both in
        the model dtype on its device; rows of tokens with slot -1 are never written."""
        apply_punica(y, x, step.meta, self.stacks, self.targets[group], shrink=self.shrink,
                     expand=self.expand)

    # --- start-up check -------------------------------------------------------------------------
    def self_check(self) -> None:
        """Random LoRAs in slots 0 and 1 (cleared afterwards), a few tokens with and without an
        edit, every edited linear: kernels against `apply_punica_ref`. Also fills vLLM's
        pointer tables for the real weights before any request."""
        num_slots = min(2, self.stacks.max_slots, self.meta.max_segments - 1)
        tok = torch.tensor(SELF_CHECK_SLOTS, dtype=torch.int32).clamp_max(num_slots - 1)
        tok = tok[: self.stacks.max_tokens]
        gen = torch.Generator().manual_seed(0)
        try:
            for slot in range(num_slots):
                self.write(slot, self._random_lora(gen), self.stacks.max_rank, 1.0 - slot / 2)
            step = self.prepare(tok)
            for group, targets in enumerate(self.targets):
                problem = self._check_group(group, targets, tok.to(self.device), step, gen)
                if problem:
                    names = ", ".join(t.name for t in targets)
                    raise KernelCheckError(
                        f"vLLM's LoRA kernels disagree with the torch reference on the linear "
                        f"holding {names} ({self.stacks.dtype}, {self.device}): {problem}; "
                        "refusing to serve edits through them (start with apply 'torch')")
        finally:
            for slot in range(num_slots):
                self.clear(slot)

    def _random_lora(self, gen: torch.Generator) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Factors scaled so that every delta is O(1) whatever the module's width."""
        rank, lora = self.stacks.max_rank, {}
        for name in self.stacks.a:
            d_in, d_out = self.in_out(name)
            lora[name] = (torch.randn(rank, d_in, generator=gen) / math.sqrt(d_in),
                          torch.randn(d_out, rank, generator=gen) / math.sqrt(rank))
        return lora

    def _check_group(self, group: int, targets: list[LoraTarget], tok: torch.Tensor,
                     step: PunicaStep, gen: torch.Generator) -> str | None:
        dtype, num_tokens = self.stacks.dtype, tok.shape[0]
        width = max(t.offset + t.out_features for t in targets)
        x = torch.randn(num_tokens, targets[0].in_features, generator=gen).to(self.device, dtype)
        base = torch.randn(num_tokens, width, generator=gen).to(self.device, dtype)
        got, want = base.clone(), base.clone()
        self.apply(group, got, x, step)
        apply_punica_ref(want, x, tok, self.stacks, targets)
        unrouted = tok < 0
        if not torch.equal(got[unrouted], base[unrouted]):
            return "rows of tokens without an edit were written"
        if not torch.allclose(got, want, **SELF_CHECK_TOLERANCE[dtype]):
            err = (got.float() - want.float()).abs().max().item()
            return f"largest difference {err:.3g} (tolerance {SELF_CHECK_TOLERANCE[dtype]})"
        return None
