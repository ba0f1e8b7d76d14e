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
OPTIMIZERS = ("adam", "adamw", "sgd")


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
    rank: int = 4
    scale: float = 1.0  # delta = scale * B @ A @ x  (PEFT's lora_alpha / r)

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


@dataclass(slots=True)
class RouterConfig:
    """Nearest-key routing: a request routes to the edit of its nearest key if the distance is
    below `threshold` (strictly), else to no edit (-1). Cosine distance is 1 - cos."""

    metric: str = "cosine"
    threshold: float = 1e-3

    def __post_init__(self) -> None:
        _check(self.metric in METRICS, f"metric {self.metric!r} is not one of {METRICS}")
        _check(_finite_number(self.threshold) and self.threshold > 0,
               f"threshold must be a positive finite number, got {self.threshold!r}")


@dataclass(slots=True)
class TrainConfig:
    """Training one edit's LoRA on the frozen base model."""

    steps: int = 60
    lr: float = 1e-2
    optimizer: str = "adam"
    seed: int = 0
    init_std: float = 0.02  # std of A at init; B starts at zero (Hu et al.)
    stop_loss: float = 0.05  # stop early once every target token is argmax and loss < this
    append_eos: bool = True  # train the EOS token after the target so generation stops there

    def __post_init__(self) -> None:
        _check(isinstance(self.steps, int) and not isinstance(self.steps, bool) and self.steps > 0,
               f"steps must be a positive int, got {self.steps!r}")
        _check(_finite_number(self.lr) and self.lr > 0, f"lr must be positive, got {self.lr!r}")
        _check(self.optimizer in OPTIMIZERS,
               f"optimizer {self.optimizer!r} is not one of {OPTIMIZERS}")
        _check(isinstance(self.seed, int) and not isinstance(self.seed, bool),
               f"seed must be an int, got {self.seed!r}")
        _check(_finite_number(self.init_std) and self.init_std > 0,
               f"init_std must be positive, got {self.init_std!r}")
        _check(_finite_number(self.stop_loss) and self.stop_loss >= 0,
               f"stop_loss must be >= 0, got {self.stop_loss!r}")


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


def _finite_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def fingerprint(data: Any) -> str:
    """sha256 of canonical JSON: the same value always gives the same hex digest."""
    blob = json.dumps(data, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()
