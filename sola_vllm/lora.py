"""Routed LoRA linear layers for the transformers reference engine (SoLA, arXiv 2603.11239).

Every edited module is wrapped by `RoutedLoRALinear`. All wrappers of one model share a
`LoraContext` whose `plan` lists, for the current forward, each edit in use and the flat token
indices it applies to (decision 2: the key token and every later token of a routed row).
Tokens outside the plan are the base module's output, bit for bit: the LoRA delta is added with
`index_add` only at planned indices. The same module serves training and inference, so serving
equals training.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .arch import ARCHS, EditShape
from .edit import lora_name


@dataclass
class LoraContext:
    plan: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (edit id, flat token idx)


class RoutedLoRALinear(nn.Module):
    def __init__(self, base: nn.Module, ctx: LoraContext, conv1d: bool):
        super().__init__()
        self.base = base
        self.ctx = ctx
        self.conv1d = conv1d
        weight = base.weight
        # nn.Linear: [out, in]; GPT-2 Conv1D: [in, out]
        self.in_features, self.out_features = (
            (weight.shape[0], weight.shape[1]) if conv1d else (weight.shape[1], weight.shape[0])
        )
        self.adapters: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def set_adapter(self, edit_id: str, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features:
            raise ValueError(f"LoRA for edit {edit_id} has A {tuple(a.shape)} / B "
                             f"{tuple(b.shape)}, but the module maps {self.in_features} -> "
                             f"{self.out_features}")
        self.adapters[edit_id] = (a, b, scale)

    def drop_adapter(self, edit_id: str) -> None:
        self.adapters.pop(edit_id, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.ctx.plan:
            return out
        flat_x = x.reshape(-1, x.shape[-1])  # [num_tokens, in]
        flat_out = out.reshape(-1, out.shape[-1])  # [num_tokens, out]
        for edit_id, idx in self.ctx.plan:
            a, b, scale = self.adapters[edit_id]
            delta = (flat_x[idx].to(a.dtype) @ a.T) @ b.T  # [len(idx), out], fp32
            flat_out = flat_out.index_add(0, idx, (delta * scale).to(out.dtype))
        return flat_out.view(out.shape)


def install_routed_lora(model: nn.Module, shape: EditShape,
                        ctx: LoraContext) -> dict[str, RoutedLoRALinear]:
    """Replace each edited module of `model` by a `RoutedLoRALinear`; keyed by `lora_name`."""
    spec = ARCHS[shape.arch]
    wrapped = {}
    for layer in shape.layers:
        for module in shape.modules:
            parent_path, _, attr = spec.module_path(layer, module).rpartition(".")
            parent = model.get_submodule(parent_path)
            base = getattr(parent, attr)
            if isinstance(base, RoutedLoRALinear):
                raise RuntimeError(f"{parent_path}.{attr} is already wrapped")
            wrapper = RoutedLoRALinear(base, ctx, spec.conv1d)
            setattr(parent, attr, wrapper)
            wrapped[lora_name(layer, module)] = wrapper
    return wrapped


def apply_indices(slots: torch.Tensor, apply_mask: torch.Tensor) -> dict[int, torch.Tensor]:
    """Group token positions by edit slot. slots: int [B] (-1 = none); apply_mask: bool [B, T]
    (True from the key token on). -> {slot: flat token indices into the [B*T] tokens}."""
    groups = {}
    for slot in torch.unique(slots).tolist():
        if slot < 0:
            continue
        mask = apply_mask & (slots == slot)[:, None]
        groups[slot] = mask.reshape(-1).nonzero().squeeze(1)
    return groups
