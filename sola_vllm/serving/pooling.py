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
- prefix-cache hits (the request's first p0 tokens, whole KV blocks, never reach the router):
  `BlockSums` keeps, beside the KV cache, each physical KV block's fp32 sum of the states at
  positions >= 1 it holds, written when its tokens are computed and reset when its first slot
  is computed again (blocks are reused for other content). vLLM reuses a block only when its
  content hash matches, and the prefix-cache guard (`runner_hooks`) keeps blocks holding a key
  token or generated tokens private, so a hit block's sum is what this request would have
  summed: a sum that starts at p0 > 0 on a block boundary starts from its hit blocks' sums
  (count p0 - 1: position 0 is not pooled);
- any other skipped positions (or a hit block whose sum is not whole): the key is incomplete;
  `take` then returns None and the runtime routes the request to no edit (never a guess).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .block_sums import BlockSums
from .staging import device_index


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
        self.blocks = BlockSums(hidden_size)  # per KV block (prefix-cache hits)

    def accumulate(self, hidden: torch.Tensor, step, pending: np.ndarray) -> None:
        """Add this step's pooled prompt positions of the `pending` rows (bool [n]: requests
        not routed yet) to their sums. hidden: [>= step.num_tokens, d], the route layer's
        input for the step's tokens in order (`StepMeta`)."""
        # first: a request may hit blocks that another computes in this very step
        self.blocks.write(hidden, step)
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
        sums = [self._begin(step, int(row), int(first[row]), hidden) for row in seen]
        pooled = np.flatnonzero(prompt & ((pos >= 1) | (key_pos == 0)))
        counts = np.bincount(rows[pooled], minlength=n)
        part = torch.zeros(n, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        if pooled.size:
            on = hidden.device
            part.index_add_(0, device_index(rows[pooled], on),
                            hidden[device_index(pooled, on)].float())
        for row, total in zip(seen, sums, strict=True):
            total.total += part[row]
            total.count += int(counts[row])
            total.next_pos = int(last[row]) + 1

    def _begin(self, step, row: int, first: int, hidden: torch.Tensor) -> _Sum:
        """The sum that row `row`'s chunk (starting at prompt position `first`) adds to."""
        req_id = step.req_ids[row]
        total = self.sums.get(req_id)
        if total is None or first < total.next_pos:  # new, or recomputed from earlier: restart
            total = _Sum(torch.zeros(self.hidden_size, dtype=torch.float32,
                                     device=hidden.device))
            self.sums[req_id] = total
            if first > 0:  # its first blocks were prefix-cache hits
                self._start_from_blocks(total, step, row, first)
        if first > total.next_pos:  # positions skipped: the key would miss their states
            total.complete = False
        return total

    def _start_from_blocks(self, total: _Sum, step, row: int, first: int) -> None:
        """Start a new sum at prompt position `first` from the sums of the KV blocks holding
        positions 0..first-1 (whole blocks, from its block table); left as is (incomplete,
        see `_begin`) when that is not possible."""
        size = step.block_size
        if step.row_blocks is None or size <= 0 or first % size:
            return
        prefix = self.blocks.prefix(step.row_blocks[row, : first // size])
        if prefix is not None:
            total.total += prefix
            total.count = first - 1  # position 0 is not pooled
            total.next_pos = first

    def take(self, req_id: str) -> torch.Tensor | None:
        """The request's pooled query (fp32 [d]) at its key token, or None if its sum is
        incomplete; the sum is freed either way."""
        total = self.sums.pop(req_id, None)
        if total is None or not total.complete or total.count == 0:
            return None
        return total.total / total.count

    def drop(self, req_id: str) -> None:
        self.sums.pop(req_id, None)
