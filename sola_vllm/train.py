"""Training one edit (SoLA §3.3, arXiv 2603.11239): a fresh LoRA on the frozen base model.

The LoRA acts from each prompt's last token on (decision 2), exactly as at serving time; the loss
is cross-entropy on the target tokens. The residual stream entering the first edited layer never
changes during training (no LoRA below it), so it is computed once and training runs only the
upper layers. Keys are that same residual, in fp32, at each prompt's last token.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from .chat_form import prompt_forms, with_chat_forms
from .config import TrainConfig
from .edit import Edit, lora_name, new_id, validate_id
from .keys import pool_keys

_TRAIN_ID = "__training__"


class _StopForward(Exception):
    pass


def target_ids(engine, prompt: str, target: str, append_eos: bool) -> list[int]:
    """Token ids of the target continuation. A space joins prompt and target unless one of
    them already has whitespace at the seam."""
    if not isinstance(target, str) or target.strip() == "":
        raise ValueError("target must be a non-empty string")
    seam = "" if target[0].isspace() or prompt[-1].isspace() else " "
    ids = engine.tokenizer(seam + target, add_special_tokens=False).input_ids
    eos = engine.tokenizer.eos_token_id
    return ids + ([eos] if append_eos and eos is not None else [])


def residual_at_key_layer(engine, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """Hidden states entering the first edited layer, [B, T, H], with no LoRA anywhere."""
    layer = engine.shape.key_layer
    return residuals_at(engine, [layer], input_ids, attention_mask, position_ids)[layer]


def residuals_at(engine, layers, input_ids, attention_mask,
                 position_ids) -> dict[int, torch.Tensor]:
    """Hidden states entering each of `layers` ([B, T, H] each), with no LoRA anywhere; the
    forward stops at the deepest of them."""
    captured, last = {}, max(layers)

    def grab(layer):
        def hook(module, args, kwargs):
            captured[layer] = (args[0] if args else kwargs["hidden_states"]).detach()
            if layer == last:
                raise _StopForward
        return hook

    handles = [engine.decoder_layers[layer].register_forward_pre_hook(
        grab(layer), with_kwargs=True, prepend=True) for layer in set(layers)]
    try:
        with torch.no_grad(), contextlib.suppress(_StopForward):
            engine.model(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def keys_and_h0(engine, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """For a training batch: each row's routing key (fp32 [B, H], read as the engine's shape
    says, `keys.pool_keys`) and the residual entering the first edited layer ([B, T, H])."""
    shape = engine.shape
    states = residuals_at(engine, [shape.route_layer, shape.key_layer], batch["input_ids"],
                          batch["attention_mask"], batch["position_ids"])
    keys = pool_keys(states[shape.route_layer], batch["attention_mask"], batch["key_pos"],
                     shape.key_pool)
    return keys.clone(), states[shape.key_layer]


class _ZeroPositions(nn.Module):
    """Stands in for GPT-2's `wpe` so the cached residual is not given positions twice."""

    def __init__(self, like: nn.Embedding):
        super().__init__()
        self.dim, self.dtype = like.embedding_dim, like.weight.dtype

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*position_ids.shape, self.dim, dtype=self.dtype)


@contextlib.contextmanager
def upper_layers_only(engine):
    """Make the backbone start at the key layer: `inputs_embeds` is then the residual entering
    it. Layers below are detached for the duration and put back afterwards."""
    spec = engine.spec
    backbone = getattr(engine.model, spec.backbone)
    full = engine.decoder_layers
    first = engine.shape.key_layer
    setattr(backbone, spec.layers, nn.ModuleList(list(full)[first:]))
    hf_config = engine.model.config
    layer_types = getattr(hf_config, "layer_types", None)  # Qwen2/3 index these by loop position
    if layer_types is not None:
        hf_config.layer_types = list(layer_types)[first:]
    positions = getattr(backbone, spec.absolute_positions) if spec.absolute_positions else None
    if positions is not None:
        setattr(backbone, spec.absolute_positions, _ZeroPositions(positions))
    try:
        yield backbone
    finally:
        setattr(backbone, spec.layers, full)
        if layer_types is not None:
            hf_config.layer_types = layer_types
        if positions is not None:
            setattr(backbone, spec.absolute_positions, positions)


def _examples(engine, prompts: list[str], target: str, append_eos: bool,
              chat_form: bool = False):
    """(prompts, [(prompt ids, target ids)]): with `chat_form`, each prompt's chat form is
    added after the given prompts (`chat_form.with_chat_forms`)."""
    if not prompts:
        raise ValueError("at least one prompt is needed")
    if chat_form:
        prompts = with_chat_forms(engine.tokenizer, prompts)
    examples = []
    for prompt in prompts:
        p_ids, t_ids = engine.encode(prompt), target_ids(engine, prompt, target, append_eos)
        if len(p_ids) + len(t_ids) > engine.max_positions:
            raise ValueError(f"prompt plus target is {len(p_ids) + len(t_ids)} tokens; the "
                             f"model's context is {engine.max_positions} tokens")
        examples.append((p_ids, t_ids))
    return list(prompts), examples


def _training_batch(examples, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+target rows; labels at the positions that predict target tokens."""
    width = max(len(p) + len(t) for p, t in examples)
    ids, mask, key_pos, rows, cols, labels = [], [], [], [], [], []
    for row, (p, t) in enumerate(examples):
        seq = p + t
        ids.append(seq + [pad_id] * (width - len(seq)))
        mask.append([1] * len(seq) + [0] * (width - len(seq)))
        key_pos.append(len(p) - 1)
        for j, token in enumerate(t):
            rows.append(row)
            cols.append(len(p) - 1 + j)
            labels.append(token)
    mask_t = torch.tensor(mask)
    key_t = torch.tensor(key_pos)
    apply = (torch.arange(width)[None, :] >= key_t[:, None]) & mask_t.bool()  # [B, T]
    return {"input_ids": torch.tensor(ids), "attention_mask": mask_t,
            "position_ids": torch.arange(width)[None, :].expand(len(examples), -1),
            "key_pos": key_t, "apply_mask": apply, "label_rows": torch.tensor(rows),
            "label_cols": torch.tensor(cols), "labels": torch.tensor(labels)}


def _init_lora(engine, seed: int, init_std: float,
               rank: int | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A ~ N(0, init_std) [rank, in], B = 0 [out, rank] per edited module (rank: the edits')."""
    gen = torch.Generator().manual_seed(seed)
    rank, lora = rank or engine.shape.rank, {}
    for layer in engine.shape.layers:
        for module in engine.shape.modules:
            name = lora_name(layer, module)
            m = engine.modules[name]
            a = (torch.randn(rank, m.in_features, generator=gen) * init_std).requires_grad_()
            b = torch.zeros(m.out_features, rank, requires_grad=True)
            lora[name] = (a, b)
    return lora


def _optimizer(config: TrainConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr)
    return torch.optim.SGD(params, lr=config.lr, momentum=0.9)


def _schedule(config: TrainConfig, opt: torch.optim.Optimizer):
    if config.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.steps)
    return None


def _step(opt: torch.optim.Optimizer, schedule, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if schedule is not None:
        schedule.step()


def _fit(engine, batch, lora, config: TrainConfig, on_step: Callable | None) -> dict:
    """Optimise the LoRA; stops early once every target token is the argmax and loss is low."""
    from .lora import apply_indices

    for name, (a, b) in lora.items():
        engine.modules[name].set_adapter(_TRAIN_ID, a, b, engine.shape.scale)
    slots = torch.zeros(batch["input_ids"].shape[0], dtype=torch.long)
    engine.ctx.plan = [(_TRAIN_ID, apply_indices(slots, batch["apply_mask"])[0])]
    opt = _optimizer(config, [t for pair in lora.values() for t in pair])
    schedule = _schedule(config, opt)
    lm_head = engine.model.get_output_embeddings()
    info = {"steps": 0, "loss": float("nan"), "fit": False}
    try:
        with upper_layers_only(engine) as backbone:
            for step in range(config.steps + 1):
                hidden = backbone(inputs_embeds=batch["h0"], attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"], use_cache=False)[0]
                logits = lm_head(hidden[batch["label_rows"], batch["label_cols"]]).float()
                loss = nn.functional.cross_entropy(logits, batch["labels"])
                correct = bool((logits.argmax(-1) == batch["labels"]).all())
                info.update(steps=step, loss=loss.item(), fit=correct)
                if on_step is not None:
                    on_step(step, info["loss"])
                if step == config.steps or (correct and info["loss"] < config.stop_loss):
                    break
                _step(opt, schedule, loss)
    finally:
        engine.ctx.plan = []
        for module in engine.modules.values():
            module.drop_adapter(_TRAIN_ID)
    return info


def train_edit(engine, prompts: list[str] | str, target: str, *, edit_id: str | None = None,
               config: TrainConfig | None = None, author: str = "", note: str = "",
               on_step: Callable[[int, float], None] | None = None) -> Edit:
    """Train one edit on `engine`'s frozen base model; returns the frozen `Edit` (not added).

    `prompts`: one or more phrasings; each one's key (read as the engine's shape says) becomes
    a routing key; with `config.chat_form` each one's chat form is trained and keyed too.
    `target`: the continuation the edited model must produce (EOS appended by default).
    Deterministic under `config.seed`.
    """
    config = config or engine.config.train
    edit_id = validate_id(edit_id) if edit_id is not None else new_id()
    given = [prompts] if isinstance(prompts, str) else list(prompts)
    prompts, examples = _examples(engine, given, target, config.append_eos, config.chat_form)
    started = time.perf_counter()
    batch = _training_batch(examples, engine.pad_token_id)
    keys, batch["h0"] = keys_and_h0(engine, batch)  # [B, H] fp32, [B, T, H]
    lora = _init_lora(engine, config.seed, config.init_std)
    info = _fit(engine, batch, lora, config, on_step)
    info["seconds"] = round(time.perf_counter() - started, 3)
    if config.chat_form:  # read by `default_config`: such a store trains chat forms too
        info["chat_form"] = True
    shape = engine.shape
    return Edit(
        id=edit_id, prompts=prompts, target=target, keys=keys,
        lora={n: (a.detach().clone(), b.detach().clone()) for n, (a, b) in lora.items()},
        model_fingerprint=engine.model_fingerprint, shape_fingerprint=shape.fingerprint(),
        arch=shape.arch, layers=list(shape.layers), modules=list(shape.modules),
        rank=shape.rank, scale=shape.scale, key_pool=shape.key_pool,
        route_layer=shape.route_layer, author=author, note=note, train_info=info,
        key_forms=prompt_forms(given, prompts))
