"""The routing table: every routed edit's keys stacked (mapped), each row owned by an edit slot;
then the blocking keys (revoked edits', `RouterConfig.revoked_keys`), owned by no edit (-1).
Each row carries its key's threshold, the router's for that key's form (`Edit.forms`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .edit import Edit


def key_thresholds(forms: list[str], thresholds: dict[str, float],
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """fp32 [n]: the threshold of each key form in `forms` (`RouterConfig.thresholds`)."""
    return torch.tensor([thresholds[f] for f in forms], dtype=torch.float32, device=device)


@dataclass
class KeyTable:
    keys: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # [N, d] fp32, mapped
    owners: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))
    thresholds: torch.Tensor = field(default_factory=lambda: torch.zeros(0))  # [N] fp32
    edit_ids: list[str] = field(default_factory=list)  # slot -> edit id (routed edits only)
    forms: list[str] = field(default_factory=list)  # [N]: each key's form

    @classmethod
    def build(cls, edits: list[Edit], thresholds: dict[str, float], key_map=None,
              blocking: list[Edit] = ()) -> KeyTable:
        """Keys in the space distances are taken in: after `key_map` (a `KeyMap`) if given,
        each routed below its form's threshold (`thresholds`, `RouterConfig.thresholds`).
        `blocking` edits' keys follow the routed ones, owned by -1: a query nearest one routes
        to no edit, and a routed key wins an exact tie (the lowest key index does)."""
        everything = [*edits, *blocking]
        if not everything:
            return cls()
        keys = torch.cat([e.keys.float() for e in everything])
        keys = keys if key_map is None else key_map(keys)
        owners = torch.cat([torch.full((e.keys.shape[0],), slot if slot < len(edits) else -1,
                                       dtype=torch.int32)
                            for slot, e in enumerate(everything)])
        forms = [f for e in everything for f in e.forms()]
        return cls(keys, owners, key_thresholds(forms, thresholds), [e.id for e in edits], forms)

    def __len__(self) -> int:
        return self.keys.shape[0]
