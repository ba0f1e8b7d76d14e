"""vLLM model classes with SoLA routing: the in-tree classes, built and loaded as usual, then
patched in place (router entering the route layer, by default the first edited layer; LoRA
apply on the edited linears).
Selected through `hf_overrides={"architectures": ["Sola..."], "sola": {...}}`."""

from __future__ import annotations

from vllm.model_executor.models.gpt2 import GPT2LMHeadModel
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from ..arch import arch_for
from .apply_backend import choose_apply
from .config import ServingConfig
from .graphs import check_graphs
from .layers import lora_targets, patch_model
from .ops import register_runtime
from .runner_support import check_runner, find_runner, is_mrv2
from .runtime import SolaRuntime


def init_sola(model, vllm_config) -> SolaRuntime:
    hf_config = vllm_config.model_config.hf_config
    config = ServingConfig.from_dict(dict(hf_config.sola))
    parallel = vllm_config.parallel_config
    if (parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
            parallel.data_parallel_size) != (1, 1, 1):
        # edit RPCs reach one engine's one worker: other ranks would route without the change
        raise ValueError("sola-vllm serves with tensor, pipeline and data parallel size 1 for "
                         "now")
    if vllm_config.lora_config is not None:
        raise ValueError("sola-vllm applies its own LoRAs: leave vLLM's --enable-lora off")
    runner = find_runner()
    check_runner(runner)  # before any weight is patched: fail at engine start
    check_pooled_prefix_caching(config, vllm_config, runner)
    # the model's dtype and device pick the apply backend (ServingConfig.apply); a punica
    # backend checks vLLM's kernels here, so a wrong kernel stops the engine at start
    device, dtype = next(model.parameters()).device, vllm_config.model_config.dtype
    check_graphs(vllm_config, choose_apply(config.apply, device, dtype))
    arch = arch_for(config.model_type).name
    groups = lora_targets(model, arch, config.layers, config.modules)
    max_tokens = max(vllm_config.scheduler_config.max_num_batched_tokens,
                     vllm_config.model_config.max_model_len)
    runtime = SolaRuntime(config, hf_config.hidden_size, list(groups.values()), max_tokens,
                          dtype=dtype, device=device,
                          max_seqs=vllm_config.scheduler_config.max_num_seqs)
    patch_model(model, arch, config.route_layer, groups, runtime, register_runtime(runtime))
    return runtime


def check_pooled_prefix_caching(config: ServingConfig, vllm_config, runner) -> None:
    """Mean-pooled keys with prefix caching need each cached block's state sums
    (`block_sums.BlockSums`), which only the V1 runner's hooks keep: under Model Runner V2 a
    hit's states would be missing from the key, so the engine does not start. Nor with a KV
    connector: blocks it loads were never computed here."""
    if config.key_pool == "mean" and getattr(vllm_config, "kv_transfer_config", None):
        # a block loaded from elsewhere was never computed here: no state sum, or a stale one
        raise ValueError("sola-vllm cannot serve mean-pooled routing keys with a KV transfer "
                         "or offload connector (kv_transfer_config): blocks it loads skip the "
                         "router, so their states would be missing from the keys")
    if (config.key_pool == "mean" and vllm_config.cache_config.enable_prefix_caching
            and is_mrv2(runner)):
        raise ValueError("sola-vllm serves mean-pooled routing keys with prefix caching only "
                         "under vLLM's V1 model runner (VLLM_USE_V2_MODEL_RUNNER=0): under "
                         "Model Runner V2 start vLLM with enable_prefix_caching=False "
                         "(--no-enable-prefix-caching)")


def _with_sola(base: type, name: str) -> type:
    """`base` built and loaded exactly as vLLM does, then patched with SoLA routing."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        self.sola = init_sola(self, vllm_config)

    def get_model_state_cls(self):
        """Model Runner V2's per-model hook (the V1 runner never asks)."""
        from .runner_hooks_v2 import SolaModelState

        return SolaModelState

    return type(name, (base,), {"__init__": __init__, "get_model_state_cls": get_model_state_cls,
                                "__module__": __name__, "__qualname__": name})


SolaLlamaForCausalLM = _with_sola(LlamaForCausalLM, "SolaLlamaForCausalLM")
SolaQwen2ForCausalLM = _with_sola(Qwen2ForCausalLM, "SolaQwen2ForCausalLM")
SolaQwen3ForCausalLM = _with_sola(Qwen3ForCausalLM, "SolaQwen3ForCausalLM")
SolaGPT2LMHeadModel = _with_sola(GPT2LMHeadModel, "SolaGPT2LMHeadModel")
