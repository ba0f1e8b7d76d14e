"""Per physical KV block: the fp32 sum of the route layer's states it holds (mean keys with
prefix caching).

A prefix-cache hit skips computing the request's first blocks, so their states never reach the
router; a pooled key needs them. Their sums are kept here, indexed like the KV cache: entry b
is the sum (and count) of the states at prompt positions >= 1 (position 0 is never pooled in a
multi-token prompt) whose KV sits in block b. An entry is reset when the block's first slot is
computed (a freed block is reused for other content) and may be filled over several prefill
chunks. Memory: d * 4 bytes per block, sized on first use from the number of KV blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from .staging import device_index


class BlockSums:
    def __init__(self, hidden_size: int):
        self.hidden_size = hidden_size
        self.block_size = 0
        self.sums: torch.Tensor | None = None  # [num_blocks, d] fp32, on the model's device
        self.counts = np.zeros(0, dtype=np.int64)  # [num_blocks]: positions summed

    def write(self, hidden: torch.Tensor, step) -> None:
        """Add the step's computed tokens to their blocks' sums (`StepMeta.row_blocks`: the
        rows' block tables; a step without them writes nothing)."""
        if step.row_blocks is None or step.num_tokens == 0:
            return
        rows, pos = step.tok_row, step.tok_pos
        self.block_size = step.block_size
        blocks = step.row_blocks[rows, pos // step.block_size].astype(np.int64)  # [T]
        self._fit(int(blocks.max()) + 1, step.num_kv_blocks, hidden.device)
        starts = np.unique(blocks[pos % step.block_size == 0])  # first slot computed: reuse
        on = hidden.device
        if starts.size:
            self.sums.index_fill_(0, device_index(starts, on), 0.0)
            self.counts[starts] = 0
        pooled = np.flatnonzero(pos >= 1)
        if pooled.size:
            self.sums.index_add_(0, device_index(blocks[pooled], on),
                                 hidden[device_index(pooled, on)].float())
            np.add.at(self.counts, blocks[pooled], 1)

    def prefix(self, block_ids: np.ndarray) -> torch.Tensor | None:
        """The fp32 sum [d] of positions 1..p0-1 held by a request's first blocks `block_ids`
        (its prefix-cache hits, p0 = len * block_size), or None if one of them was not summed
        whole (its states cannot be recovered: the key would be incomplete)."""
        block_ids = np.asarray(block_ids, dtype=np.int64)
        if self.sums is None or block_ids.size == 0 or block_ids.max() >= len(self.counts):
            return None
        expected = np.full(block_ids.size, self.block_size, dtype=np.int64)
        expected[0] -= 1  # position 0
        if not np.array_equal(self.counts[block_ids], expected):
            return None
        return self.sums[device_index(block_ids, self.sums.device)].sum(dim=0)

    def _fit(self, needed: int, num_kv_blocks: int, device) -> None:
        """Size the buffer on first use (the KV cache's block count is known only after its
        start); grow it if a block id ever lies beyond (kept entries stay)."""
        size = 0 if self.sums is None else self.sums.shape[0]
        if needed <= size:
            return
        new = max(needed, num_kv_blocks)
        sums = torch.zeros(new, self.hidden_size, dtype=torch.float32, device=device)
        counts = np.zeros(new, dtype=np.int64)
        if self.sums is not None:
            sums[:size] = self.sums
            counts[:size] = self.counts
        self.sums, self.counts = sums, counts
