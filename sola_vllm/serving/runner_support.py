"""Which vLLM model runner builds the model, and does sola-vllm hook it? Checked when the model
is built (at engine start), so an engine whose runner sola-vllm cannot hook fails to start
instead of serving every request unrouted."""

from __future__ import annotations

import sys

MRV2_MODULE = "vllm.v1.worker.gpu.model_runner"


class UnsupportedRunnerError(RuntimeError):
    """The model runner is one whose steps sola-vllm cannot see."""


def runner_name(runner) -> str:
    return f"{type(runner).__module__}.{type(runner).__qualname__}"


def find_runner(frame=None):
    """The model runner whose `load_model` is building the model: the nearest caller frame
    whose `self` is a `...ModelRunner` (None outside a runner)."""
    frame = frame or sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if candidate is not None and type(candidate).__name__.endswith("ModelRunner"):
            return candidate
        frame = frame.f_back
    return None


def is_mrv2(runner) -> bool:
    module = sys.modules.get(MRV2_MODULE)  # imported wherever an MRV2 runner exists
    return module is not None and isinstance(runner, module.GPUModelRunner)


def check_runner(runner) -> str:
    """The runner's name if sola-vllm hooks it (Model Runner V2 through its ModelState, the V1
    runner through `runner_hooks`); raises UnsupportedRunnerError naming it otherwise."""
    from .runner_hooks import v1_hooks_reach

    if runner is None:
        raise UnsupportedRunnerError(
            "sola-vllm's model was built outside a vLLM model runner it knows; it routes only "
            "under vLLM's V1 GPUModelRunner (VLLM_USE_V2_MODEL_RUNNER=0) and Model Runner V2")
    name = runner_name(runner)
    if is_mrv2(runner) or v1_hooks_reach(type(runner)):
        return name
    raise UnsupportedRunnerError(
        f"sola-vllm cannot route requests under vLLM's model runner {name}: it hooks only "
        "vLLM's V1 GPUModelRunner (and its CPU subclass) and Model Runner V2 (vllm.v1.worker."
        "gpu / cpu model_runner). Start vLLM with VLLM_USE_V2_MODEL_RUNNER=0 to use the V1 "
        "runner.")
