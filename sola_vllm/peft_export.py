"""Export one `Edit` as a standard PEFT LoRA adapter folder (SoLA, arXiv 2603.11239).

The folder loads with `peft.PeftModel.from_pretrained(base_model, out_dir)` and holds:

    adapter_config.json        LoRA config: r, lora_alpha = scale * r, exact target module names
    adapter_model.safetensors  `base_model.model.<module path>.lora_A.weight` [r, in] and
                               `....lora_B.weight` [out, r], fp32
    sola_keys.safetensors      the routing keys (`keys`: [num_keys, hidden])
    sola_edit.json             the edit's metadata (prompts, target, fingerprints, ...)

Semantics differ: PEFT applies the LoRA to *every* token of *every* request, whereas SoLA applies
it only from the key token on, and only when the request routes to this edit. The exported
adapter therefore reproduces the edit's weight delta exactly, but an always-on version of it.

GPT-2 stores its projections as `Conv1D` (weight [in, out]). PEFT still shapes lora_A as
[r, in] and lora_B as [out, r] for Conv1D and only transposes the merged delta
(`fan_in_fan_out=True`), so the tensors are written unchanged for every architecture.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from .arch import ARCHS
from .edit import Edit, lora_name

__all__ = ["export_peft"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEYS_FILE = "sola_keys.safetensors"
EDIT_FILE = "sola_edit.json"


def export_peft(edit: Edit, out_dir: str | os.PathLike,
                base_model_path: str | None = None) -> Path:
    """Write `edit` as a PEFT LoRA adapter into `out_dir` (created if needed). Returns it."""
    edit.validate()
    spec = ARCHS.get(edit.arch)
    if spec is None:
        raise ValueError(f"edit {edit.id}: architecture {edit.arch!r} is not supported; "
                         f"supported: {sorted(ARCHS)}")
    for module in edit.modules:
        if module not in spec.modules:
            raise ValueError(f"edit {edit.id}: module {module!r} is not a {spec.name} module; "
                             f"expected one of {list(spec.modules)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(adapter_tensors(edit), out / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    _write_json(out / ADAPTER_CONFIG, adapter_config(edit, base_model_path))
    save_file({"keys": edit.keys.detach().float().contiguous()}, out / KEYS_FILE)
    _write_json(out / EDIT_FILE, {**edit.metadata(), "state": edit.state})
    return out


def adapter_tensors(edit: Edit) -> dict:
    """PEFT state-dict names -> fp32 tensors: A [r, in] and B [out, r] for every edited module."""
    spec = ARCHS[edit.arch]
    tensors = {}
    for layer in edit.layers:
        for module in edit.modules:
            a, b = edit.lora[lora_name(layer, module)]
            prefix = f"base_model.model.{spec.module_path(layer, module)}"
            tensors[f"{prefix}.lora_A.weight"] = a.detach().float().contiguous()  # [r, in]
            tensors[f"{prefix}.lora_B.weight"] = b.detach().float().contiguous()  # [out, r]
    return tensors


def adapter_config(edit: Edit, base_model_path: str | None = None) -> dict:
    spec = ARCHS[edit.arch]
    targets = sorted(spec.module_path(layer, m) for layer in edit.layers for m in edit.modules)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_path,
        "r": edit.rank,
        "lora_alpha": edit.scale * edit.rank,  # PEFT scales by lora_alpha / r == edit.scale
        "lora_dropout": 0.0,
        "bias": "none",
        # exact module names: PEFT matches them directly, so layers_to_transform is redundant
        # but records the layer set for readers of the config
        "target_modules": targets,
        "layers_to_transform": list(edit.layers),
        "fan_in_fan_out": spec.conv1d,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
