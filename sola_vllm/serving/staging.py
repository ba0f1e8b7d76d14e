"""Host-to-device copies inside a forward without a stream sync: the per-step token slots, and
the index arrays of mean-key pooling.

`tensor.copy_(cpu_tensor)` from pageable memory synchronizes the CUDA stream: inside a forward
(the route layer runs between captured pieces) every step would wait there for the layers
before it. The values go instead through a pinned buffer and a non-blocking copy; before the
buffer is written again, the event recorded after the previous copy is waited on (by then
normally long complete: the step ended with sampling).
"""

from __future__ import annotations

import numpy as np
import torch


def device_index(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """An int64 numpy index array on `device`: a non-blocking copy from pageable memory is
    staged by the driver at once and waits for nothing on the stream."""
    return torch.from_numpy(array).to(device, non_blocking=True)


class PinnedStaging:
    def __init__(self, capacity: int, dtype: torch.dtype):
        self.host = torch.empty(capacity, dtype=dtype, pin_memory=True)
        self.copied = torch.cuda.Event()
        self.pending = False

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst (CUDA) <- src (CPU, at most `capacity` values), in stream order."""
        num = src.shape[0]
        if self.pending:
            self.copied.synchronize()  # the previous copy still reads the buffer
        self.host[:num].copy_(src)
        dst.copy_(self.host[:num], non_blocking=True)
        self.copied.record()
        self.pending = True
