"""vLLM general plugin (entry point `vllm.general_plugins: sola`). vLLM calls `register()` in
every process, possibly more than once: it is idempotent, imports vLLM lazily and never
initializes CUDA (model classes are registered by name and imported only when built)."""

from __future__ import annotations

_ARCHITECTURES = {
    "SolaLlamaForCausalLM": "sola_vllm.serving.models:SolaLlamaForCausalLM",
    "SolaQwen2ForCausalLM": "sola_vllm.serving.models:SolaQwen2ForCausalLM",
    "SolaQwen3ForCausalLM": "sola_vllm.serving.models:SolaQwen3ForCausalLM",
    "SolaGPT2LMHeadModel": "sola_vllm.serving.models:SolaGPT2LMHeadModel",
}


def register() -> None:
    from vllm import ModelRegistry

    from .serving.runner_hooks import apply_prefix_cache_guard, apply_runner_hooks

    supported = set(ModelRegistry.get_supported_archs())
    for arch, target in _ARCHITECTURES.items():
        if arch not in supported:
            ModelRegistry.register_model(arch, target)
    apply_runner_hooks()
    apply_prefix_cache_guard()
