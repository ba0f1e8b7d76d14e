"""A fitted linear key map: routing compares keys and queries by distance after it.

    x -> ((x - mean) / scale) @ proj        mean [d], scale > 0, proj [d, k]   (fp32)

Stored keys stay raw (the pooled residual the edit's own prompt gave), so a refitted map needs
no recapture; keys and queries are mapped alike whenever a distance is taken. A map is fitted
for one model and one way of reading keys (`EditShape.key_pool`, `route_layer`), contrastively
on (prompt, paraphrase) pairs (`sola-vllm fit-metric`, `eval.metric_study.fit_linear_metric`),
and refuses to serve anywhere else.

File: one safetensors file, tensors `mean` and `proj`, metadata `sola_vllm.key_map` (JSON):
format, scale, model fingerprint, hidden size, key pool, route layer, and optionally the
threshold it was calibrated for and how it was fitted.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT = "sola-vllm-key-map"
META_KEY = "sola_vllm.key_map"
SHIPPED = Path(__file__).parent / "maps"  # maps fitted for the default model ship here


class KeyMapError(ValueError):
    """A key map file is malformed, or fitted for another model or another kind of key."""


@dataclass(frozen=True)
class KeyMap:
    mean: torch.Tensor  # [d] fp32
    scale: float
    proj: torch.Tensor  # [d, k] fp32
    info: dict = field(default_factory=dict)  # model_fingerprint, key_pool, route_layer, ...

    def __post_init__(self) -> None:
        for name, t, ndim in (("mean", self.mean, 1), ("proj", self.proj, 2)):
            _require(isinstance(t, torch.Tensor) and t.ndim == ndim and t.numel() > 0,
                     f"key map {name} must be a non-empty {ndim}-d tensor")
            _require(bool(torch.isfinite(t).all()), f"key map {name} holds NaN or Inf")
        _require(self.proj.shape[0] == self.mean.shape[0],
                 f"key map proj {tuple(self.proj.shape)} does not fit mean "
                 f"{tuple(self.mean.shape)}")
        _require(isinstance(self.scale, float | int) and math.isfinite(self.scale)
                 and self.scale > 0, f"key map scale must be positive, got {self.scale!r}")

    @property
    def in_dim(self) -> int:
        return self.mean.shape[0]

    @property
    def out_dim(self) -> int:
        return self.proj.shape[1]

    @property
    def threshold(self) -> float | None:
        """The routing threshold this map was calibrated for, if it was."""
        return self.info.get("threshold")

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., d] -> [..., k] fp32, on x's device."""
        mean, proj = self.mean.to(x.device), self.proj.to(x.device)
        return (x.float() - mean) / self.scale @ proj

    def to(self, device) -> KeyMap:
        return KeyMap(self.mean.to(device), self.scale, self.proj.to(device), self.info)

    def fingerprint(self) -> str:
        digest = hashlib.sha256()
        for t in (self.mean, self.proj):
            digest.update(t.detach().float().cpu().contiguous().numpy().tobytes())
        digest.update(repr(float(self.scale)).encode())
        return digest.hexdigest()

    def check_fits(self, model_fingerprint: str, hidden_size: int, key_pool: str,
                   route_layer: int) -> None:
        """KeyMapError unless this map was fitted for this model and this kind of key."""
        where = self.info.get("path", "the key map")
        _require(self.in_dim == hidden_size, f"{where} maps {self.in_dim}-d keys; the model's "
                 f"hidden size is {hidden_size}")
        for name, want in (("model_fingerprint", model_fingerprint), ("key_pool", key_pool),
                           ("route_layer", route_layer)):
            have = self.info.get(name)
            _require(have == want, f"{where} was fitted for {name} {have!r}; this engine has "
                     f"{want!r} (fit one with `sola-vllm fit-metric`)")

    # --- file -------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        meta = {k: v for k, v in self.info.items() if k != "path"}
        meta.update(format=FORMAT, scale=float(self.scale))
        tensors = {"mean": self.mean.detach().float().cpu().contiguous(),
                   "proj": self.proj.detach().float().cpu().contiguous()}
        return st_save(tensors, metadata={META_KEY: json.dumps(meta, sort_keys=True)})

    def save(self, path: str | Path) -> None:
        from .fsutil import _atomic_write

        _atomic_write(Path(path), self.to_bytes())

    @classmethod
    def from_bytes(cls, blob: bytes, where: str = "key map") -> KeyMap:
        try:
            tensors = st_load(blob)
            header = json.loads(blob[8:8 + int.from_bytes(blob[:8], "little")])
            meta = json.loads(header["__metadata__"][META_KEY])
        except Exception as exc:  # safetensors raises several types for garbage input
            raise KeyMapError(f"{where} is not a sola-vllm key map: {exc}") from exc
        _require(isinstance(meta, dict) and meta.get("format") == FORMAT,
                 f"{where} is not a sola-vllm key map (missing format marker)")
        _require(set(tensors) == {"mean", "proj"}, f"{where} must hold tensors mean and proj, "
                 f"found {sorted(tensors)}")
        _require(all(t.dtype == torch.float32 for t in tensors.values()),
                 f"{where}: mean and proj must be float32")
        scale = meta.pop("scale", None)
        meta.pop("format")
        try:
            return cls(tensors["mean"], scale, tensors["proj"], {**meta, "path": where})
        except KeyMapError:
            raise
        except (TypeError, ValueError) as exc:
            raise KeyMapError(f"{where}: {exc}") from exc

    @classmethod
    def load(cls, path: str | Path) -> KeyMap:
        path = resolve_path(path)
        try:
            blob = path.read_bytes()
        except OSError as exc:
            raise KeyMapError(f"cannot read key map {path}: {exc.strerror or exc}") from exc
        return cls.from_bytes(blob, str(path))


def resolve_path(name: str | Path) -> Path:
    """A map file's path; a bare name without a suffix names a map shipped in the package
    (`sola_vllm/maps/<name>.safetensors`)."""
    path = Path(name)
    if path.suffix == "" and path.parent == Path(".") and not path.exists():
        shipped = SHIPPED / f"{name}.safetensors"
        if not shipped.exists():
            known = sorted(p.stem for p in SHIPPED.glob("*.safetensors"))
            raise KeyMapError(f"no key map file {name!r} and no shipped map of that name; "
                              f"shipped: {known}")
        return shipped
    return path


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise KeyMapError(message)
