"""Validated configuration, one dataclass per concern (SoLA, arXiv 2603.11239).

`EditConfig` fixes the *shape* of an edit (layers, modules, rank, scale) and is part of an
edit's fingerprint; `RouterConfig` decides which stored key a request matches; `TrainConfig`
holds the hyper-parameters of training one edit. `SolaConfig` groups the three.
Every `__post_init__` raises `ValueError` naming the bad value.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

METRICS = ("l2", "cosine")
# What a revoked edit's keys do: "block" (they stay in the routing table owned by no edit, so a
# prompt whose nearest key is a revoked edit's runs the base model) or "drop" (removed, as if
# the edit had never been added). See RouterConfig.revoked_keys.
REVOKED_KEYS = ("block", "drop")
# How a prompt's routing key pools the residual states entering the route layer: "last" (its
# last token, the paper's choice) or "mean" (the mean over every prompt token but the first,
# whose state is an outlier every prompt shares); see `keys.pool_keys`.
KEY_POOLS = ("last", "mean")
# Which form of its prompt a routing key was read from: "raw" (the prompt as given, what a
# completions client sends) or "chat" (its chat form, `chat_form.chat_prompt`, what a
# /v1/chat/completions client sends). Each form has its own threshold (RouterConfig).
KEY_FORMS = ("raw", "chat")
DEFAULT_THRESHOLD = 0.006  # cosine, last-token keys (see RouterConfig)
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _filter_fields(cls, data: dict[str, Any], where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    _check(not unknown, f"unknown {where} option(s) {unknown}; known: {sorted(names)}")
    return data


@dataclass(slots=True)
class EditConfig:
    """Where an edit's LoRA lives. `None` means the architecture's default (see `arch.py`)."""

    layers: tuple[int, ...] | None = None
    modules: tuple[str, ...] | None = None
    # rank 8 (SoLA uses 4): on 40 zsRE dev edits both fit every edit, but a paraphrase routed
    # to its edit gets the new answer 1.000 (rank 8) vs 0.925 (rank 4) greedily, in fewer
    # steps (median 6 vs 7; benchmarks/edit_defaults.py). Costs 2x the LoRA memory per edit.
    rank: int = 8
    scale: float = 1.0  # delta = scale * B @ A @ x  (PEFT's lora_alpha / r)
    # the routing key: states entering `route_layer` (None: the first edited layer; it must not
    # come after it, the route is needed before the first LoRA applies), pooled by `key_pool`
    key_pool: str = "last"
    route_layer: int | None = None

    def __post_init__(self) -> None:
        if self.layers is not None:
            self.layers = tuple(self.layers)
            _check(len(self.layers) > 0, "layers must not be empty (use None for the default)")
            for layer in self.layers:
                _check(isinstance(layer, int) and not isinstance(layer, bool) and layer >= 0,
                       f"layer index {layer!r} must be a non-negative int")
            _check(len(set(self.layers)) == len(self.layers), f"duplicate layers in {self.layers}")
            self.layers = tuple(sorted(self.layers))
        if self.modules is not None:
            self.modules = tuple(self.modules)
            _check(len(self.modules) > 0, "modules must not be empty (use None for the default)")
            for m in self.modules:
                _check(isinstance(m, str) and m != "", f"module name {m!r} must be a non-empty str")
            _check(len(set(self.modules)) == len(self.modules), f"duplicate modules {self.modules}")
        _check(isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0,
               f"rank must be a positive int, got {self.rank!r}")
        _check(self.rank <= 256, f"rank {self.rank} is larger than the supported maximum 256")
        _check(_finite_number(self.scale) and self.scale > 0,
               f"scale must be a positive finite number, got {self.scale!r}")
        _check(self.key_pool in KEY_POOLS,
               f"key_pool {self.key_pool!r} is not one of {KEY_POOLS}")
        if self.route_layer is not None:
            _check(isinstance(self.route_layer, int) and not isinstance(self.route_layer, bool)
                   and self.route_layer >= 0,
                   f"route_layer must be a non-negative int, got {self.route_layer!r}")
            if self.layers is not None:
                _check(self.route_layer <= self.layers[0],
                       f"route_layer {self.route_layer} comes after the first edited layer "
                       f"{self.layers[0]}: the route must be decided before an edit applies")


@dataclass(slots=True)
class RouterConfig:
    """Nearest-key routing: a request routes to the edit of its nearest key if the distance is
    below `threshold` (strictly), else to no edit (-1). Cosine distance is 1 - cos.

    Defaults chosen on the dev splits (issue 4; `python -m sola_vllm.eval.routing_study`,
    `benchmarks/results/routing_study_*.json`), keys at layer 24 of SmolLM2-135M:
    - cosine, not L2: the two rank prompts the same (zsRE dev, 1 % of negatives routed:
      paraphrase hit 0.099 cosine vs 0.091 L2), and a cosine threshold does not depend on
      the scale of the residual stream, which grows with depth and differs between models;
    - threshold 0.006: the largest round value that routes at most 0.5 % of *hard negatives*
      (the same kind of prompt about another subject, the worst case for a false fire: it
      silently rewrites someone else's fact) with ~250 keys: their 0.5 % quantile is 0.0069
      on zsRE and 0.0065 on CounterFact. Unrelated questions (zsRE `loc`) sit 0.2-0.3 away
      and are never routed at any threshold below 0.1. A larger threshold buys paraphrase
      hits at the price of hard false fires (zsRE dev: 0.01 -> paraphrase 0.15, hard 2 %;
      0.02 -> 0.40, 8 %); `sola-vllm calibrate` measures this trade-off for a given store.

    With `key_map` (a fitted linear map, `key_map.KeyMap`: a file path, or the name of a map
    shipped in `sola_vllm/maps/`) keys and queries are compared after the map; the threshold
    then defaults to the one the map was calibrated for.

    The measured alternative (issue 4), shipped as the named configuration
    `smollm2-135m-instruct-mean-l6` for the default model: mean-pooled keys entering layer 6
    (`EditConfig.key_pool`, `route_layer`) under a map fitted on the dev pairs of both
    benchmarks (CounterFact 272, zsRE 243; a dev two-fold comparison with CounterFact alone:
    held-out paraphrase hit 0.849 -> 0.969 on zsRE and 0.734 -> 0.847 on CounterFact,
    `benchmarks/results/key_map_fit_data.json`), threshold 0.170 calibrated on both dev
    splits (`sola-vllm fit-metric --keep 0.999`: the smaller of the two files' thresholds, here
    CounterFact's; no dev negative routes; layers 4, 6 and 8 tie on dev,
    `benchmarks/results/key_map_dev_choice.json`). Keep 0.99 gave a threshold that let 3.3 %
    of unrelated prompts route once a store held 998 keys: a store's nearest-key distances
    shrink as it grows, so the dev rule keeps every dev negative out. Calibrated on the store
    itself instead (`sola-vllm eval --threshold-keep 0.99`, `eval/store_threshold.py`; a
    deployment does the same with `sola-vllm calibrate --store`), the threshold moves each
    way: 0.252 on the 522 one-per-subject zsRE edits (generality 0.801 -> 0.926, locality
    1.000) and 0.142 on CounterFact (locality 0.980 -> 0.990), README "A threshold for the
    store".
    At that threshold a prompt that names an edited subject but asks another question routes
    to its edit for 32 % of CounterFact's test prompts (`benchmarks/subject_locality.py`;
    last-token keys: 0.2 %). So `sola-vllm` commands (serve, edit train, eval, ...) run the
    default model, when given no `--config`, with `smollm2-135m-instruct-mean-l6-strict`
    (`default_config.py`): the same keys and map at threshold 0.037, the largest that keeps
    99 % of every dev negative group unrouted, those same-subject, other-relation prompts
    included (`benchmarks/map_threshold.py`). On the test splits: generality 0.172 on zsRE's
    full stream and 0.211 with one record per subject (last-token keys: 0.062; the map's
    threshold: 0.544 and 0.801), other-relation prompts routed 0.7 %, reliability and locality
    1.000. For chat clients `smollm2-135m-instruct-mean-l6-chat` keys each edit on its chat
    form too (`TrainConfig.chat_form`); chat-form keys route under `chat_threshold` 0.0069, the
    same dev rule on chat forms (their pooled keys share the chat template and sit closer
    together), raw keys under 0.037, so one store serves both kinds of client. Neither is this
    dataclass's default, which serves every model: a map is fitted for one model (others have
    none yet), and mean keys turn vLLM's prefix caching off under Model Runner V2 (the V1
    runner keeps it, with per-block state sums).

    `revoked_keys`: "drop" (default) removes a revoked edit's keys, as if it had never been
    added: its prompt may then route to the next nearest edit. "block" keeps them in the table,
    owned by no edit (-1), listed after every routed key so a routed key wins an exact tie: the
    revoked edit's own prompt is nearest its own key and runs the base model whatever lies near
    it. Measured after revoking a random half of the evaluated stores (README "Rollback with
    blocking keys"): "block" gives revoked prompts the base model's exact output for 1.000 on
    every stream (drop: 0.984-0.995 with one zsRE record per subject, 0.974-0.978 on
    CounterFact, 0.58-0.61 on zsRE's full stream), kept edits' reliability stays 1.000, and
    kept paraphrases reach their edit as often (0.954, 0.752 against 0.755) except where kept
    edits share subjects with revoked ones (zsRE's full stream, a correction of a
    correction: 0.621 -> 0.528). There a superseded edit's prompt also returns to the base
    answer rather than to the edit that replaced it. That, and capacity (a server keeps
    revoked edits loaded, their LoRA slot and key rows, at start too, after every routed edit
    and as far as `max_edits` / `max_keys` allow), is why it is not the default yet.
    Restoring the edit routes its keys again.
    """

    metric: str = "cosine"
    threshold: float | None = None  # None: the key map's calibrated threshold, else 0.006
    # the threshold of keys read from chat forms (`KEY_FORMS`); None: `threshold`. A request
    # routes when its distance to its nearest key is below that key's own threshold
    chat_threshold: float | None = None
    key_map: str | None = None
    revoked_keys: str = "drop"  # one of REVOKED_KEYS; see below

    def __post_init__(self) -> None:
        _check(self.metric in METRICS, f"metric {self.metric!r} is not one of {METRICS}")
        _check(self.revoked_keys in REVOKED_KEYS,
               f"revoked_keys {self.revoked_keys!r} is not one of {REVOKED_KEYS}")
        if self.key_map is not None:
            _check(isinstance(self.key_map, str) and self.key_map != "",
                   f"key_map must be a non-empty path or map name, got {self.key_map!r}")
        if self.threshold is None:
            self.threshold = self._default_threshold()
        _check(_finite_number(self.threshold) and self.threshold > 0,
               f"threshold must be a positive finite number, got {self.threshold!r}")
        _check(self.chat_threshold is None
               or (_finite_number(self.chat_threshold) and self.chat_threshold > 0),
               f"chat_threshold must be a positive finite number or null, got "
               f"{self.chat_threshold!r}")

    @property
    def thresholds(self) -> dict[str, float]:
        """The threshold of each key form (`KEY_FORMS`)."""
        return form_thresholds(self.threshold, self.chat_threshold)

    def _default_threshold(self) -> float:
        if self.key_map is None:
            return DEFAULT_THRESHOLD
        calibrated = self.load_key_map().threshold
        _check(calibrated is not None, f"key map {self.key_map!r} carries no calibrated "
               "threshold: give router.threshold")
        return float(calibrated)

    def load_key_map(self):
        """The configured `KeyMap`, or None (raises `KeyMapError`, a ValueError, if unusable)."""
        from .key_map import KeyMap

        return None if self.key_map is None else KeyMap.load(self.key_map)


@dataclass(slots=True)
class TrainConfig:
    """Training one edit's LoRA on the frozen base model."""

    steps: int = 60
    lr: float = 1e-2
    optimizer: str = "adam"
    schedule: str = "constant"  # learning rate over the steps: constant, or cosine decay to 0
    seed: int = 0
    init_std: float = 0.02  # std of A at init; B starts at zero (Hu et al.)
    # stop early once every target token is argmax and loss < this. 0.002 trains past the fit:
    # on 120 dev edits each, routed paraphrases answer 0.967 (zsRE) and 0.714 (CounterFact)
    # against 0.917 and 0.601 at 0.05, for a median 10 and 6 steps instead of 5 and 4.
    # 0.0005 reads 0.967 and 0.835 for 26 steps (4x the training time); not chosen yet, as every
    # report would take ~75 min to retrain (benchmarks/results/edit_defaults_stop_*.json)
    stop_loss: float = 0.002
    append_eos: bool = True  # train the EOS token after the target so generation stops there
    # also train (and key) each prompt in its chat form, one user message in the model's chat
    # template (`chat_form.py`), so /v1/chat/completions requests route to the edit too
    chat_form: bool = False

    def __post_init__(self) -> None:
        _check(isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps > 0,
               f"steps must be a positive int, got {self.steps!r}")
        _check(_finite_number(self.lr) and self.lr > 0, f"lr must be positive, got {self.lr!r}")
        _check(self.optimizer in OPTIMIZERS,
               f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        _check(self.schedule in SCHEDULES,
               f"schedule {self.schedule!r} is not one of {SCHEDULES}")
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool),
               f"seed must be an int, got {self.seed!r}")
        _check(_finite_number(self.init_std) and self.init_std > 0,
               f"init_std must be positive, got {self.init_std!r}")
        _check(_finite_number(self.stop_loss) and self.stop_loss >= 0,
               f"stop_loss must be >= 0, got {self.stop_loss!r}")
        _check(isinstance(self.append_eos, bool), f"append_eos must be true or false, got "
               f"{self.append_eos!r}")
        _check(isinstance(self.chat_form, bool), f"chat_form must be true or false, got "
               f"{self.chat_form!r}")


@dataclass(slots=True)
class SolaConfig:
    edit: EditConfig = field(default_factory=EditConfig)
    router: RouterConfig = field(default_factory=RouterConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SolaConfig:
        _check(isinstance(data, dict), f"config must be a JSON object, got {type(data).__name__}")
        _filter_fields(cls, data, "config section")
        parts = {}
        for name, sub in (("edit", EditConfig), ("router", RouterConfig), ("train", TrainConfig)):
            values = data.get(name, {})
            _check(isinstance(values, dict), f"config section {name!r} must be an object")
            parts[name] = sub(**_filter_fields(sub, values, name))
        return cls(**parts)

    def to_dict(self) -> dict[str, Any]:
        return {
            name: {f.name: _jsonable(getattr(part, f.name)) for f in dataclasses.fields(part)}
            for name, part in (("edit", self.edit), ("router", self.router), ("train", self.train))
        }


def form_thresholds(threshold: float, chat_threshold: float | None) -> dict[str, float]:
    """{key form: its threshold}: chat-form keys at `chat_threshold`, or at `threshold` too."""
    chat = threshold if chat_threshold is None else chat_threshold
    return {"raw": float(threshold), "chat": float(chat)}


def _finite_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def fingerprint(data: Any) -> str:
    """sha256 of canonical JSON: the same value always gives the same hex digest."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
