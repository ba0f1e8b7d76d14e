"""The plugin under vLLM's Model Runner V2 (MRV2).

Units (fast): the step layout built from MRV2's real `RequestState` / `InputBatch`, the release
of routes for finished (not preempted) requests through MRV2's real `finish_requests`, and the
start-up check that refuses a model runner sola-vllm cannot hook.

End to end (slow, real default model): MRV2 runs here on CPU only with its Triton kernels in the
interpreter, which vLLM refuses unless told Triton is there (`mrv2_cpu/sitecustomize.py`), so the
MRV2 engines run in a process of their own (`mrv2_cpu/run_engines.py`):
  sola    plugin; chunked prefill (64-token budget), prefix caching on, 32-token blocks
  strict  plugin; no chunked prefill, no prefix caching, a KV cache of 8 blocks (preemption)
  plain   vLLM without the plugin
and their greedy tokens are compared with the plugin under the V1 runner, in this process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import torch
from test_vllm_plugin import (
    ENGINE,
    LONG_ROUTED,
    LONG_UNROUTED,
    MARS,
    MAX_TOKENS,
    ROME,
    UNRELATED,
    _plugin_engine,
    _shutdown,
    sola_tokens,
)

HERE = Path(__file__).parent
MIXED = [ROME, UNRELATED[0], MARS, LONG_UNROUTED[0], UNRELATED[1], LONG_ROUTED, ROME,
         LONG_UNROUTED[1], UNRELATED[2]]
ROUTED_ROWS = (0, 2, 5, 6)
SOLA = dict(max_model_len=512, enable_chunked_prefill=True, max_num_batched_tokens=64,
            enable_prefix_caching=True)
STRICT = dict(max_model_len=192, enable_chunked_prefill=False, max_num_batched_tokens=192,
              enable_prefix_caching=False, num_gpu_blocks_override=8)
CAPACITY = dict(max_edits=8, max_keys=16, block_size=32)
# the engine core in the engines' process: no engine-core process to spawn and import vLLM into,
# so the engine starts in about half the time; only for plain vLLM, as the plugin's engines
# must keep their own: its busy loop steps once more after the last output, which releases the
# routes of the requests that finished (the tests read their stats for that)
IN_PROCESS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
# three engine starts with MRV2's kernels interpreted: minutes, more on a busy machine (the
# first test to use the engines pays for them within its own timeout)
def SLOW(test):  # noqa: N802 (a decorator, named like the marks it applies)
    return pytest.mark.slow(pytest.mark.timeout(1800)(test))


# --- the step layout -----------------------------------------------------------------------------
def _request_state(requests):
    """MRV2's RequestState on CPU (its host buffers made the way MRV2's CPU runner makes them)."""
    import vllm.v1.worker.cpu.buffer_utils as cpu_buffers
    import vllm.v1.worker.gpu.buffer_utils as gpu_buffers
    from vllm.v1.worker.gpu.states import RequestState

    with mock.patch.object(gpu_buffers, "UvaBuffer", cpu_buffers.UvaBuffer):
        states = RequestState(max_num_reqs=8, max_model_len=128, max_num_batched_tokens=64,
                              num_speculative_steps=0, vocab_size=100,
                              device=torch.device("cpu"))
        for req_id, prompt_len, prefill_len, computed in requests:
            states.add_request(req_id=req_id, prompt_len=prompt_len,
                               all_token_ids=list(range(prefill_len)),
                               num_computed_tokens=computed, max_tokens=8)
    return states


def _input_batch(states, rows):
    """An MRV2 InputBatch of `rows` = [(req_id, computed before the step, scheduled)]."""
    import dataclasses

    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

    num_tokens = sum(n for _, _, n in rows)
    dummy = InputBatch.make_dummy(len(rows), num_tokens, InputBuffers(8, 64, torch.device("cpu")))
    return dataclasses.replace(
        dummy, req_ids=[r for r, _, _ in rows],
        idx_mapping_np=np.array([states.req_id_to_index[r] for r, _, _ in rows], dtype=np.intp),
        num_scheduled_tokens=np.array([n for _, _, n in rows], dtype=np.int32),
        num_computed_tokens_np=np.array([c for _, c, _ in rows], dtype=np.int32))


def test_step_layout_has_the_true_positions_and_the_user_prompt_length():
    from sola_vllm.serving.runner_hooks_v2 import build_step_v2

    # (id, user prompt length, tokens MRV2 prefills, computed when added)
    states = _request_state([("new", 5, 5, 0), ("cached", 40, 40, 32), ("resumed", 3, 5, 0),
                             ("decode", 4, 4, 4)])
    # "cached": a prefix-cache hit of 32 tokens, then a chunk of 4 (key token not yet in it);
    # "resumed": back from preemption, MRV2 refills prompt + 2 outputs, the key stays at 2
    batch = _input_batch(states, [("decode", 6, 1), ("new", 0, 5), ("cached", 32, 4),
                                  ("resumed", 0, 5)])
    flags = {"new": ("cap-1", False), "decode": (None, True)}
    step = build_step_v2(batch, states, flags)
    assert step.num_tokens == 15
    assert step.tok_row.tolist() == [0] + [1] * 5 + [2] * 4 + [3] * 5
    assert step.tok_pos.tolist() == [6, 0, 1, 2, 3, 4, 32, 33, 34, 35, 0, 1, 2, 3, 4]
    assert step.row_prompt_len.tolist() == [4, 5, 40, 3]
    assert step.req_ids == ["decode", "new", "cached", "resumed"]
    assert step.captures == [None, "cap-1", None, None]
    assert step.canary == [True, False, False, False]


def test_a_dummy_batch_gets_no_step():
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

    from sola_vllm.serving.runner_hooks_v2 import build_step_v2

    states = _request_state([("a", 3, 3, 0)])
    dummy = InputBatch.make_dummy(2, 6, InputBuffers(8, 64, torch.device("cpu")))
    assert build_step_v2(dummy, states, {}) is None


def test_request_flags_read_capture_and_canary_from_extra_args():
    from vllm import SamplingParams

    from sola_vllm.serving.runner_hooks_v2 import request_flags

    def new(**extra):
        return SimpleNamespace(sampling_params=SamplingParams(extra_args=extra or None))

    assert request_flags(new()) == (None, False)
    assert request_flags(new(sola_capture="cap-9", sola_canary="yes")) == ("cap-9", True)
    assert request_flags(new(sola_canary=0)) == (None, False)
    assert request_flags(SimpleNamespace(sampling_params=None)) == (None, False)


# --- finished and preempted requests -------------------------------------------------------------
def test_mrv2_releases_the_routes_of_finished_requests_only():
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner

    from sola_vllm.serving import runner_hooks_v2 as hooks

    applied = hooks.mrv2_hooks_applied()
    hooks.apply_mrv2_hooks()
    try:
        released, removed = [], []
        runner = object.__new__(GPUModelRunner)
        runner.model = SimpleNamespace(sola=SimpleNamespace(finish_requests=released.extend))
        runner.pooling_runner = None
        runner._remove_request = removed.append
        runner.finish_requests(SimpleNamespace(finished_req_ids={"done"},
                                               preempted_req_ids={"preempted"}))
        assert released == ["done"]  # a preempted request keeps its route for its resumption
        assert removed == ["done", "preempted"]  # MRV2 itself frees both
    finally:
        if not applied:
            hooks.revert_mrv2_hooks()
    assert hooks.mrv2_hooks_applied() == applied


# --- which runner --------------------------------------------------------------------------------
@pytest.fixture
def v1_hooks():
    from sola_vllm.serving import runner_hooks

    applied = "_prepare_inputs" in runner_hooks._ORIGINAL
    runner_hooks.apply_runner_hooks()
    yield
    if not applied:
        runner_hooks.revert_runner_hooks()


def test_check_runner_accepts_both_runners_on_gpu_and_cpu(v1_hooks):
    from vllm.v1.worker.cpu.model_runner import CPUModelRunner as CpuV2
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner as CpuV1
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as GpuV2
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as GpuV1

    from sola_vllm.serving.runner_support import check_runner

    for cls in (GpuV1, CpuV1, GpuV2, CpuV2):
        assert check_runner(object.__new__(cls)) == f"{cls.__module__}.{cls.__qualname__}"


def test_check_runner_refuses_a_runner_it_cannot_hook(v1_hooks):
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from sola_vllm.serving.runner_support import UnsupportedRunnerError, check_runner

    class OwnStepsModelRunner(GPUModelRunner):  # steps past the V1 hook
        def _prepare_inputs(self, scheduler_output, num_scheduled_tokens):
            raise AssertionError("never called")

    class TPUModelRunner:
        pass

    for cls in (OwnStepsModelRunner, TPUModelRunner):
        with pytest.raises(UnsupportedRunnerError) as err:
            check_runner(object.__new__(cls))
        assert f"{cls.__module__}.{cls.__qualname__}" in str(err.value)
        assert "VLLM_USE_V2_MODEL_RUNNER=0" in str(err.value)
    with pytest.raises(UnsupportedRunnerError, match="VLLM_USE_V2_MODEL_RUNNER=0"):
        check_runner(None)


def test_the_model_build_finds_its_runner_and_refuses_an_unknown_one(v1_hooks):
    from vllm.config import CUDAGraphMode

    from sola_vllm.serving.models import init_sola
    from sola_vllm.serving.runner_support import UnsupportedRunnerError, find_runner

    class XPUModelRunner:
        def load_model(self, vllm_config):
            found.append(find_runner())
            return init_sola(None, vllm_config)

    found = []
    config = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(sola={})),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1,
                                        data_parallel_size=1),
        compilation_config=SimpleNamespace(cudagraph_mode=CUDAGraphMode.NONE),
        lora_config=None)
    runner = XPUModelRunner()
    with mock.patch("sola_vllm.serving.models.ServingConfig.from_dict"), \
            pytest.raises(UnsupportedRunnerError, match="XPUModelRunner"):
        runner.load_model(config)
    assert found == [runner]
    assert find_runner() is None  # no runner up this test's stack


# --- end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def edits(default_engine):
    engine = default_engine
    return {"rome": engine.train([ROME], "Rome.", edit_id="rome"),
            "mars": engine.train([MARS], "Mars.", edit_id="mars"),
            "nile": engine.train([LONG_ROUTED], "the Congo.", edit_id="nile")}


def _mrv2_spec(edit_paths: list[str]) -> dict:
    plugin = {**CAPACITY, **ENGINE}
    return {"edits": edit_paths, "max_tokens": MAX_TOKENS, "engines": [
        {"name": "sola", "plugin": True, "options": {**plugin, **SOLA}, "steps": [
            {"generate": MIXED}, {"generate": MIXED},  # the second pass hits the prefix cache
            {"revoke": "rome"}, {"generate": [ROME, MARS]}, {"restore": "rome"},
            {"generate": [ROME]}, {"stats": True}]},
        {"name": "strict", "plugin": True, "options": {**plugin, **STRICT}, "steps": [
            {"generate": MIXED * 2}, {"stats": True}]},  # 18 sequences, 8 KV blocks
        {"name": "plain", "plugin": False, "options": {**ENGINE, "max_model_len": 512},
         "steps": [{"generate": MIXED}], "env": IN_PROCESS},
    ]}


@pytest.fixture(scope="module")
def mrv2(edits, tmp_path_factory):
    folder = tmp_path_factory.mktemp("mrv2")
    paths = []
    for edit in edits.values():
        paths.append(str(folder / f"{edit.id}.edit"))
        Path(paths[-1]).write_bytes(edit.to_bytes())
    spec, out = folder / "spec.json", folder / "out.json"
    spec.write_text(json.dumps(_mrv2_spec(paths)))
    path = [str(HERE / "mrv2_cpu"), str(HERE.parent), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in path if p),
               SOLA_TEST_MRV2_CPU="1", TRITON_INTERPRET="1", VLLM_USE_V2_MODEL_RUNNER="1",
               VLLM_ALLOW_INSECURE_SERIALIZATION="1", VLLM_CPU_KVCACHE_SPACE="1")
    proc = subprocess.run([sys.executable, str(HERE / "mrv2_cpu" / "run_engines.py"),
                           str(spec), str(out)], env=env, capture_output=True, text=True,
                          timeout=1700)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def v1(edits):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
        llm = _plugin_engine(edits, **SOLA)
    yield llm
    _shutdown(llm)


@SLOW
def test_the_mrv2_engines_ran_mrv2_with_the_plugins_model_state(mrv2):
    runner = "vllm.v1.worker.cpu.model_runner.CPUModelRunner"  # MRV2's CPU runner
    assert mrv2["runner"] == {"sola": [runner, "SolaModelState"],
                              "strict": [runner, "SolaModelState"],
                              "plain": [runner, "DefaultModelState"]}


@SLOW
def test_routed_and_unrouted_rows_equal_the_v1_runner_exactly(mrv2, v1):
    want = sola_tokens(v1, MIXED)
    first, cached = mrv2["results"]["sola"][:2]
    assert first == want
    assert cached == want  # prefix-cache hits under MRV2
    texts = [c.text for c in v1.generate([MIXED[i] for i in ROUTED_ROWS], max_tokens=MAX_TOKENS)]
    assert texts == [" Rome.", " Mars.", " the Congo.", " Rome."]


@SLOW
def test_unrouted_rows_equal_plain_vllm_exactly_under_mrv2(mrv2):
    got, plain = mrv2["results"]["sola"][0], mrv2["results"]["plain"][0]
    for i in range(len(MIXED)):
        if i in ROUTED_ROWS:
            assert got[i] != plain[i]  # the routed rows did change
        else:
            assert got[i] == plain[i]


@SLOW
def test_revoke_under_mrv2_gives_the_base_models_exact_tokens(mrv2):
    results, plain = mrv2["results"]["sola"], mrv2["results"]["plain"][0]
    mixed = results[0]
    assert results[2] == "revoked" and results[4] == "active"
    assert results[3] == [plain[0], mixed[2]]  # rome's prompt: base; mars' prompt: still edited
    assert results[5] == [mixed[0]]
    assert results[6]["requests_in_flight"] == 0  # every finished request released its route


@SLOW
def test_preemption_under_mrv2_keeps_each_route(mrv2, v1):
    tokens, stats = mrv2["results"]["strict"]
    assert tokens == sola_tokens(v1, MIXED) * 2
    assert stats["recomputed_key_tokens"] > 0, "no preemption happened"
    assert stats["requests_in_flight"] == 0
