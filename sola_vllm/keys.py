"""Reading a routing key (or query) from a prompt's residual states entering the route layer.

"last": the state at the prompt's last token (the key token), the paper's choice.
"mean": the fp32 mean of the states at prompt positions 1..P-1, the key token included and the
first token left out (its state is an outlier every prompt shares, the "attention sink"); a
one-token prompt keeps its only state. Measured on zsRE (issue 4): mean-pooled states carry the
subject, last-token states of questions carry mostly the final "?".

The vLLM router accumulates the same sum across prefill chunks (`serving.runtime`).
"""

from __future__ import annotations

import torch

from .config import KEY_POOLS


def pooled_positions(attention_mask: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions a "mean" key averages, for rows padded on either side
    (`attention_mask` [B, T] marks real tokens, `key_pos` [B] each row's last prompt token)."""
    real = attention_mask.bool()
    cols = torch.arange(real.shape[1], device=real.device)[None, :]
    first = real.int().argmax(dim=1, keepdim=True)  # first real token of each row
    upto = cols <= key_pos[:, None].to(real.device)
    after_first = (cols > first) | (key_pos[:, None].to(real.device) == first)
    return real & upto & after_first


def pool_keys(states: torch.Tensor, attention_mask: torch.Tensor, key_pos: torch.Tensor,
              pool: str) -> torch.Tensor:
    """states [B, T, d] -> fp32 keys [B, d], pooled as `pool` says."""
    if pool not in KEY_POOLS:
        raise ValueError(f"key pool {pool!r} is not one of {KEY_POOLS}")
    rows = torch.arange(states.shape[0], device=states.device)
    if pool == "last":
        return states[rows, key_pos.to(states.device)].float()
    weights = pooled_positions(attention_mask, key_pos).to(states.device)
    total = (states.float() * weights[..., None]).sum(dim=1)
    return total / weights.sum(dim=1, keepdim=True)
