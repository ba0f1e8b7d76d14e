"""One edit: a frozen LoRA plus its routing keys, and its single-file safetensors form.

An edit artifact is one `.safetensors` file: tensors `keys` ([num_keys, hidden], fp32) and
`lora.{layer}.{module}.A` ([rank, in], fp32) / `.B` ([out, rank], fp32); the header's
`__metadata__["sola_vllm.edit"]` holds the JSON metadata. The artifact is immutable: an
edit's state (staged / canary / active / revoked) lives in the store's journal, not in the file.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .config import KEY_FORMS, KEY_POOLS

FORMAT = "sola-vllm-edit"
FORMAT_VERSION = 1
# the lifecycle (see `journal.TRANSITIONS`): staged is stored only, canary routes for requests
# that opt in, active for every request, revoked for none
STATES = ("staged", "canary", "active", "revoked")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
META_KEY = "sola_vllm.edit"


class EditFormatError(ValueError):
    """An edit artifact is malformed (bad header, shapes, dtypes, non-finite values...)."""


def validate_id(edit_id: object) -> str:
    if not isinstance(edit_id, str) or not _ID_RE.match(edit_id) or ".." in edit_id:
        raise ValueError(f"edit id {edit_id!r} is invalid: use 1-128 characters from "
                         "[A-Za-z0-9._-], starting with a letter or digit, without '..'")
    return edit_id


def new_id() -> str:
    return f"e-{time.strftime('%Y%m%d-%H%M%S')}-{torch.randint(0, 16**6, (1,)).item():06x}"


@dataclass
class Edit:
    id: str
    prompts: list[str]
    target: str
    keys: torch.Tensor  # [num_keys, hidden] fp32: raw routing keys (`keys.pool_keys`)
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]]  # "{layer}.{module}" -> (A, B)
    model_fingerprint: str
    shape_fingerprint: str
    arch: str
    layers: list[int]
    modules: list[str]
    rank: int
    scale: float
    created: float = field(default_factory=time.time)
    author: str = ""
    note: str = ""
    state: str = "active"
    train_info: dict = field(default_factory=dict)  # steps, final loss, seconds...
    # how its keys were read (`EditShape.key_pool` / `route_layer`; None: the first edited
    # layer); only non-default values are written, so older artifacts keep their bytes
    key_pool: str = "last"
    route_layer: int | None = None
    # the form of the prompt each key was read from (`config.KEY_FORMS`), one per key; None:
    # every key is "raw" (the one spelling of that, so older artifacts keep their bytes)
    key_forms: list[str] | None = None

    def __post_init__(self) -> None:
        validate_id(self.id)
        if self.state not in STATES:
            raise ValueError(f"edit state {self.state!r} is not one of {STATES}")
        self.validate()
        if self.route_layer == min(self.layers):  # one spelling of the default
            self.route_layer = None
        if self.key_forms is not None and set(self.key_forms) == {"raw"}:
            self.key_forms = None

    def forms(self) -> list[str]:
        """Each key's form ("raw" or "chat"): which threshold routes it."""
        return list(self.key_forms) if self.key_forms is not None else ["raw"] * len(self.keys)

    # --- validation -------------------------------------------------------------------------
    def validate(self) -> None:
        _require(isinstance(self.prompts, list) and self.prompts
                 and all(isinstance(p, str) and p for p in self.prompts),
                 f"edit {self.id}: prompts must be a non-empty list of non-empty strings")
        _require(isinstance(self.target, str) and self.target.strip() != "",
                 f"edit {self.id}: target must be a non-empty string")
        _tensor_ok(self.keys, 2, f"edit {self.id}: keys")
        _require(self.keys.shape[0] >= 1, f"edit {self.id}: keys must hold at least one key")
        expected = {lora_name(layer, m) for layer in self.layers for m in self.modules}
        _require(set(self.lora) == expected,
                 f"edit {self.id}: LoRA modules {sorted(self.lora)} do not match its layer set "
                 f"{sorted(expected)}")
        for name, (a, b) in self.lora.items():
            _tensor_ok(a, 2, f"edit {self.id}: {name}.A")
            _tensor_ok(b, 2, f"edit {self.id}: {name}.B")
            _require(a.shape[0] == self.rank and b.shape[1] == self.rank,
                     f"edit {self.id}: {name} has A {tuple(a.shape)} and B {tuple(b.shape)}, "
                     f"expected rank {self.rank}")
        _require(isinstance(self.rank, int) and self.rank > 0, f"edit {self.id}: bad rank")
        _require(self.key_pool in KEY_POOLS, f"edit {self.id}: key pool {self.key_pool!r} is "
                 f"not one of {KEY_POOLS}")
        _require(self.route_layer is None or (isinstance(self.route_layer, int)
                                              and 0 <= self.route_layer <= min(self.layers)),
                 f"edit {self.id}: bad route layer {self.route_layer!r}")
        _require(isinstance(self.scale, float | int) and math.isfinite(self.scale),
                 f"edit {self.id}: bad scale {self.scale!r}")
        if self.key_forms is not None:
            _require(isinstance(self.key_forms, list | tuple)
                     and all(f in KEY_FORMS for f in self.key_forms),
                     f"edit {self.id}: key forms {self.key_forms!r} must each be one of "
                     f"{KEY_FORMS}")
            _require(len(self.key_forms) == self.keys.shape[0],
                     f"edit {self.id}: {len(self.key_forms)} key forms for "
                     f"{self.keys.shape[0]} keys")
            self.key_forms = list(self.key_forms)

    # --- (de)serialization --------------------------------------------------------------------
    def metadata(self) -> dict:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "id": self.id,
            "prompts": self.prompts, "target": self.target,
            "model_fingerprint": self.model_fingerprint,
            "shape_fingerprint": self.shape_fingerprint, "arch": self.arch,
            "layers": self.layers, "modules": self.modules, "rank": self.rank,
            "scale": self.scale, "created": self.created, "author": self.author,
            "note": self.note, "train_info": self.train_info,
            **self.key_spec(),
        }

    def key_spec(self) -> dict:
        """How the keys were read, as metadata: empty for the paper's last-token keys."""
        spec = {}
        if self.key_pool != "last":
            spec["key_pool"] = self.key_pool
        if self.route_layer is not None and self.route_layer != min(self.layers):
            spec["route_layer"] = self.route_layer
        if self.key_forms is not None:
            spec["key_forms"] = self.key_forms
        return spec

    def to_bytes(self) -> bytes:
        tensors = {"keys": self.keys.detach().float().contiguous()}
        for name, (a, b) in sorted(self.lora.items()):
            tensors[f"lora.{name}.A"] = a.detach().float().contiguous()
            tensors[f"lora.{name}.B"] = b.detach().float().contiguous()
        meta = json.dumps(self.metadata(), sort_keys=True, separators=(",", ":"))
        return st_save(tensors, metadata={META_KEY: meta})

    @classmethod
    def from_bytes(cls, blob: bytes, state: str = "active") -> Edit:
        try:
            tensors = st_load(blob)
            header_len = int.from_bytes(blob[:8], "little")
            header = json.loads(blob[8:8 + header_len])
            meta = json.loads(header["__metadata__"][META_KEY])
        except Exception as exc:  # safetensors raises several types for garbage input
            raise EditFormatError(f"not a sola-vllm edit artifact: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise EditFormatError("not a sola-vllm edit artifact (missing format marker)")
        if meta.get("format_version") != FORMAT_VERSION:
            raise EditFormatError(f"unsupported edit format version {meta.get('format_version')}")
        try:
            lora = {}
            for layer in meta["layers"]:
                for module in meta["modules"]:
                    name = lora_name(layer, module)
                    lora[name] = (tensors[f"lora.{name}.A"], tensors[f"lora.{name}.B"])
            fields = {k: meta[k] for k in ("id", "prompts", "target", "model_fingerprint",
                                           "shape_fingerprint", "arch", "layers", "modules",
                                           "rank", "scale", "created", "author", "note",
                                           "train_info")}
            fields.update({k: meta[k] for k in ("key_pool", "route_layer", "key_forms")
                           if k in meta})
            if "key_forms" not in meta and meta["train_info"].get("chat_form"):
                fields["key_forms"] = _chat_trained_forms(meta["prompts"], tensors["keys"])
            return cls(keys=tensors["keys"], lora=lora, state=state, **fields)
        except EditFormatError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise EditFormatError(f"malformed edit artifact: {exc}") from exc

    def summary(self) -> dict:
        """JSON-friendly description without tensors (for `edit list/show`)."""
        meta = self.metadata()
        meta.update(state=self.state, num_keys=int(self.keys.shape[0]),
                    key_dim=int(self.keys.shape[1]))
        return meta


def mismatch(edit: Edit, model_fingerprint: str, shape_fingerprint: str, layers, modules,
             here: str) -> str | None:
    """Why `edit` cannot serve where the base model and layer set are the given ones (`here`
    names that place in the message), or None when it fits."""
    if edit.model_fingerprint != model_fingerprint:
        return (f"edit {edit.id} was trained on base model {edit.model_fingerprint[:12]}..., "
                f"{here} serves {model_fingerprint[:12]}...")
    same_layers = list(edit.layers) == list(layers) and list(edit.modules) == list(modules)
    if edit.shape_fingerprint != shape_fingerprint and same_layers:
        return (f"edit {edit.id}'s routing keys were read otherwise (another key pool or route "
                f"layer) than {here} reads them: recapture them with this configuration")
    if edit.shape_fingerprint != shape_fingerprint:
        return (f"edit {edit.id} edits layers {edit.layers} modules {edit.modules}; {here} "
                f"edits layers {list(layers)} modules {list(modules)}")
    return None


def _chat_trained_forms(prompts: list[str], keys: torch.Tensor) -> list[str] | None:
    """The key forms of an artifact trained with chat forms before edits recorded them: its
    prompts were the given ones, then one chat form each (`chat_form.with_chat_forms`), one
    key per prompt."""
    half = len(prompts) // 2
    if len(prompts) != 2 * half or keys.shape[0] != len(prompts):
        return None  # not what chat-form training wrote: every key raw, as recorded
    return ["raw"] * half + ["chat"] * half


def lora_name(layer: int, module: str) -> str:
    return f"{layer}.{module}"


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise EditFormatError(message)


def _tensor_ok(t: object, ndim: int, what: str) -> None:
    _require(isinstance(t, torch.Tensor), f"{what} is not a tensor")
    _require(t.dtype == torch.float32, f"{what} has dtype {t.dtype}, expected float32")
    _require(t.ndim == ndim, f"{what} has shape {tuple(t.shape)}, expected {ndim} dimensions")
    _require(t.numel() > 0, f"{what} is empty")
    _require(bool(torch.isfinite(t).all()), f"{what} holds NaN or Inf values")
