"""What every vLLM process needs to know about SoLA, carried in `hf_overrides["sola"]`."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from ..arch import EditShape
from ..config import KEY_POOLS, METRICS, REVOKED_KEYS, form_thresholds

SOLA_ARCHITECTURES = {
    "llama": "SolaLlamaForCausalLM",
    "qwen2": "SolaQwen2ForCausalLM",
    "qwen3": "SolaQwen3ForCausalLM",
    "gpt2": "SolaGPT2LMHeadModel",
}
# How the worker adds routed LoRA deltas: "torch" (LoraStacks, fp32, any device), "punica"
# (vLLM's Triton lora_shrink/lora_expand: CUDA, fp16/bf16), "auto" (punica where it can run).
APPLY_BACKENDS = ("auto", "torch", "punica")
# Which nearest-key search routes key tokens: "torch" (nearest_key_ref, any device), "triton"
# (the kernel in kernels/: CUDA), "auto" (triton on CUDA). Resolved in the worker (route_kernel.py).
ROUTERS = ("auto", "torch", "triton")


@dataclass(slots=True)
class ServingConfig:
    model_type: str
    layers: tuple[int, ...]
    modules: tuple[str, ...]
    shape_fingerprint: str
    model_fingerprint: str
    metric: str = "cosine"
    threshold: float = 0.006  # = RouterConfig's default
    chat_threshold: float | None = None  # chat-form keys' (RouterConfig's); None: threshold
    max_edits: int = 1024  # LoRA slots, preallocated at start (revoked edits keep theirs)
    max_keys: int = 4096  # routing keys, preallocated at start
    max_rank: int = 8
    request_log: int = 10000  # routing decisions kept for provenance lookups (oldest dropped)
    canary_fraction: float = 0.0  # share of requests (by id hash) that see canary edits
    apply: str = "auto"  # one of APPLY_BACKENDS; resolved in the worker (apply_backend.py)
    router: str = "auto"  # one of ROUTERS; resolved in the worker (route_kernel.py)
    # how routing keys are read (`EditShape.key_pool`, `route_layer`; None: the first edited
    # layer) and the router's key map (an absolute path to a `KeyMap` file, or None)
    key_pool: str = "last"
    route_layer: int | None = None
    key_map: str | None = None
    revoked_keys: str = "drop"  # = RouterConfig's: revoked edits' keys dropped, or block routing

    def __post_init__(self) -> None:
        self.layers, self.modules = tuple(self.layers), tuple(self.modules)
        if self.metric not in METRICS:
            raise ValueError(f"metric {self.metric!r} is not one of {METRICS}")
        if self.revoked_keys not in REVOKED_KEYS:
            raise ValueError(f"revoked_keys {self.revoked_keys!r} is not one of {REVOKED_KEYS}")
        self._check_keys()
        for name in ("max_edits", "max_keys", "max_rank", "request_log"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name, value in (("threshold", self.threshold),
                            ("chat_threshold", self.chat_threshold or self.threshold)):
            if not (isinstance(value, int | float) and not isinstance(value, bool)
                    and 0 < value < float("inf")):
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        if not 0.0 <= self.canary_fraction <= 1.0:
            raise ValueError(f"canary_fraction must be in [0, 1], got {self.canary_fraction!r}")
        if self.apply not in APPLY_BACKENDS:
            raise ValueError(f"apply {self.apply!r} is not one of {APPLY_BACKENDS}")
        if self.router not in ROUTERS:
            raise ValueError(f"router {self.router!r} is not one of {ROUTERS}")

    def _check_keys(self) -> None:
        if self.key_pool not in KEY_POOLS:
            raise ValueError(f"key_pool {self.key_pool!r} is not one of {KEY_POOLS}")
        if self.route_layer is None and self.layers:
            self.route_layer = self.layers[0]
        if (not isinstance(self.route_layer, int) or isinstance(self.route_layer, bool)
                or self.route_layer < 0):
            raise ValueError(f"route_layer must be a non-negative int, got {self.route_layer!r}")
        if self.layers and self.route_layer > self.layers[0]:
            raise ValueError(f"route_layer {self.route_layer} comes after the first edited "
                             f"layer {self.layers[0]}: the route must be decided before an "
                             "edit applies")
        if self.key_map is not None and (not isinstance(self.key_map, str)
                                         or not os.path.isabs(self.key_map)):
            # workers load it wherever they run: a relative path would depend on their cwd
            raise ValueError(f"key_map must be an absolute path to a key map file, got "
                             f"{self.key_map!r}")

    @classmethod
    def from_shape(cls, shape: EditShape, model_type: str, model_fingerprint: str,
                   **kwargs) -> ServingConfig:
        return cls(model_type=model_type, layers=shape.layers, modules=shape.modules,
                   shape_fingerprint=shape.fingerprint(), model_fingerprint=model_fingerprint,
                   key_pool=shape.key_pool, route_layer=shape.route_layer, **kwargs)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ServingConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown sola serving option(s) {unknown}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    @property
    def thresholds(self) -> dict[str, float]:
        """The threshold of each key form (as `RouterConfig.thresholds`)."""
        return form_thresholds(self.threshold, self.chat_threshold)

    @property
    def architecture(self) -> str:
        return SOLA_ARCHITECTURES[self.model_type]
