"""SoLA on vLLM's Model Runner V2 (`vllm/v1/worker/gpu/model_runner.py`, CUDA's default; its
CPU subclass `vllm/v1/worker/cpu/model_runner.py` with VLLM_USE_V2_MODEL_RUNNER=1).

MRV2 lets a model supply its own `ModelState` (`get_model_state_cls`, see `models.py`), which
sees each request arrive and leave and each batch just before its forward. `SolaModelState`
builds the step's `StepMeta` there. Routes are released through one wrap of
`GPUModelRunner.finish_requests`, because MRV2 calls `ModelState.remove_request` for finished
*and* preempted requests alike, and a preempted request must keep its route (decision 3: a
response is wholly edited or wholly base, so its key is not decided again on resumption).
"""

from __future__ import annotations

import numpy as np
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from .runner_hooks import opts_in_to_canary
from .runtime import StepMeta

_ORIGINAL: dict[str, object] = {}


def _sola_runtime(model):
    if hasattr(model, "unwrap"):
        model = model.unwrap()
    return getattr(model, "sola", None)


def request_flags(new_req_data) -> tuple[str | None, bool]:
    """(key-capture id, opts in to canaries) from a new request's `extra_args`."""
    params = getattr(new_req_data, "sampling_params", None)
    extra = getattr(params, "extra_args", None) or {}
    return extra.get("sola_capture"), opts_in_to_canary(extra.get("sola_canary"))


def build_step_v2(input_batch, req_states, flags: dict[str, tuple[str | None, bool]]
                  ) -> StepMeta | None:
    """The step's token layout from MRV2's `InputBatch` (rows in batch order) and
    `RequestState` (per-request slots); None for a dummy batch (profile, warm-up, DP padding:
    its request ids are made up, so no request of it is known to `req_states`)."""
    num_reqs = input_batch.num_reqs
    req_ids = list(input_batch.req_ids[:num_reqs])
    if not req_ids or any(r not in req_states.req_id_to_index for r in req_ids):
        return None
    counts = np.asarray(input_batch.num_scheduled_tokens[:num_reqs], dtype=np.int64)
    total = int(counts.sum())
    if total != input_batch.num_tokens:  # adaptive draft verification moves tokens on device
        raise RuntimeError(f"sola-vllm: {input_batch.num_tokens} tokens in this step but "
                           f"{total} scheduled; speculative decoding is not supported")
    rows = np.repeat(np.arange(num_reqs), counts)
    first = np.cumsum(counts) - counts  # each row's first token in the step
    # the positions MRV2 computes on the device (prepare_pos_seq_lens): tokens already
    # computed (prefix-cache hits and earlier chunks included) + the offset within this step
    computed = np.asarray(input_batch.num_computed_tokens_np[:num_reqs], dtype=np.int64)
    pos = computed[rows] + np.arange(total) - first[rows]
    # the user prompt's length: after preemption MRV2 refills prompt + outputs (prefill_len)
    idx = np.asarray(input_batch.idx_mapping_np[:num_reqs])
    prompt_len = req_states.prompt_len.np[idx].astype(np.int64)
    captures = [flags.get(r, (None, False))[0] for r in req_ids]
    canary = [flags.get(r, (None, False))[1] for r in req_ids]
    return StepMeta(total, rows, pos.astype(np.int64), prompt_len, req_ids, captures, canary)


class SolaModelState(DefaultModelState):
    """vLLM's default state (RoPE, prompt embeddings) plus the per-step SoLA layout."""

    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.sola = _sola_runtime(model)
        self.flags: dict[str, tuple[str | None, bool]] = {}  # request id -> request_flags
        apply_mrv2_hooks()

    def add_request(self, req_index, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        # a resumed request comes back here with its sampling params: flags are re-read
        self.flags[new_req_data.req_id] = request_flags(new_req_data)

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        self.flags.pop(req_id, None)

    def prepare_inputs(self, input_batch, req_states):
        # called before every forward of `execute_model`, dummy ones included: a stale step
        # is never seen by a later forward
        self.sola.step = build_step_v2(input_batch, req_states, self.flags)
        return super().prepare_inputs(input_batch, req_states)

    def prepare_dummy_inputs(self, num_reqs: int, num_tokens: int):
        self.sola.step = None  # CUDA-graph capture: dummy tokens route nowhere
        return super().prepare_dummy_inputs(num_reqs, num_tokens)

    def postprocess_state(self, idx_mapping, num_sampled, num_computed_tokens=None) -> None:
        self.sola.step = None  # after the forward and its sampling
        return super().postprocess_state(idx_mapping, num_sampled, num_computed_tokens)


def apply_mrv2_hooks() -> None:
    """Release routes of finished requests only (not of preempted ones). Idempotent."""
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as Runner

    if "finish_requests" in _ORIGINAL:
        return
    finish = Runner.finish_requests
    _ORIGINAL["finish_requests"] = finish

    def finish_requests(self, scheduler_output):
        runtime = _sola_runtime(getattr(self, "model", None))
        if runtime is not None:
            runtime.finish_requests(scheduler_output.finished_req_ids)
        return finish(self, scheduler_output)

    Runner.finish_requests = finish_requests


def revert_mrv2_hooks() -> None:
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as Runner

    if "finish_requests" in _ORIGINAL:
        Runner.finish_requests = _ORIGINAL.pop("finish_requests")


def mrv2_hooks_applied() -> bool:
    return "finish_requests" in _ORIGINAL
