"""What a CUDA graph would capture of a piece of code, recorded on any device.

A CUDA graph freezes, per kernel launch, the grid and the arguments (tensor addresses and
scalars), and replays those launches only: host code in between is not run again. So code can
be captured once and replayed for later steps exactly when every later step makes the same
launches with the same grids, scalars and addresses, and allocates nothing (an allocation
inside a graph is pinned to the captured address).

`LaunchRecorder` records, while active, every aten op (torch's dispatcher) and every Triton
launch of the kernels it wraps, as signatures: the op or kernel, and its arguments with
tensors as (storage address, offset, shape, stride, dtype) and scalars by value. Two
recordings are the same graph when their signatures are equal. `replay` re-runs the recorded
launches with the recorded arguments, as a graph replay would.
"""

from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def signature(value):
    """A hashable description of an argument as a graph would freeze it."""
    if isinstance(value, torch.Tensor):
        return ("tensor", value.untyped_storage().data_ptr(), value.storage_offset(),
                tuple(value.shape), tuple(value.stride()), value.dtype, value.device.type)
    if isinstance(value, (list, tuple)):
        return tuple(signature(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, signature(v)) for k, v in value.items()))
    if isinstance(value, (int, float, bool, str, type(None), torch.dtype, torch.device)):
        return value
    return type(value).__name__


def _storages(value) -> set[int]:
    if isinstance(value, torch.Tensor):
        return {value.untyped_storage().data_ptr()}
    if isinstance(value, (list, tuple)):
        return set().union(*(_storages(v) for v in value)) if value else set()
    if isinstance(value, dict):
        return _storages(list(value.values()))
    return set()


class _Mode(TorchDispatchMode):
    def __init__(self, recorder: LaunchRecorder):
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rec = self.recorder
        if rec.active and not rec.in_kernel:
            rec.events.append(("aten", str(func), signature(args), signature(kwargs)))
            rec.calls.append((func, args, kwargs))
            new = _storages(out) - _storages(args) - _storages(kwargs)
            if new:
                rec.allocations.append(str(func))
        return out


class _Kernel:
    """Stands in for a Triton kernel in its module: `kernel[grid](*args, **kwargs)`."""

    def __init__(self, kernel, name: str, recorder: LaunchRecorder):
        self.kernel, self.name, self.recorder = kernel, name, recorder

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            rec = self.recorder
            if rec.active:
                rec.events.append(("kernel", self.name, tuple(grid), signature(args),
                                   signature(kwargs)))
                rec.calls.append((self.kernel[grid], args, kwargs))
            rec.in_kernel += 1  # the interpreter's own host copies are not launches
            try:
                return self.kernel[grid](*args, **kwargs)
            finally:
                rec.in_kernel -= 1

        return launch


class LaunchRecorder:
    def __init__(self, modules: list, kernel_names: tuple[str, ...]):
        """modules: where the kernels are module globals (vLLM's `lora_shrink_op`, ...);
        kernel_names: the globals to wrap (those absent from a module are skipped)."""
        self.events: list[tuple] = []
        self.calls: list[tuple] = []
        self.allocations: list[str] = []
        self.active = False
        self.in_kernel = 0
        self._wrapped = []
        for module in modules:
            for name in kernel_names:
                kernel = getattr(module, name, None)
                if kernel is not None:
                    self._wrapped.append((module, name, kernel))
                    setattr(module, name, _Kernel(kernel, name, self))

    def restore(self) -> None:
        for module, name, kernel in self._wrapped:
            setattr(module, name, kernel)

    @contextlib.contextmanager
    def recording(self):
        """Record what the block runs; the recording replaces the previous one."""
        self.events, self.calls, self.allocations = [], [], []
        self.active = True
        try:
            with _Mode(self):
                yield self
        finally:
            self.active = False

    def launches(self) -> int:
        return sum(e[0] == "kernel" for e in self.events)

    def replay(self) -> None:
        """Re-run the recorded launches and ops with their recorded arguments (no host code
        in between): what replaying a graph of the recording does."""
        for fn, args, kwargs in self.calls:
            fn(*args, **kwargs)
