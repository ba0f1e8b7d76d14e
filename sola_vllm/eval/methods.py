"""The methods an evaluation compares, on the same data and model.

- `base`: the base model, no edit.
- `sola`: sola-vllm with the configured (default) routing, layers, rank and training.
- `sola-paper`: SoLA as the paper specifies it (arXiv 2603.11239, §3 and App. B): rank 4, SGD
  with lr 0.05 and cosine decay for 40 epochs, L2 distance on raw last-token keys entering the
  first edited layer, α = 0.01; a revoked edit's keys are deleted.
- `lora-all`: the baseline users reach for: one LoRA fine-tuned on all edits so far, applied to
  every prompt (no routing).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import RouterConfig, SolaConfig, TrainConfig

METHODS = ("base", "sola", "sola-paper", "lora-all")


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # "base" | "routed" (one LoRA per edit, nearest-key routing) | "joint"
    description: str
    config: SolaConfig
    calibration: dict | None = None  # where its threshold came from (harness.calibrated)


def paper_config(base: SolaConfig) -> SolaConfig:
    """SoLA's own settings on the layer set of `base` (the paper names none for Llama)."""
    edit = SolaConfig.from_dict({"edit": {**paper_keys(base).to_dict()["edit"], "rank": 4}}).edit
    train = TrainConfig(steps=40, lr=0.05, optimizer="sgd", schedule="cosine", stop_loss=0.0,
                        seed=base.train.seed, init_std=base.train.init_std)
    # the paper deletes a revoked edit's keys
    router = RouterConfig(metric="l2", threshold=0.01, revoked_keys="drop")
    return SolaConfig(edit=edit, router=router, train=train)


def paper_keys(base: SolaConfig) -> SolaConfig:
    """`base` with the paper's last-token keys and no key map: for methods that never route
    (their single LoRA applies to every prompt), so a run with pooled keys shares their edits
    with runs made without."""
    edit = SolaConfig.from_dict({"edit": {**base.to_dict()["edit"], "key_pool": "last",
                                          "route_layer": None}}).edit
    return SolaConfig(edit=edit, router=RouterConfig(metric=base.router.metric), train=base.train)


def build_methods(names: list[str], config: SolaConfig) -> list[Method]:
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {list(METHODS)}")
    router, edit = config.router, config.edit
    keys = (f"{edit.key_pool}-pooled keys" if edit.key_pool != "last" else "last-token keys") + (
        f" at layer {edit.route_layer}" if edit.route_layer is not None else "") + (
        f" under key map {router.key_map}" if router.key_map else "")
    chat = (f" ({router.chat_threshold:g} for chat-form keys)"
            if router.chat_threshold is not None and config.train.chat_form else "")
    table = {
        "base": Method("base", "base", "the base model, no edit", config),
        "sola": Method("sola", "routed",
                       f"sola-vllm: one LoRA per edit, {router.metric} distance < "
                       f"{router.threshold:g}{chat} on {keys}", config),
        "sola-paper": Method("sola-paper", "routed",
                             "SoLA as published: rank 4, SGD lr 0.05 cosine, 40 epochs, "
                             "L2 distance < 0.01", paper_config(config)),
        "lora-all": Method("lora-all", "joint",
                           "one LoRA fine-tuned on all edits so far, applied to every prompt",
                           paper_keys(config)),
    }
    return [table[n] for n in names]


def router_summary(method: Method) -> dict:
    """How a method routes, for reports: metric, threshold, keys and key map (None if unrouted)."""
    routed = method.kind == "routed"
    router, edit = method.config.router, method.config.edit
    return {"metric": router.metric if routed else None,
            "threshold": router.threshold if routed else None,
            "chat_threshold": router.thresholds["chat"] if routed else None,
            "keys": (f"{edit.key_pool}-token" if edit.key_pool == "last"
                     else f"{edit.key_pool}-pooled") if routed else None,
            "route_layer": edit.route_layer if routed else None,
            "key_map": router.key_map if routed else None,
            "revoked_keys": router.revoked_keys if routed else None,
            "calibration": method.calibration if routed else None}
