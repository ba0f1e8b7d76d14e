"""Patching a loaded vLLM model in place: the route layer gets a router, each vLLM linear that
holds an edited HF module gets a LoRA apply. Classes are swapped on the instances, so parameter
names and vLLM's weight loading stay untouched."""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ARCHS
from ..edit import lora_name
from .runtime import LoraTarget

# HF module -> (vLLM linear inside the decoder layer, index into its output_sizes or None)
_LLAMA_LIKE = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "self_attn.o_proj": ("self_attn.o_proj", None),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
    "mlp.down_proj": ("mlp.down_proj", None),
}
VLLM_TARGETS = {
    "llama": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gpt2": {m: (m, None) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")},
}


def decoder_layers(model: nn.Module, arch: str) -> nn.ModuleList:
    spec = ARCHS[arch]
    return getattr(getattr(model, spec.backbone), spec.layers)


def lora_targets(model: nn.Module, arch: str, layers, modules) -> dict[str, list[LoraTarget]]:
    """vLLM linear path ("{layer}.{path}") -> the edited HF modules it holds."""
    groups: dict[str, list[LoraTarget]] = {}
    stack = decoder_layers(model, arch)
    for layer in layers:
        for module in modules:
            path, index = VLLM_TARGETS[arch][module]
            linear = stack[layer].get_submodule(path)
            sizes = getattr(linear, "output_sizes", None) or [linear.output_size]
            offset = sum(sizes[:index]) if index is not None else 0
            out = sizes[index] if index is not None else sum(sizes)
            target = LoraTarget(lora_name(layer, module), offset, out, linear.input_size)
            groups.setdefault(f"{layer}.{path}", []).append(target)
    return groups


class _SolaLinear:
    """Mixin: the base linear's output plus the routed LoRA delta of its edited modules."""

    def forward(self, x):
        out = super().forward(x)
        y, bias = out if isinstance(out, tuple) else (out, None)
        torch.ops.sola.lora_apply(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]),
                                  self._sola_tok_slot, self._sola_runtime_id, self._sola_group)
        return out


class _SolaRouterLlama:
    """Mixin for Llama/Qwen2/Qwen3 decoder layers: vLLM defers the residual add into the next
    RMSNorm, so the residual stream entering the layer is hidden_states + residual."""

    def forward(self, positions, hidden_states, residual):
        stream = hidden_states if residual is None else hidden_states + residual
        torch.ops.sola.route(stream.reshape(-1, stream.shape[-1]), self._sola_tok_slot,
                             self._sola_runtime_id)
        return super().forward(positions, hidden_states, residual)


class _SolaRouterGPT2:
    def forward(self, hidden_states):
        torch.ops.sola.route(hidden_states.reshape(-1, hidden_states.shape[-1]),
                             self._sola_tok_slot, self._sola_runtime_id)
        return super().forward(hidden_states)


def _swap(module: nn.Module, mixin: type) -> None:
    base = type(module)
    module.__class__ = type(f"Sola{base.__name__}", (mixin, base), {})


def patch_model(model: nn.Module, arch: str, route_layer: int, groups: dict[str, list],
                runtime, runtime_id: int) -> None:
    """The router reads the residual stream entering `route_layer` (at or before the first
    edited layer, so every route is decided before a LoRA applies)."""
    stack = decoder_layers(model, arch)
    router = _SolaRouterGPT2 if arch == "gpt2" else _SolaRouterLlama
    targets = [stack[route_layer]] + [stack[int(path.split(".", 1)[0])].get_submodule(
        path.split(".", 1)[1]) for path in groups]
    for i, module in enumerate(targets):
        module._sola_tok_slot = runtime.tok_slot
        module._sola_runtime_id = runtime_id
        if i == 0:
            _swap(module, router)
        else:
            module._sola_group = i - 1
            _swap(module, _SolaLinear)
