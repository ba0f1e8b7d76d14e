"""The CPU half of "Apply": every edit's LoRA factors stacked in one fp32 table per edited module,
applied to all routed tokens of a forward at once, however many distinct edits the batch holds.

Semantics, for each routed token t (slot s = tok_slot[t] >= 0) and each edited module m held by
the vLLM linear:
    y[t, m.offset : m.offset + m.out] += scale[s] * B_m[s] @ (A_m[s] @ x[t])
Rows of tokens with slot -1 are never written.

Layout: the factors are stored transposed and flattened so that one edit's weights are
consecutive rows, A_m[s]^T = a_rows[s*in : (s+1)*in] ([S*in, r]) and B_m[s]^T =
b_rows[s*r : (s+1)*r] ([S*r, out]). Both products are then weighted sums of gathered rows, which
`torch.nn.functional.embedding_bag` computes fused (no [n, out, r] copy of the gathered weights):
shrink = bag over the `in` rows of slot s weighted by x[t], expand = bag over the `r` rows
weighted by the shrink. A decode step with 64 requests on 64 different edits costs two ops per
module instead of 64 matmul pairs (measured in `benchmarks/serving_throughput.py`). Ranks below
`max_rank` are zero-padded, which adds exact zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .runtime import LoraTarget

__all__ = ["LoraStacks", "RoutedTokens"]


@dataclass
class RoutedTokens:
    """The routed tokens of one forward: built once, reused by every edited linear."""

    idx: torch.Tensor  # int64 [n]: token indices with an edit
    slots: torch.Tensor  # int64 [n]: their edit slots
    num_tokens: int  # tokens in the forward (routed or not)
    _bags: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def from_slots(cls, tok_slot: torch.Tensor) -> RoutedTokens:
        """tok_slot: int [T], -1 = no edit."""
        idx = (tok_slot >= 0).nonzero().squeeze(1)
        return cls(idx, tok_slot[idx].long(), int(tok_slot.shape[0]))

    def bag(self, width: int) -> torch.Tensor:
        """int64 [n, width]: row `slot * width + j` for j < width (the rows of each token's
        edit in a table of `width` rows per slot)."""
        if width not in self._bags:
            self._bags[width] = (self.slots[:, None] * width
                                 + torch.arange(width, device=self.slots.device))
        return self._bags[width]


class LoraStacks:
    def __init__(self, targets: list[list[LoraTarget]], max_edits: int, max_rank: int,
                 device: torch.device | str = "cpu"):
        self.targets = targets  # per patched vLLM linear: the edited modules it holds
        self.max_edits, self.max_rank = max_edits, max_rank
        self.a_rows: dict[str, torch.Tensor] = {}
        self.b_rows: dict[str, torch.Tensor] = {}
        for group in targets:
            for t in group:
                # vLLM builds models with the model dtype as torch's default: name fp32
                self.a_rows[t.name] = torch.zeros(max_edits * t.in_features, max_rank,
                                                  dtype=torch.float32, device=device)
                self.b_rows[t.name] = torch.zeros(max_edits * max_rank, t.out_features,
                                                  dtype=torch.float32, device=device)
        self.scale = torch.zeros(max_edits, dtype=torch.float32, device=device)

    def names(self) -> set[str]:
        return set(self.a_rows)

    def in_out(self, name: str) -> tuple[int, int]:
        return self.a_rows[name].shape[0] // self.max_edits, self.b_rows[name].shape[1]

    def _views(self, name: str, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Slot `slot`'s A^T [in, r_max] and B^T [r_max, out] (views into the tables)."""
        d_in, _ = self.in_out(name)
        r = self.max_rank
        return (self.a_rows[name][slot * d_in:(slot + 1) * d_in],
                self.b_rows[name][slot * r:(slot + 1) * r])

    def write(self, slot: int, lora: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int,
              scale: float) -> None:
        """lora: name -> (A [rank, in], B [out, rank]); every module of the stacks is
        rewritten (modules the edit lacks get zeros)."""
        for name in self.a_rows:
            a_t, b_t = self._views(name, slot)
            a_t.zero_()
            b_t.zero_()
            if name in lora:
                a, b = lora[name]
                a_t[:, :rank].copy_(a.T)
                b_t[:rank].copy_(b.T)
        self.scale[slot] = scale

    def clear(self, slot: int) -> None:
        """Zero a slot's factors and scale (a freed slot adds exact zeros)."""
        for name in self.a_rows:
            for table in self._views(name, slot):
                table.zero_()
        self.scale[slot] = 0.0

    def prepare(self, tok_slot: torch.Tensor) -> RoutedTokens:
        """The per-forward state every `apply` of the forward reuses."""
        return RoutedTokens.from_slots(tok_slot)

    def factors(self, name: str, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A [r_max, in], B [out, r_max]) of a slot, zero-padded past its rank."""
        a_t, b_t = self._views(name, slot)
        return a_t.T, b_t.T

    def apply(self, group: int, y: torch.Tensor, x: torch.Tensor, routed: RoutedTokens) -> None:
        """y: [T, out] base output of linear `group` (updated in place), x: [T, in] its input."""
        if routed.idx.numel() == 0:
            return
        xs = x[routed.idx].float()  # [n, in]
        scale = self.scale[routed.slots][:, None]  # [n, 1]
        for t in self.targets[group]:
            mid = F.embedding_bag(routed.bag(t.in_features), self.a_rows[t.name], mode="sum",
                                  per_sample_weights=xs) * scale  # [n, r]
            delta = F.embedding_bag(routed.bag(self.max_rank), self.b_rows[t.name], mode="sum",
                                    per_sample_weights=mid)  # [n, out] fp32
            y[:, t.offset:t.offset + t.out_features].index_add_(0, routed.idx,
                                                                delta.to(y.dtype))

    def apply_ref(self, group: int, y: torch.Tensor, x: torch.Tensor,
                  tok_slot: torch.Tensor) -> None:
        """The same, one token at a time in fp32 matmuls: the reference `apply` is tested
        against."""
        for token, slot in enumerate(tok_slot.tolist()):
            if slot < 0:
                continue
            for t in self.targets[group]:
                a, b = self.factors(t.name, slot)
                delta = (b @ (a @ x[token].float())) * self.scale[slot]  # [out]
                y[token, t.offset:t.offset + t.out_features] += delta.to(y.dtype)
