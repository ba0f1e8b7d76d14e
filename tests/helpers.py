"""Shared test builders: synthetic edits with random (non-zero) tensors, no model needed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sola_vllm.arch import ARCHS, EditShape
from sola_vllm.edit import Edit, lora_name


def module_dims(arch: str, module: str, hidden: int, intermediate: int,
                kv_dim: int | None = None) -> tuple[int, int]:
    """(in_features, out_features) of an editable module of a model with these sizes."""
    kv = hidden if kv_dim is None else kv_dim
    dims = {
        "self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, kv),
        "self_attn.v_proj": (hidden, kv), "self_attn.o_proj": (hidden, hidden),
        "mlp.gate_proj": (hidden, intermediate), "mlp.up_proj": (hidden, intermediate),
        "mlp.down_proj": (intermediate, hidden),
    } if arch in ("llama", "qwen2") else {
        "attn.c_attn": (hidden, 3 * hidden), "attn.c_proj": (hidden, hidden),
        "mlp.c_fc": (hidden, intermediate), "mlp.c_proj": (intermediate, hidden),
    }
    if module not in dims or module not in ARCHS[arch].modules:
        raise ValueError(f"module {module!r} is not an editable {arch} module")
    return dims[module]


def make_synthetic_edit(edit_id: str, arch: str = "llama", layers=(2, 3),
                        modules=("mlp.up_proj", "mlp.down_proj"), hidden: int = 64,
                        intermediate: int = 128, rank: int = 4, seed: int = 0,
                        model_fingerprint: str = "m" * 64, shape_fingerprint: str | None = None,
                        *, scale: float = 1.0, num_keys: int = 1, kv_dim: int | None = None,
                        num_layers: int | None = None, std: float = 0.1) -> Edit:
    """A valid `Edit` with seeded random keys and LoRA factors (B is non-zero, unlike a fresh
    LoRA). `shape_fingerprint` defaults to the fingerprint of the layer set, as `arch.py`
    computes it; `created` is fixed so that the same arguments give the same bytes."""
    layers, modules = [int(x) for x in layers], list(modules)
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for layer in layers:
        for module in modules:
            d_in, d_out = module_dims(arch, module, hidden, intermediate, kv_dim)
            a = torch.randn(rank, d_in, generator=gen) * std  # [r, in]
            b = torch.randn(d_out, rank, generator=gen) * std  # [out, r]
            lora[lora_name(layer, module)] = (a, b)
    if shape_fingerprint is None:
        shape = EditShape(arch, num_layers or max(layers) + 1, tuple(layers), tuple(modules),
                          rank, float(scale))
        shape_fingerprint = shape.fingerprint()
    return Edit(
        id=edit_id, prompts=[f"prompt of {edit_id}"], target=f"target of {edit_id}",
        keys=torch.randn(num_keys, hidden, generator=gen), lora=lora,
        model_fingerprint=model_fingerprint, shape_fingerprint=shape_fingerprint, arch=arch,
        layers=layers, modules=modules, rank=rank, scale=float(scale),
        created=1_700_000_000.0 + seed, author="helpers", note=f"synthetic seed {seed}",
    )


# --- the benchmark data beside the checkout (../shared/data; read there, never copied) ---------
SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
ZSRE = SHARED_DATA / "zsre_mend_eval_1000.json"
FACTS = SHARED_DATA / "rome_known_1000.json"
needs_data = pytest.mark.skipif(not ZSRE.is_file() or not FACTS.is_file(),
                                reason=f"benchmark data under {SHARED_DATA} not found")
