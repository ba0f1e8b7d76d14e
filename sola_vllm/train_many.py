"""Training many edits at once: each edit keeps its own LoRA, optimizer state and early stop,
but their rows share one forward and backward pass (SoLA, arXiv 2603.11239: edits are
independent LoRAs on the frozen base model, so they can be trained side by side).

Rows never interact (attention stays inside a row, each edit's LoRA acts only on its own rows),
and the loss is the sum of each edit's own mean cross-entropy, so every edit receives exactly
the gradient of its own loss; Adam and SGD-with-momentum are element-wise, so one optimizer
over all LoRAs updates each as its own would. An edit that has fitted leaves the plan, so its
weights stop moving, exactly as `train_edit` stops. Results match `train_edit` up to the
rounding of batched matmuls (tested).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .chat_form import prompt_forms
from .config import TrainConfig
from .edit import Edit, validate_id
from .train import (
    _examples,
    _init_lora,
    _optimizer,
    _schedule,
    _training_batch,
    keys_and_h0,
    upper_layers_only,
)


@dataclass(frozen=True)
class EditRequest:
    edit_id: str
    prompts: tuple[str, ...]
    target: str
    note: str = ""


def train_edits(engine, requests: list[EditRequest], config: TrainConfig | None = None,
                chunk: int = 16) -> list[Edit]:
    """Train every request's edit on `engine`'s frozen base model, `chunk` edits per pass."""
    config = config or engine.config.train
    out = []
    for start in range(0, len(requests), chunk):
        out += _train_chunk(engine, requests[start:start + chunk], config)
    return out


def _train_chunk(engine, requests: list[EditRequest], config: TrainConfig) -> list[Edit]:
    started = time.perf_counter()
    rows_of, examples, prompts_of = [], [], []
    for req in requests:
        validate_id(req.edit_id)
        prompts, ex = _examples(engine, list(req.prompts), req.target, config.append_eos,
                                config.chat_form)
        rows_of.append(list(range(len(examples), len(examples) + len(ex))))
        examples += ex
        prompts_of.append(prompts)
    batch = _training_batch(examples, engine.pad_token_id)
    keys, batch["h0"] = keys_and_h0(engine, batch)  # [B, H] fp32, [B, T, H]
    loras = [_init_lora(engine, config.seed, config.init_std) for _ in requests]
    infos = _fit_many(engine, batch, rows_of, loras, config)
    seconds = round((time.perf_counter() - started) / len(requests), 3)
    shape = engine.shape
    edits = []
    for req, rows, prompts, lora, info in zip(requests, rows_of, prompts_of, loras, infos,
                                              strict=True):
        edits.append(Edit(
            id=req.edit_id, prompts=prompts, target=req.target, keys=keys[rows].clone(),
            lora={n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in lora.items()},
            model_fingerprint=engine.model_fingerprint, shape_fingerprint=shape.fingerprint(),
            arch=shape.arch, layers=list(shape.layers), modules=list(shape.modules),
            rank=shape.rank, scale=shape.scale, key_pool=shape.key_pool,
            route_layer=shape.route_layer, note=req.note,
            key_forms=prompt_forms(list(req.prompts), prompts),
            train_info={**info, "seconds": seconds, "batched": len(requests),
                        **({"chat_form": True} if config.chat_form else {})}))
    return edits


def _plan(batch, rows_of, live: list[int]) -> list[tuple[str, torch.Tensor]]:
    """Each live edit's flat token indices: its rows, from the key token on."""
    plan = []
    for i in live:
        mask = torch.zeros_like(batch["apply_mask"])
        mask[rows_of[i]] = batch["apply_mask"][rows_of[i]]
        plan.append((_adapter(i), mask.reshape(-1).nonzero().squeeze(1)))
    return plan


def _adapter(i: int) -> str:
    return f"__training_{i}__"


def _fit_many(engine, batch, rows_of, loras, config: TrainConfig) -> list[dict]:
    label_owner = _label_owner(batch, rows_of)  # [num_labels] edit index of each label
    for i, lora in enumerate(loras):
        for name, (a, b) in lora.items():
            engine.modules[name].set_adapter(_adapter(i), a, b, engine.shape.scale)
    opt = _optimizer(config, [t for lora in loras for pair in lora.values() for t in pair])
    schedule = _schedule(config, opt)
    infos = [{"steps": 0, "loss": float("nan"), "fit": False} for _ in loras]
    live = list(range(len(loras)))
    lm_head = engine.model.get_output_embeddings()
    try:
        with upper_layers_only(engine) as backbone:
            for step in range(config.steps + 1):
                engine.ctx.plan = _plan(batch, rows_of, live)
                hidden = backbone(inputs_embeds=batch["h0"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"], use_cache=False)[0]
                logits = lm_head(hidden[batch["label_rows"], batch["label_cols"]]).float()
                token_loss = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
                hits = logits.argmax(-1) == batch["labels"]
                losses, still, left = [], [], []
                for i in live:
                    mine = label_owner == i
                    loss, fit = token_loss[mine].mean(), bool(hits[mine].all())
                    infos[i].update(steps=step, loss=loss.item(), fit=fit)
                    if step == config.steps or (fit and loss.item() < config.stop_loss):
                        left.append(i)  # done: leaves the plan, its weights stop here
                        continue
                    losses.append(loss)
                    still.append(i)
                live = still
                if not live:
                    break
                _step_live(opt, schedule, torch.stack(losses).sum(),
                           [t for i in left for pair in loras[i].values() for t in pair])
    finally:
        engine.ctx.plan = []
        for module in engine.modules.values():
            for i in range(len(loras)):
                module.drop_adapter(_adapter(i))
    return infos


def _step_live(opt, schedule, loss: torch.Tensor, left: list[torch.Tensor]) -> None:
    """`train._step` for the live edits only. An edit that left at this step was still in its
    forward, so its LoRA gets an exact-zero gradient rather than none, and Adam (or momentum)
    would move it one more step on its running averages: its gradients are dropped first."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for t in left:
        t.grad = None
    opt.step()
    if schedule is not None:
        schedule.step()


def _label_owner(batch, rows_of) -> torch.Tensor:
    owner_of_row = torch.empty(batch["input_ids"].shape[0], dtype=torch.long)
    for i, rows in enumerate(rows_of):
        owner_of_row[rows] = i
    return owner_of_row[batch["label_rows"]]
