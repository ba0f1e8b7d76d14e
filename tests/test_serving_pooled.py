"""Mean-pooled routing keys and a key map in the vLLM worker's SolaRuntime, without vLLM: the
pooled query equals `keys.pool_keys` however prefill chunks split a prompt, a recompute restarts
the sum, a skipped prefix without block sums routes to no edit (counted; with them see
tests/test_block_sums.py), captures stay raw, and with a key map routes equal the reference
search on mapped keys and queries."""

import numpy as np
import pytest
import torch
from helpers import make_synthetic_edit

from sola_vllm.arch import EditShape
from sola_vllm.edit import lora_name
from sola_vllm.kernels.nearest_key import nearest_key_ref
from sola_vllm.key_map import KeyMap, KeyMapError
from sola_vllm.keys import pool_keys
from sola_vllm.serving import route_kernel
from sola_vllm.serving.config import ServingConfig
from sola_vllm.serving.llm import check_prefix_caching, engine_kwargs
from sola_vllm.serving.runtime import LoraTarget, SolaRuntime, StepMeta
from sola_vllm.serving.serve import build_command, prefix_caching_asked

HIDDEN, INTER, LAYERS, MODULES = 64, 128, (2, 3), ("mlp.up_proj",)
ROUTE_LAYER, MODEL = 1, "m" * 64
SHAPE = EditShape("llama", 4, LAYERS, MODULES, 4, 1.0, "mean", ROUTE_LAYER)


def config(**kw) -> ServingConfig:
    kw = {"metric": "cosine", "threshold": 0.01, "max_edits": 4, "max_keys": 8,
          "max_rank": 4, "apply": "torch", **kw}
    return ServingConfig.from_shape(SHAPE, "llama", MODEL, **kw)


def make_runtime(**kw) -> SolaRuntime:
    groups = [[LoraTarget(lora_name(layer, "mlp.up_proj"), 0, INTER, HIDDEN)]
              for layer in LAYERS]
    return SolaRuntime(config(**kw), HIDDEN, groups, max_num_tokens=64)


def edit(i: int, keys: torch.Tensor):
    e = make_synthetic_edit(f"e{i}", layers=LAYERS, modules=MODULES, hidden=HIDDEN,
                            intermediate=INTER, seed=i, shape_fingerprint=SHAPE.fingerprint())
    e.keys = keys.reshape(-1, HIDDEN).float()
    return e


def reference_key(states: torch.Tensor) -> torch.Tensor:
    """`keys.pool_keys` of one whole prompt's states [P, d] (what the reference engine reads)."""
    mask = torch.ones(1, states.shape[0], dtype=torch.long)
    return pool_keys(states[None], mask, torch.tensor([states.shape[0] - 1]), "mean")[0]


def run(runtime, steps, states, prompt_len, captures=None, canary=None):
    """Feeds `steps` (each a list of (request, positions)) through `runtime.route`, the
    hidden rows taken from `states[request][position]`; returns each step's token slots."""
    slots = []
    for rows_of_step in steps:
        req_ids = [r for r, _ in rows_of_step]
        rows = np.concatenate([np.full(len(p), i) for i, (_, p) in enumerate(rows_of_step)])
        pos = np.concatenate([np.asarray(p, dtype=np.int64) for _, p in rows_of_step])
        hidden = torch.cat([states[r][list(p)] for r, p in rows_of_step])
        runtime.step = StepMeta(len(pos), rows, pos,
                                np.asarray([prompt_len[r] for r in req_ids]), req_ids,
                                [(captures or {}).get(r) for r in req_ids])
        runtime.route(hidden)
        slots.append(runtime.tok_slot[:len(pos)].tolist())
    runtime.step = None
    return slots


def integer_states(length: int, seed: int) -> torch.Tensor:
    """Small integers: fp32 sums of them are exact in any order, so pooled keys compare with
    the reference bit for bit whatever the chunking."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(-50, 50, (length, HIDDEN), generator=gen).float()


PROMPTS = {"a": 9, "b": 5, "c": 4, "d": 1}  # prompt lengths; "d": a one-token prompt
SCHEDULES = {
    "one step each": [[("a", range(9)), ("b", range(5)), ("c", range(4)), ("d", [0])]],
    # chunked prefill: "a" over three steps, beside other requests' prefill and decodes
    "chunked": [[("a", range(0, 3)), ("b", range(5))],
                [("b", [5]), ("a", range(3, 7)), ("c", range(0, 2))],
                [("c", range(2, 4)), ("b", [6]), ("a", range(7, 9)), ("d", [0])],
                [("a", [9]), ("c", [4]), ("d", [1])]],
    "one token at a time": [[("a", [p]), ("c", [p])] for p in range(4)]
                           + [[("a", [p])] for p in range(4, 9)] + [[("b", range(5)),
                                                                     ("d", [0])]],
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_the_pooled_query_equals_pool_keys_however_the_prompt_is_split(schedule):
    runtime = make_runtime()
    states = {r: integer_states(n + 2, seed=i) for i, (r, n) in enumerate(PROMPTS.items())}
    ids = {r: f"cap-{r}" for r in PROMPTS}
    runtime.expect_captures(list(ids.values()))
    run(runtime, SCHEDULES[schedule], states, PROMPTS, captures=ids)
    for r, n in PROMPTS.items():
        got = runtime.take_captures([ids[r]])[0]
        assert got.dtype == torch.float32 and got.shape == (HIDDEN,)
        assert torch.equal(got, reference_key(states[r][:n])), r
    assert torch.equal(reference_key(states["d"][:1]), states["d"][0])  # its only state
    assert runtime.pooler.sums == {}  # every sum freed at its key token


def test_pooled_queries_of_real_valued_states_match_the_reference_closely():
    """Random fp32 states: the chunked sum adds in another order than the reference's
    reduction, so equal up to fp32 rounding (a few ulps of a 9-term mean)."""
    runtime = make_runtime()
    gen = torch.Generator().manual_seed(3)
    states = {r: torch.randn(n + 2, HIDDEN, generator=gen) * 5 for r, n in PROMPTS.items()}
    ids = {r: f"cap-{r}" for r in PROMPTS}
    runtime.expect_captures(list(ids.values()))
    run(runtime, SCHEDULES["chunked"], states, PROMPTS, captures=ids)
    for r, n in PROMPTS.items():
        torch.testing.assert_close(runtime.take_captures([ids[r]])[0],
                                   reference_key(states[r][:n]), rtol=1e-6, atol=1e-6)


def test_a_pooled_request_routes_at_its_key_token_and_frees_its_sum():
    runtime = make_runtime()
    states = {"a": integer_states(8, 0), "b": integer_states(8, 1), "x": integer_states(8, 2)}
    e = edit(0, reference_key(states["a"][:6]))
    runtime.add_edit(e, e.keys)
    prompt_len = {"a": 6, "b": 6, "x": 6}
    slots = run(runtime, [[("a", range(0, 4)), ("b", range(0, 2)), ("x", range(0, 3))],
                          [("b", range(2, 6)), ("a", range(4, 6))],
                          [("a", [6]), ("b", [6])]], states, prompt_len)
    # "a" routes at its key token (position 5) and keeps its edit; prompt tokens stay base
    assert slots == [[-1] * 9, [-1] * 5 + [0], [0, -1]]
    assert runtime.routes == {"a": 0, "b": -1}
    assert set(runtime.pooler.sums) == {"x"}  # routed requests' sums are freed...
    runtime.finish_requests(["x"])  # ...and so is the sum of one that ends in prefill
    assert runtime.pooler.sums == {}
    assert runtime.stats()["incomplete_pooled_keys"] == 0


def test_a_recomputed_prompt_restarts_its_sum():
    """Preemption frees the KV cache; the prompt is prefilled again from position 0. The
    earlier chunk's states (here made different on purpose) must not count twice."""
    runtime = make_runtime()
    before, again = integer_states(8, 0), integer_states(8, 1)
    runtime.expect_captures(["cap"])
    run(runtime, [[("a", range(0, 3))]], {"a": before}, {"a": 6}, captures={"a": "cap"})
    run(runtime, [[("a", range(0, 4))], [("a", range(4, 6))]], {"a": again}, {"a": 6},
        captures={"a": "cap"})
    assert torch.equal(runtime.take_captures(["cap"])[0], reference_key(again[:6]))


def test_a_skipped_prefix_routes_to_no_edit_and_is_counted():
    """A prefix-cache hit without block tables (`StepMeta.row_blocks`): the first positions
    never reach the router and cannot be recovered. The partial mean would
    sit on the edit's key here, and must not be used."""
    runtime = make_runtime()
    states = integer_states(10, 0)
    partial = states[4:8].mean(dim=0)  # what a sum of positions 4..7 only would give
    e = edit(0, partial)
    runtime.add_edit(e, e.keys)
    runtime.expect_captures(["cap"])
    slots = run(runtime, [[("a", range(4, 8)), ("c", range(4, 8))], [("a", [8])]],
                {"a": states, "c": states}, {"a": 8, "c": 8}, captures={"c": "cap"})
    assert slots == [[-1] * 8, [-1]]
    assert runtime.routes == {"a": -1, "c": -1}
    assert runtime.stats()["incomplete_pooled_keys"] == 2
    assert runtime.request_log.records["a"].slot == -1 and runtime.hits[0] == 0
    with pytest.raises(ValueError, match="no key was captured"):
        runtime.take_captures(["cap"])  # an incomplete key is never recorded
    assert runtime.pooler.sums == {} and runtime.expected == set()


def fitted_map(tmp_path, k: int = 16, **info) -> str:
    gen = torch.Generator().manual_seed(7)
    key_map = KeyMap(torch.randn(HIDDEN, generator=gen), 2.0,
                     torch.randn(HIDDEN, k, generator=gen),
                     {"model_fingerprint": MODEL, "key_pool": "mean",
                      "route_layer": ROUTE_LAYER, **info})
    path = tmp_path / "map.safetensors"
    key_map.save(path)
    return str(path)


def test_with_a_key_map_routes_equal_the_reference_search_on_mapped_keys(tmp_path):
    path = fitted_map(tmp_path)
    runtime = make_runtime(key_map=path)
    key_map = KeyMap.load(path)
    gen = torch.Generator().manual_seed(1)
    keys = [torch.randn(HIDDEN, generator=gen) for _ in range(3)]
    for i, key in enumerate(keys):
        e = edit(i, key)
        runtime.add_edit(e, e.keys)
    table, owners = runtime.routed_keys(False)[:2]
    assert table.shape == (3, 16) and torch.equal(table, key_map(torch.stack(keys)))
    assert torch.equal(runtime.keys[:3], torch.stack(keys))  # stored keys stay raw
    # "near": edit 1's key moved along a direction the map ignores (raw cosine far off)
    null = torch.linalg.svd(key_map.proj.T, full_matrices=True).Vh[-1]
    wanted = {"hit0": keys[0], "near": keys[1] + 40 * null, "far": torch.randn(HIDDEN) * 3}
    assert 1 - torch.cosine_similarity(wanted["near"], keys[1], dim=0) > 0.5
    states = {r: q.repeat(5, 1) for r, q in wanted.items()}  # every pooled state = the query
    run(runtime, [[(r, range(4)) for r in wanted]], states, dict.fromkeys(wanted, 4))
    queries = torch.stack([reference_key(states[r][:4]) for r in wanted])
    slots, _, _ = nearest_key_ref(key_map(queries), key_map(torch.stack(keys)), owners, 0.01,
                                  "cosine")
    assert [runtime.routes[r] for r in wanted] == slots.tolist() == [0, 1, -1]


def test_a_key_map_for_other_keys_stops_the_runtime_at_start(tmp_path):
    with pytest.raises(KeyMapError, match="route_layer 2; this engine has 1"):
        make_runtime(key_map=fitted_map(tmp_path, route_layer=2))
    with pytest.raises(KeyMapError, match="model_fingerprint"):
        make_runtime(key_map=fitted_map(tmp_path, model_fingerprint="f" * 64))


@pytest.mark.skipif(not route_kernel.interpreted(), reason="needs TRITON_INTERPRET=1")
def test_the_triton_router_is_checked_and_routes_on_the_mapped_width(tmp_path, monkeypatch):
    widths = []
    real = route_kernel.self_check

    def spy(nearest, hidden_size, *args):
        widths.append(hidden_size)
        return real(nearest, hidden_size, *args)

    monkeypatch.setattr("sola_vllm.serving.runtime.self_check", spy)
    path = fitted_map(tmp_path, k=16)
    runtimes = [make_runtime(key_map=path, router=router) for router in ("triton", "torch")]
    assert widths == [16] and runtimes[0].router == "triton"
    gen = torch.Generator().manual_seed(2)
    keys = torch.randn(3, HIDDEN, generator=gen)
    states = {f"r{i}": (keys[i % 3] + 0.01 * i).repeat(4, 1) for i in range(6)}
    for runtime in runtimes:
        for i in range(3):
            e = edit(i, keys[i])
            runtime.add_edit(e, e.keys)
        run(runtime, [[(r, range(3)) for r in states]], states, dict.fromkeys(states, 3))
    assert runtimes[0].routes == runtimes[1].routes


@pytest.mark.parametrize("bad, message", [
    ({"key_pool": "max"}, "key_pool 'max'"),
    ({"route_layer": 3}, "route_layer 3 comes after"),
    ({"route_layer": -1}, "non-negative"),
    ({"key_map": "relative/map.safetensors"}, "absolute path"),
])
def test_the_serving_key_options_are_validated(bad, message):
    with pytest.raises(ValueError, match=message):
        ServingConfig.from_dict({**config().to_dict(), **bad})


def test_the_key_options_reach_the_workers_and_mean_keys_turn_prefix_caching_off(
        tmp_path, monkeypatch):
    """Only where Model Runner V2 may run: the V1 runner keeps per-block sums for cache hits
    (tests/test_block_sums.py)."""
    from sola_vllm.serving.runner_hooks import PREFIX_GUARD_ENV

    monkeypatch.setenv(PREFIX_GUARD_ENV, "1")  # engine_kwargs sets it: restored afterwards
    serving = config()
    assert (serving.key_pool, serving.route_layer) == ("mean", ROUTE_LAYER)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    assert "enable_prefix_caching" not in engine_kwargs(tmp_path, serving)
    check_prefix_caching(serving, True)
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    kwargs = engine_kwargs(tmp_path, serving)
    assert ServingConfig.from_dict(kwargs["hf_overrides"]["sola"]) == serving
    assert kwargs["enable_prefix_caching"] is False
    last = ServingConfig.from_shape(EditShape("llama", 4, LAYERS, MODULES, 4, 1.0), "llama",
                                    MODEL)
    assert last.route_layer == LAYERS[0] and "enable_prefix_caching" not in engine_kwargs(
        tmp_path, last)
    with pytest.raises(ValueError, match="prefix caching cannot serve mean-pooled"):
        check_prefix_caching(serving, True)
    check_prefix_caching(serving, False)
    check_prefix_caching(last, True)
    # `sola-vllm serve`: the flag is added unless the user chose; asking for caching is caught
    command = build_command({**kwargs, "model": "/m/tiny"}, "127.0.0.1", 8000, [])
    assert "--no-enable-prefix-caching" in command
    assert prefix_caching_asked(["--enable-prefix-caching"]) is True
    assert prefix_caching_asked(["--enable-prefix-caching", "--no-enable-prefix-caching"]) is False
    assert prefix_caching_asked(["--max-model-len", "64"]) is None


def test_serve_carries_the_key_options_and_map_and_refuses_prefix_caching(tmp_path,
                                                                          monkeypatch):
    """`sola-vllm serve` with a config file asking for mean keys at layer 1 and a key map: both
    reach the workers (a non-empty store serves the keys its edits were read with instead,
    `commands.config_for_store`), the map's path is made absolute and checked before vLLM
    starts, and under Model Runner V2 prefix caching is turned off or, asked for, refused
    (the V1 runner serves mean keys with it)."""
    import json

    from sola_vllm.cli import build_parser
    from sola_vllm.models import model_fingerprint, tiny_model
    from sola_vllm.serving.serve import prepare

    model = tiny_model("llama")
    fingerprint = model_fingerprint(model)
    for name, layer in (("map.safetensors", ROUTE_LAYER), ("other.safetensors", 0)):
        KeyMap(torch.zeros(HIDDEN), 1.0, torch.eye(HIDDEN)[:, :8],
               {"model_fingerprint": fingerprint, "key_pool": "mean", "route_layer": layer,
                "threshold": 0.05}).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)  # the config names the map relative to here
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")

    def serve_args(key_map: str, *extra: str):
        (tmp_path / "config.json").write_text(json.dumps(
            {"edit": {"layers": list(LAYERS), "key_pool": "mean", "route_layer": ROUTE_LAYER},
             "router": {"key_map": key_map}}))
        return build_parser().parse_known_args(
            ["serve", "--model", str(model), "--store", str(tmp_path / "store"),
             "--config", "config.json", *extra])

    cmd, env = prepare(*serve_args("map.safetensors"))
    sola = json.loads(cmd[cmd.index("--hf-overrides") + 1])["sola"]
    assert (sola["key_pool"], sola["route_layer"]) == ("mean", ROUTE_LAYER)
    assert sola["key_map"] == str(tmp_path / "map.safetensors") and sola["threshold"] == 0.05
    shape = EditShape("llama", 4, LAYERS, ("mlp.up_proj", "mlp.down_proj"), 8, 1.0, "mean",
                      ROUTE_LAYER)
    assert sola["shape_fingerprint"] == shape.fingerprint()
    assert "--no-enable-prefix-caching" in cmd
    assert json.loads(env["SOLA_VLLM_CONFIG"])["edit"]["key_pool"] == "mean"
    with pytest.raises(ValueError, match="prefix caching cannot serve mean-pooled"):
        prepare(*serve_args("map.safetensors", "--enable-prefix-caching"))
    with pytest.raises(KeyMapError, match="route_layer 0; this engine has 1"):
        prepare(*serve_args("other.safetensors"))
    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "0")
    cmd, _ = prepare(*serve_args("map.safetensors", "--enable-prefix-caching"))
    assert "--no-enable-prefix-caching" not in cmd and "--enable-prefix-caching" in cmd


def test_model_runner_v2_with_prefix_caching_refuses_mean_keys_at_start():
    """Whatever launched it: the worker itself refuses, knowing its runner (only the V1
    runner's hooks keep the per-block sums a cache hit needs)."""
    from types import SimpleNamespace

    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as Mrv2Runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    from sola_vllm.serving.models import check_pooled_prefix_caching

    def vllm_config(prefix_caching: bool):
        return SimpleNamespace(
            cache_config=SimpleNamespace(enable_prefix_caching=prefix_caching))

    mrv2, v1 = object.__new__(Mrv2Runner), object.__new__(V1Runner)
    with pytest.raises(ValueError, match="prefix caching only under vLLM's V1 model runner"):
        check_pooled_prefix_caching(config(), vllm_config(True), mrv2)
    check_pooled_prefix_caching(config(), vllm_config(False), mrv2)
    check_pooled_prefix_caching(config(), vllm_config(True), v1)
    last = ServingConfig.from_shape(EditShape("llama", 4, LAYERS, MODULES, 4, 1.0), "llama",
                                    MODEL)
    check_pooled_prefix_caching(last, vllm_config(True), mrv2)
    connector = SimpleNamespace(cache_config=SimpleNamespace(enable_prefix_caching=False),
                                kv_transfer_config={"kv_connector": "OffloadingConnector"})
    with pytest.raises(ValueError, match="KV transfer or offload connector"):
        check_pooled_prefix_caching(config(), connector, v1)
    check_pooled_prefix_caching(last, connector, v1)  # last-token keys never pool
