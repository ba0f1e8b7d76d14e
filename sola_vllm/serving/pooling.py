"""Mean-pooled routing queries in the worker: per-request running sums across prefill chunks.

A "mean" key (`keys.pool_keys`) is the fp32 mean of the states entering the route layer at
prompt positions 1..P-1 (position 0 only for a one-token prompt). vLLM shows the router one
step at a time, and chunked prefill splits a prompt over several steps, each with only some of
its positions: `MeanPooler` keeps, per request not yet routed, the fp32 sum and count of the
positions seen so far and the position it expects next. Each step adds its tokens with one
`index_add_` (no loop over tokens); the query is read at the key token (sum / count) and the
request's sum freed then.

What a sum cannot survive, and how it is handled:
- recompute (preemption frees the KV cache, the prompt is prefilled again from position 0):
  a chunk that starts before the expected position restarts the sum;
- skipped positions (a prefix-cache hit: those tokens never reach the router): a chunk that
  starts after the expected position makes the key incomplete; `take` then returns None and
  the runtime routes the request to no edit (never a guess). Prefix caching is therefore
  refused with mean keys (`llm.check_prefix_caching`, `models.init_sola`); a per-block
  partial-sum buffer, kept with the KV blocks and reused with them, would lift that (not
  built).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class _Sum:
    total: torch.Tensor  # [d] fp32, on the model's device
    count: int = 0
    next_pos: int = 0  # the next prompt position the sum expects
    complete: bool = True  # False: positions were skipped (their states never reached us)


class MeanPooler:
    def __init__(self, hidden_size: int):
        self.hidden_size = hidden_size
        self.sums: dict[str, _Sum] = {}  # request id -> its running sum (until it is routed)

    def accumulate(self, hidden: torch.Tensor, step, pending: np.ndarray) -> None:
        """Add this step's pooled prompt positions of the `pending` rows (bool [n]: requests
        not routed yet) to their sums. hidden: [>= step.num_tokens, d], the route layer's
        input for the step's tokens in order (`StepMeta`)."""
        rows, pos = step.tok_row, step.tok_pos
        key_pos = step.row_prompt_len[rows] - 1  # [T]
        prompt = (pos <= key_pos) & pending[rows]  # prompt tokens of requests still to route
        if not prompt.any():
            return
        n = len(step.req_ids)
        first = np.full(n, np.iinfo(np.int64).max, dtype=np.int64)
        last = np.full(n, -1, dtype=np.int64)
        np.minimum.at(first, rows[prompt], pos[prompt])
        np.maximum.at(last, rows[prompt], pos[prompt])
        seen = np.flatnonzero(last >= 0)  # rows with prompt tokens in this step
        sums = [self._begin(step.req_ids[row], int(first[row]), hidden) for row in seen]
        pooled = np.flatnonzero(prompt & ((pos >= 1) | (key_pos == 0)))
        counts = np.bincount(rows[pooled], minlength=n)
        part = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        if pooled.size:
            on = hidden.device
            part.index_add_(0, torch.from_numpy(rows[pooled]).to(on),
                            hidden[torch.from_numpy(pooled).to(on)].float())
        for row, total in zip(seen, sums, strict=True):
            total.total += part[row]
            total.count += int(counts[row])
            total.next_pos = int(last[row]) + 1

    def _begin(self, req_id: str, first: int, hidden: torch.Tensor) -> _Sum:
        """The sum this step's chunk (starting at prompt position `first`) adds to."""
        total = self.sums.get(req_id)
        if total is None or first < total.next_pos:  # new, or recomputed from earlier: restart
            total = _Sum(torch.zeros(self.hidden_size, dtype=torch.float32,
                                     device=hidden.device))
            self.sums[req_id] = total
        if first > total.next_pos:  # positions skipped: the key would miss their states
            total.complete = False
        return total

    def take(self, req_id: str) -> torch.Tensor | None:
        """The request's pooled query (fp32 [d]) at its key token, or None if its sum is
        incomplete; the sum is freed either way."""
        total = self.sums.pop(req_id, None)
        if total is None or not total.complete or total.count == 0:
            return None
        return total.total / total.count

    def drop(self, req_id: str) -> None:
        self.sums.pop(req_id, None)
