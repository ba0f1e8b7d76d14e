"""Baselines for the editing benchmark.

`train_joint_lora` is what a user would otherwise reach for: ONE LoRA fine-tuned jointly on all
edits so far, with no routing (it applies to every prompt). It trains exactly like a single
edit (`train.py`): same layers and modules, same apply mask (from each prompt's last token on),
loss on the target tokens (EOS appended by default), only the upper layers run, the residual
entering the key layer computed once. It differs in rank (larger by default), data (every pair)
and schedule (epochs of shuffled minibatches). The result is an `Edit` with a single key;
`route_everything` makes the engine route every prompt to it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from ..config import RouterConfig
from ..edit import Edit, validate_id
from ..lora import apply_indices
from ..train import (
    _examples,
    _init_lora,
    _training_batch,
    residual_at_key_layer,
    upper_layers_only,
)

_JOINT_ID = "__joint_training__"
# Below float32's max (~3.4e38) so the kernels' fp32 threshold stays finite; any real distance
# (l2 or cosine) is far smaller, so `distance < threshold` always holds.
EVERYTHING_THRESHOLD = 3.0e38

Example = tuple[list[int], list[int]]  # (prompt ids, target ids)


@contextlib.contextmanager
def route_everything(engine) -> Iterator[None]:
    """Within the block, every prompt routes to its nearest active key whatever the distance
    (l2 metric, threshold ~float32 max). The previous router is put back on exit."""
    previous = engine.router
    engine.router = RouterConfig(metric="l2", threshold=EVERYTHING_THRESHOLD)
    try:
        yield
    finally:
        engine.router = previous


def train_joint_lora(engine, pairs: list[tuple[str, str]], *, rank: int = 16, epochs: int = 8,
                     batch_size: int = 32, lr: float = 2e-3, seed: int = 0,
                     edit_id: str = "lora-all",
                     on_epoch: Callable[[int, float], None] | None = None) -> Edit:
    """Fine-tune one LoRA of rank `rank` on every (prompt, target) pair; returns an `Edit` (not
    added) whose single key is the mean of the prompts' keys.

    Adam at `lr` over `epochs` epochs of minibatches of `batch_size` pairs, reshuffled each
    epoch; loss = mean cross-entropy over the minibatch's target tokens. `on_epoch(epoch,
    mean_loss)` is called after each epoch. Deterministic under `seed`.
    """
    _check_args(pairs, rank, epochs, batch_size, lr)
    edit_id = validate_id(edit_id)
    started = time.perf_counter()
    examples = _pair_examples(engine, pairs)
    residuals = _example_residuals(engine, examples, batch_size)  # each [len_i, H]
    keys = torch.stack([h[len(p) - 1] for h, (p, _) in zip(residuals, examples, strict=True)])
    key = keys.float().mean(0, keepdim=True)  # [1, H]
    lora = _init_joint_lora(engine, rank, seed, engine.config.train.init_std)
    info = _fit_joint(engine, examples, residuals, lora, epochs=epochs, batch_size=batch_size,
                      lr=lr, seed=seed, on_epoch=on_epoch)
    info.update(seconds=round(time.perf_counter() - started, 3), examples=len(examples))
    shape = engine.shape
    return Edit(
        id=edit_id, prompts=[p for p, _ in pairs],
        target=f"joint LoRA baseline over {len(pairs)} (prompt, target) pairs", keys=key,
        lora={n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in lora.items()},
        model_fingerprint=engine.model_fingerprint, shape_fingerprint=shape.fingerprint(),
        arch=shape.arch, layers=list(shape.layers), modules=list(shape.modules), rank=rank,
        scale=shape.scale, note="baseline: one LoRA fine-tuned on all pairs, no routing",
        train_info=info)


def _check_args(pairs, rank: int, epochs: int, batch_size: int, lr: float) -> None:
    if not pairs:
        raise ValueError("at least one (prompt, target) pair is needed")
    for name, value in (("rank", rank), ("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not (isinstance(lr, float | int) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")


def _pair_examples(engine, pairs: list[tuple[str, str]]) -> list[Example]:
    """Token ids of every pair, as `train_edit` builds them (EOS per the train config)."""
    append_eos = engine.config.train.append_eos
    return [_examples(engine, [prompt], target, append_eos)[1][0] for prompt, target in pairs]


def _example_residuals(engine, examples: list[Example], chunk: int) -> list[torch.Tensor]:
    """The residual entering the key layer for each example's prompt+target tokens, [len_i, H]
    each, computed once (in right-padded chunks; the padding does not reach real tokens)."""
    out = []
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        batch = _training_batch(part, engine.pad_token_id)
        h0 = residual_at_key_layer(engine, batch["input_ids"], batch["attention_mask"],
                                   batch["position_ids"])  # [b, T, H]
        out.extend(h0[row, :len(p) + len(t)].clone() for row, (p, t) in enumerate(part))
    return out


def _padded(residuals: list[torch.Tensor], width: int) -> torch.Tensor:
    """Stack per-example residuals right-padded with zeros to `width`: [B, width, H]."""
    first = residuals[0]
    h0 = first.new_zeros(len(residuals), width, first.shape[-1])
    for row, h in enumerate(residuals):
        h0[row, :h.shape[0]] = h
    return h0


def _minibatch(engine, examples: list[Example], residuals: list[torch.Tensor],
               idx: list[int]) -> dict[str, torch.Tensor]:
    """`_training_batch` of the chosen examples plus their cached residuals as `h0`."""
    batch = _training_batch([examples[i] for i in idx], engine.pad_token_id)
    batch["h0"] = _padded([residuals[i] for i in idx], batch["input_ids"].shape[1])
    return batch


def _init_joint_lora(engine, rank: int, seed: int,
                     init_std: float) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """`train._init_lora` at rank `rank`: A ~ N(0, init_std) [rank, in], B = 0 [out, rank]."""
    return _init_lora(engine, seed, init_std, rank)


def _step_loss(engine, backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens, the LoRA on every row (slot 0)."""
    slots = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
    engine.ctx.plan = [(_JOINT_ID, apply_indices(slots, batch["apply_mask"])[0])]
    hidden = backbone(inputs_embeds=batch["h0"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"], use_cache=False)[0]  # [B, T, H]
    lm_head = engine.model.get_output_embeddings()
    logits = lm_head(hidden[batch["label_rows"], batch["label_cols"]]).float()  # [N, vocab]
    return nn.functional.cross_entropy(logits, batch["labels"])


def _fit_joint(engine, examples, residuals, lora, *, epochs: int, batch_size: int, lr: float,
               seed: int, on_epoch: Callable[[int, float], None] | None) -> dict:
    """Adam over shuffled minibatches for `epochs` epochs; the adapter is dropped afterwards."""
    for name, (a, b) in lora.items():
        engine.modules[name].set_adapter(_JOINT_ID, a, b, engine.shape.scale)
    opt = torch.optim.Adam([t for pair in lora.values() for t in pair], lr=lr)
    gen = torch.Generator().manual_seed(seed)
    info = {"epochs": epochs, "steps": 0, "loss": float("nan")}
    try:
        with upper_layers_only(engine) as backbone:
            for epoch in range(epochs):
                order = torch.randperm(len(examples), generator=gen).tolist()
                losses = []
                for start in range(0, len(order), batch_size):
                    batch = _minibatch(engine, examples, residuals, order[start:start + batch_size])
                    loss = _step_loss(engine, backbone, batch)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    losses.append(loss.item())
                info.update(steps=info["steps"] + len(losses), loss=sum(losses) / len(losses))
                if on_epoch is not None:
                    on_epoch(epoch, info["loss"])
    finally:
        engine.ctx.plan = []
        for module in engine.modules.values():
            module.drop_adapter(_JOINT_ID)
    return info
