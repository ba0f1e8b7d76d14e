"""The CUDA half of "Apply": each token's routed edit slot (-1 = none) drives vLLM's Triton
`lora_shrink`/`lora_expand` ops (Punica's SGMV, arXiv 2310.18547) on SoLA's own stacked weights.

vLLM's metadata builder (`LoRAKernelMeta.prepare_tensors`) syncs with the host (`torch.all` read in
an `if`, `torch.unique`); `PunicaMeta.build` produces the same 7-tensor tuple from a device
`tok_slot` with sort/cumsum/scatter/where only, into preallocated buffers, so the whole step can
be captured in a CUDA graph. The kernels' grid is fixed at `max_segments` edit groups: CTAs whose
group id is -1 (the no-edit group and the padding) exit at once, so no host-side early exit is
needed. `punica_backend.PunicaBackend` wires it into SolaRuntime (ServingConfig.apply); under
CUDA graphs the router builds the metadata eagerly between captured pieces (`graphs`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # runtime.py builds its apply backend from this module
    from .runtime import LoraTarget

__all__ = ["PunicaMeta", "PunicaLoraStacks", "apply_punica", "apply_punica_ref"]

KERNEL_DTYPES = (torch.float16, torch.bfloat16)  # vLLM's launchers assert these


class PunicaMeta:
    """Kernel metadata for at most `max_tokens` tokens and `max_segments` distinct slot values
    per step (max_num_seqs + 1: one edit per request, plus -1).

    Buffers are allocated once; `build` rewrites them in place, so their addresses are stable
    across steps and CUDA-graph replays. Layout (that of `LoRAKernelMeta.meta_args`):
      token_lora_mapping               int32 [T]      copy of tok_slot
      token_indices_sorted_by_lora_ids int32 [T]      stable argsort of tok_slot
      num_tokens_per_lora              int32 [E]      tokens per group, 0 past the last group
      lora_token_start_loc             int32 [E + 1]  exclusive cumsum, 0 past the last group
      active_lora_ids                  int32 [E]      ascending slot per group, -1 padded
      no_lora_flag_cpu                 CPU bool [1]   always False: never decided on the host
      num_active_loras_cpu             CPU int32 [1]  always E: the grid's z size, fixed
    """

    def __init__(self, max_tokens: int, max_segments: int, device: torch.device | str = "cpu"):
        if max_tokens <= 0 or max_segments < 2:
            raise ValueError(f"need max_tokens > 0 and max_segments >= 2, got {max_tokens}, "
                             f"{max_segments}")
        self.max_tokens, self.max_segments = max_tokens, max_segments
        i32 = dict(dtype=torch.int32, device=device)
        self.token_lora_mapping = torch.full((max_tokens,), -1, **i32)
        self.token_indices_sorted = torch.zeros(max_tokens, **i32)
        self.num_tokens_per_lora = torch.zeros(max_segments, **i32)
        self.lora_token_start_loc = torch.zeros(max_segments + 1, **i32)
        self.active_lora_ids = torch.full((max_segments,), -1, **i32)
        self.segment_index = torch.arange(max_segments, dtype=torch.int64, device=device)
        # Read with .item() inside the (opaque) ops; constant, so a captured grid stays valid.
        self.no_lora_flag_cpu = torch.tensor([False], dtype=torch.bool, device="cpu")
        self.num_active_loras_cpu = torch.tensor([max_segments], dtype=torch.int32, device="cpu")

    def build(self, tok_slot: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """tok_slot: int [T] in [-1, num_slots), at most `max_segments` distinct values
        (more raises: an out-of-range scatter, a device-side assert on CUDA).
        Returns the metadata tuple to unpack into `lora_shrink`/`lora_expand`."""
        num_tokens = tok_slot.shape[0]
        if num_tokens > self.max_tokens:
            raise ValueError(f"{num_tokens} tokens exceed max_tokens={self.max_tokens}")
        mapping = self.token_lora_mapping[:num_tokens]
        mapping.copy_(tok_slot)
        srt, order = torch.sort(mapping, stable=True)  # [T]: -1 (no edit) first, like vLLM
        head = torch.ones_like(srt, dtype=torch.bool)  # [T]: first token of each group
        head[1:] = srt[1:] != srt[:-1]
        seg = torch.cumsum(head, 0) - 1  # [T] int64: group index of each sorted token
        self.token_indices_sorted[:num_tokens].copy_(order)
        # All tokens of a group write the same id, so the duplicate scatter is deterministic.
        self.active_lora_ids.fill_(-1).scatter_(0, seg, srt)
        self.num_tokens_per_lora.zero_().scatter_add_(0, seg, torch.ones_like(srt))
        ends = torch.cumsum(self.num_tokens_per_lora, 0)  # [E]
        in_use = self.segment_index < head.sum()  # 0-dim count, never read on the host
        self.lora_token_start_loc[1:].copy_(torch.where(in_use, ends, 0))
        return self.meta_args(num_tokens)

    def meta_args(self, num_tokens: int) -> tuple[torch.Tensor, ...]:
        return (self.token_lora_mapping[:num_tokens], self.token_indices_sorted[:num_tokens],
                self.num_tokens_per_lora, self.lora_token_start_loc, self.active_lora_ids,
                self.no_lora_flag_cpu, self.num_active_loras_cpu)


class PunicaLoraStacks:
    """Every edited module's slot-stacked LoRA weights in the model dtype, for the kernels.

    a[name]: [S, r_max, in], b[name]: [S, out, r_max] with the edit's scale folded into B (as
    vLLM's `LoRALayerWeights.optimize` does), zero-padded past each edit's rank. Written in place
    only: vLLM's launchers cache the weights' `data_ptr`s (`_LORA_A/B_PTR_DICT`), and a captured
    graph holds them too. `groups` are `SolaRuntime.targets`: per vLLM linear, its targets.
    """

    def __init__(self, groups: Sequence[Sequence[LoraTarget]], max_slots: int, max_rank: int,
                 max_tokens: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        if dtype not in KERNEL_DTYPES:
            raise ValueError(f"vLLM's LoRA kernels need fp16 or bf16 weights, got {dtype}")
        self.max_slots, self.max_rank, self.max_tokens, self.dtype = (max_slots, max_rank,
                                                                      max_tokens, dtype)
        self.a: dict[str, torch.Tensor] = {}
        self.b: dict[str, torch.Tensor] = {}
        for group in groups:
            for t in group:
                self.a[t.name] = torch.zeros(max_slots, max_rank, t.in_features, dtype=dtype,
                                             device=device)
                self.b[t.name] = torch.zeros(max_slots, t.out_features, max_rank, dtype=dtype,
                                             device=device)
        max_slices = max((len(g) for g in groups), default=0)
        # Flat, so that the [n, T, r_max] view the shrink writes is contiguous for every T.
        self._scratch = torch.empty(max_slices * max_tokens * max_rank, dtype=torch.float32,
                                    device=device)

    def set_slot(self, slot: int, name: str, a: torch.Tensor, b: torch.Tensor, rank: int,
                 scale: float) -> None:
        """a: [rank, in] (PEFT lora_A), b: [out, rank] (PEFT lora_B); stores a and b * scale."""
        if name not in self.a:
            raise KeyError(f"no edited module {name!r}")
        stack_a, stack_b = self.a[name], self.b[name]
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is outside [0, {self.max_slots})")
        if not 0 < rank <= self.max_rank:
            raise ValueError(f"rank {rank} is outside [1, {self.max_rank}]")
        if tuple(a.shape) != (rank, stack_a.shape[2]) or tuple(b.shape) != (stack_b.shape[1],
                                                                               rank):
            raise ValueError(f"{name}: A {tuple(a.shape)} and B {tuple(b.shape)} do not fit "
                             f"rank {rank}, in {stack_a.shape[2]}, out {stack_b.shape[1]}")
        stack_a[slot].zero_()[:rank].copy_(a)
        stack_b[slot].zero_()[:, :rank].copy_(b.float() * scale)  # scale in fp32, then round

    def clear_slot(self, slot: int) -> None:
        for name in self.a:
            self.a[name][slot].zero_()
            self.b[name][slot].zero_()

    def scratch(self, num_slices: int, num_tokens: int) -> torch.Tensor:
        """A contiguous fp32 [num_slices, num_tokens, r_max] view of the shrink's scratch."""
        size = num_slices * num_tokens * self.max_rank
        return self._scratch[:size].view(num_slices, num_tokens, self.max_rank)


def _expand_runs(targets: Sequence[LoraTarget]) -> list[tuple[int, int]]:
    """Maximal runs of targets whose output columns follow each other: one expand each, since
    the kernel places slice i at offset_start + sum(out[:i]). vLLM caches offset_start with
    the pointers, keyed by the B `data_ptr`s alone: a B stack must always be expanded at the
    same offset (it is: a target's offset never changes)."""
    runs, start = [], 0
    for i in range(1, len(targets) + 1):
        if i == len(targets) or (targets[i].offset
                                 != targets[i - 1].offset + targets[i - 1].out_features):
            runs.append((start, i))
            start = i
    return runs


def _vllm_ops() -> tuple[Callable, Callable]:
    # Lazy: importing the op modules registers torch.ops.vllm.lora_*. On the CPU wheel they
    # exist but cannot launch: HAS_TRITON is False there and triton.jit is a no-op placeholder.
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:
        raise RuntimeError("vLLM's Triton LoRA kernels are unavailable (vllm.triton_utils."
                           "HAS_TRITON is False): use SolaRuntime.apply on CPU")
    from vllm.lora.ops.triton_ops import lora_expand, lora_shrink

    return lora_shrink, lora_expand


def apply_punica(y: torch.Tensor, x: torch.Tensor, meta: tuple[torch.Tensor, ...],
                 stacks: PunicaLoraStacks, targets: Sequence[LoraTarget], *,
                 shrink: Callable | None = None, expand: Callable | None = None) -> None:
    """Semantics (s = meta[0][t], the token's slot; A, B = stacks.a/b, B already scaled):
        for t where s != -1, for g in targets:
            y[t, g.offset : g.offset + g.out_features] += (x[t] @ A[g][s].T) @ B[g][s].T
    y: [T, out_total] model dtype, contiguous, updated in place (other rows/columns untouched);
    x: [T, in] model dtype; meta: `PunicaMeta.build(tok_slot)` for the same T.
    No host sync: the grid is fixed and CTAs of the -1 group exit in the kernel. Launch once
    before graph capture (vLLM's warm-up does): the first call per weight set copies a pointer
    table to the device. `shrink`/`expand` default to torch.ops.vllm.lora_shrink/lora_expand.
    """
    num_tokens = x.shape[0]
    if num_tokens == 0 or not targets:
        return
    if y.shape[0] != num_tokens or meta[0].shape[0] != num_tokens:
        raise ValueError(f"y has {y.shape[0]} rows, x {num_tokens}, meta {meta[0].shape[0]}")
    if not (x.dtype == y.dtype == stacks.dtype):
        raise ValueError(f"x {x.dtype}, y {y.dtype} and weights {stacks.dtype} must match")
    if not y.is_contiguous():  # the expand writes through y's strides from offset_start
        raise ValueError("y must be contiguous")
    if shrink is None or expand is None:
        shrink, expand = _vllm_ops()
    buf = stacks.scratch(len(targets), num_tokens)  # [n, T, r_max] fp32, zeroed by the shrink
    shrink(x, [stacks.a[t.name] for t in targets], buf, *meta, 1.0)
    for start, stop in _expand_runs(targets):
        expand(buf[start:stop], [stacks.b[t.name] for t in targets[start:stop]], y, *meta,
               offset_start=targets[start].offset, add_inputs=True)


def apply_punica_ref(y: torch.Tensor, x: torch.Tensor, tok_slot: torch.Tensor,
                     stacks: PunicaLoraStacks, targets: Sequence[LoraTarget]) -> None:
    """`apply_punica` in torch, one matmul pair per distinct slot (host syncs allowed).
    Rounds where the kernels do: the fp32 shrink output is cast to the weight dtype before
    the expand, and the expand's fp32 result is cast to y's dtype before it is added."""
    for slot in torch.unique(tok_slot[tok_slot >= 0]).tolist():
        idx = (tok_slot == slot).nonzero().squeeze(1)  # [n]
        xs = x[idx].float()  # [n, in]
        for t in targets:
            h = (xs @ stacks.a[t.name][slot].float().T).to(stacks.dtype).float()  # [n, r_max]
            delta = (h @ stacks.b[t.name][slot].float().T).to(y.dtype)  # [n, out]
            cols = slice(t.offset, t.offset + t.out_features)
            y[idx, cols] = y[idx, cols] + delta
