"""The routing table: every active edit's keys stacked (mapped), each row owned by an edit slot."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .edit import Edit


@dataclass
class KeyTable:
    keys: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))  # [N, d] fp32, mapped
    owners: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int32))
    edit_ids: list[str] = field(default_factory=list)  # slot -> edit id

    @classmethod
    def build(cls, edits: list[Edit], key_map=None) -> KeyTable:
        """Keys in the space distances are taken in: after `key_map` (a `KeyMap`) if given."""
        if not edits:
            return cls()
        keys = torch.cat([e.keys.float() for e in edits])
        keys = keys if key_map is None else key_map(keys)
        owners = torch.cat([torch.full((e.keys.shape[0],), slot, dtype=torch.int32)
                            for slot, e in enumerate(edits)])
        return cls(keys, owners, [e.id for e in edits])

    def __len__(self) -> int:
        return self.keys.shape[0]
