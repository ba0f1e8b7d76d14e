"""Hooks on vLLM's V1 model runner (CPU's default; CUDA with VLLM_USE_V2_MODEL_RUNNER=0) and on
the prefix-cache block hash. Each `apply_*` is idempotent and has a matching `revert_*`.
Model Runner V2 is hooked through its ModelState instead (`runner_hooks_v2`)."""

from __future__ import annotations

import os

import numpy as np

from .runtime import StepMeta

PREFIX_GUARD_ENV = "SOLA_VLLM_PREFIX_GUARD"
_ORIGINAL: dict[str, object] = {}


def _runtime(runner):
    model = getattr(runner, "model", None)
    if model is None:
        return None
    if hasattr(model, "unwrap"):
        model = model.unwrap()
    return getattr(model, "sola", None)


def build_step(runner, scheduler_output, num_scheduled_tokens: np.ndarray,
               with_blocks: bool = False) -> StepMeta:
    batch = runner.input_batch
    num_reqs = batch.num_reqs
    total = int(scheduler_output.total_num_scheduled_tokens)
    rows = np.repeat(np.arange(num_reqs), num_scheduled_tokens[:num_reqs])
    # the positions vLLM itself computed in _prepare_inputs
    pos = batch.num_computed_tokens_cpu[rows] + runner.query_pos.np[:total]
    req_ids = list(batch.req_ids[:num_reqs])
    captures, canary = [], []
    for req_id in req_ids:
        params = getattr(runner.requests.get(req_id), "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        captures.append(extra.get("sola_capture"))
        canary.append(opts_in_to_canary(extra.get("sola_canary")))
    prompt_len = np.asarray(batch.num_prompt_tokens[:num_reqs], dtype=np.int64)
    step = StepMeta(total, rows, pos.astype(np.int64), prompt_len, req_ids, captures, canary)
    if with_blocks:
        add_block_tables(step, runner, num_reqs)
    return step


def add_block_tables(step: StepMeta, runner, num_reqs: int) -> None:
    """The rows' KV block tables (mean keys with prefix caching, `block_sums.BlockSums`): the
    input batch's table of KV cache group 0 (`_update_states` has written this step's blocks
    into it), copied because the next step rewrites it."""
    groups = getattr(runner, "kv_cache_config", None)
    if groups is None or len(groups.kv_cache_groups) != 1:  # hybrid models: not supported
        return
    table = runner.input_batch.block_table[0]
    step.row_blocks = table.block_table.np[:num_reqs].copy()
    step.block_size = int(table.block_size)
    step.num_kv_blocks = int(groups.num_blocks)


def opts_in_to_canary(value: object) -> bool:
    """`sola_canary` from a request's `vllm_xargs`: true, 1 or "true" / "1" / "yes" opt in.
    vLLM types xargs values as str | int | float, so a JSON true may arrive as 1."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return value is True or (isinstance(value, int | float) and value == 1)


def apply_runner_hooks() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as Runner

    if "_prepare_inputs" in _ORIGINAL:
        return
    prepare, update, forward = (Runner._prepare_inputs, Runner._update_states,
                                Runner._model_forward)
    _ORIGINAL.update(_prepare_inputs=prepare, _update_states=update, _model_forward=forward)

    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
        result = prepare(self, scheduler_output, num_scheduled_tokens)
        runtime = _runtime(self)
        if runtime is not None:
            runtime.step = build_step(self, scheduler_output, num_scheduled_tokens,
                                      with_blocks=runtime.pooler is not None)
        return result

    def _update_states(self, scheduler_output):
        runtime = _runtime(self)
        if runtime is not None:
            runtime.finish_requests(scheduler_output.finished_req_ids)
        return update(self, scheduler_output)

    def _model_forward(self, *args, **kwargs):
        try:
            return forward(self, *args, **kwargs)
        finally:
            runtime = _runtime(self)
            if runtime is not None:
                runtime.step = None  # a later dummy/profile forward must not reuse it

    Runner._prepare_inputs = _prepare_inputs
    Runner._update_states = _update_states
    Runner._model_forward = _model_forward


_V1_HOOKED = ("_prepare_inputs", "_update_states", "_model_forward")


def v1_hooks_reach(runner_cls: type) -> bool:
    """True if `runner_cls` is vLLM's V1 runner (or a subclass) and every hooked method it runs
    is the hook (a subclass that overrides one would step past it)."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as Runner

    if not issubclass(runner_cls, Runner) or "_prepare_inputs" not in _ORIGINAL:
        return False
    return all(getattr(runner_cls, name) is getattr(Runner, name) for name in _V1_HOOKED)


def revert_runner_hooks() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as Runner

    for name in _V1_HOOKED:
        if name in _ORIGINAL:
            setattr(Runner, name, _ORIGINAL.pop(name))


def _guarded(original):
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, start_mm_idx):
        keys, next_mm = original(request, start_token_idx, end_token_idx, start_mm_idx)
        # A block holding the key token (the prompt's last) or generated tokens carries the
        # request's edit (decision 2): salt it with the request id so no other request reuses
        # it. Blocks wholly before the key token are base-model KV and stay shareable.
        if end_token_idx > request.num_prompt_tokens - 1:
            keys = (*(keys or ()), ("sola_tail", request.request_id))
        return keys, next_mm

    generate_block_hash_extra_keys.__wrapped__ = original
    return generate_block_hash_extra_keys


_HASH_MODULES = ("vllm.v1.core.kv_cache_utils", "vllm.v1.core.block_pool",
                 "vllm.v1.simple_kv_offload.manager")


def apply_prefix_cache_guard() -> None:
    """Only where SOLA_VLLM_PREFIX_GUARD=1 (set by sola-vllm's launchers), so installing the
    package does not change plain vLLM deployments."""
    import importlib

    if os.environ.get(PREFIX_GUARD_ENV) != "1":
        return
    for name in _HASH_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        current = getattr(module, "generate_block_hash_extra_keys", None)
        if current is not None and not hasattr(current, "__wrapped__"):
            module.generate_block_hash_extra_keys = _guarded(current)


def revert_prefix_cache_guard() -> None:
    import importlib
    import sys

    for name in _HASH_MODULES:
        module = sys.modules.get(name) or importlib.import_module(name)
        current = getattr(module, "generate_block_hash_extra_keys", None)
        if current is not None and hasattr(current, "__wrapped__"):
            module.generate_block_hash_extra_keys = current.__wrapped__
