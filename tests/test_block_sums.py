"""Mean-pooled keys with prefix caching, in the worker's SolaRuntime without vLLM: each physical
KV block keeps the sum of the route layer's states it holds (`block_sums.BlockSums`), and a
request whose first blocks were prefix-cache hits (it starts at p0 = k * block_size, its block
table pointing at blocks another request computed) starts its sum from them. Its key is then
exactly `keys.pool_keys` of its full states (integer-valued states: fp32 sums are exact), a
block reused for other content does not leak its old sum, and a hit that cannot be recovered
still routes to no edit (counted)."""

import numpy as np
import pytest
import torch
from test_serving_pooled import HIDDEN, edit, integer_states, make_runtime, reference_key

from sola_vllm.serving.runtime import StepMeta

BLOCK = 4  # tokens per KV block
NUM_BLOCKS = 12


def run(runtime, steps, states, prompt_len, tables, captures):
    """Feeds `steps` (each a list of (request, positions)) through `runtime.route` with each
    request's block table `tables[request]` (physical block ids, by block index); the hidden
    rows are `states[request][position]`."""
    for rows_of_step in steps:
        req_ids = [r for r, _ in rows_of_step]
        rows = np.concatenate([np.full(len(p), i) for i, (_, p) in enumerate(rows_of_step)])
        pos = np.concatenate([np.asarray(p, dtype=np.int64) for _, p in rows_of_step])
        hidden = torch.cat([states[r][list(p)] for r, p in rows_of_step])
        width = max(len(tables[r]) for r in req_ids)
        row_blocks = np.zeros((len(req_ids), width), dtype=np.int32)
        for i, r in enumerate(req_ids):
            row_blocks[i, :len(tables[r])] = tables[r]
        runtime.step = StepMeta(len(pos), rows, pos,
                                np.asarray([prompt_len[r] for r in req_ids]), req_ids,
                                [captures.get(r) for r in req_ids], row_blocks=row_blocks,
                                block_size=BLOCK, num_kv_blocks=NUM_BLOCKS)
        runtime.route(hidden)
    runtime.step = None


def keys_of(runtime, requests, steps, states, prompt_len, tables) -> dict[str, torch.Tensor]:
    """Runs `steps` with a key capture for each of `requests`; their captured keys."""
    captures = {r: f"cap-{r}" for r in requests}
    runtime.expect_captures(list(captures.values()))
    run(runtime, steps, states, prompt_len, tables, captures)
    return {r: runtime.take_captures([captures[r]])[0] for r in requests}


def sharing(states: torch.Tensor, prefix: int, length: int, seed: int) -> torch.Tensor:
    """States of a prompt whose first `prefix` positions are those of `states` (the same
    tokens: a causal model computes the same states there), the rest its own."""
    own = integer_states(length, seed)
    own[:prefix] = states[:prefix]
    return own


# "a": 14 prompt tokens in blocks 7, 2, 9, 5, prefilled in two chunks that split block 2
# (positions 4-7) and block 9. "b": 11 prompt tokens, its first two blocks hits on a's (7, 2),
# so it is computed from position 8; either in a later step or in the very step whose chunk of
# "a" completes block 2 (vLLM caches a block in the step that computes it).
A_CHUNKS = [("a", range(0, 6)), ("a", range(6, 14))]
HIT_SCHEDULES = {
    "later step": [[A_CHUNKS[0]], [A_CHUNKS[1]], [("b", range(8, 11))]],
    "same step": [[A_CHUNKS[0]], [A_CHUNKS[1], ("b", range(8, 11))]],
}


@pytest.mark.parametrize("schedule", list(HIT_SCHEDULES))
def test_a_request_starting_after_cached_blocks_gets_its_full_pooled_key(schedule):
    runtime = make_runtime()
    states = {"a": integer_states(16, seed=1)}
    states["b"] = sharing(states["a"], 2 * BLOCK, 12, seed=2)
    prompt_len = {"a": 14, "b": 11}
    tables = {"a": [7, 2, 9, 5], "b": [7, 2, 3]}
    keys = keys_of(runtime, ["a", "b"], HIT_SCHEDULES[schedule], states, prompt_len, tables)
    assert torch.equal(keys["a"], reference_key(states["a"][:14]))
    assert torch.equal(keys["b"], reference_key(states["b"][:11]))  # positions 1..10, exact
    assert not torch.equal(keys["b"], reference_key(states["b"][8:11]))  # not only its own
    assert runtime.stats()["incomplete_pooled_keys"] == 0 and runtime.pooler.sums == {}


def test_a_cache_hit_routes_as_its_full_prompt_would():
    """The hit request's pooled query routes to the edit keyed on its full prompt's key."""
    runtime = make_runtime()
    states = {"a": integer_states(16, seed=1)}
    states["b"] = sharing(states["a"], 3 * BLOCK, 16, seed=4)
    prompt_len = {"a": 14, "b": 15}
    key = reference_key(states["b"][:15])[None]
    runtime.add_edit(edit(0, key), key)
    tables = {"a": [7, 2, 9, 5], "b": [7, 2, 9, 1]}
    run(runtime, [[("a", range(14))], [("b", range(12, 15))]], states, prompt_len, tables, {})
    assert runtime.routes["b"] == 0 and runtime.routes["a"] == -1
    assert runtime.stats()["incomplete_pooled_keys"] == 0


def test_a_block_reused_for_other_content_does_not_leak_its_old_sum():
    """Block 2 holds a's positions 4-7, is freed and then holds c's positions 4-7 (written in
    two chunks); d hits c's blocks 4, 2: its key is c's content's, not a's."""
    runtime = make_runtime()
    states = {"a": integer_states(16, seed=1), "c": integer_states(16, seed=5)}
    states["d"] = sharing(states["c"], 2 * BLOCK, 12, seed=6)
    prompt_len = {"a": 10, "c": 10, "d": 11}
    tables = {"a": [7, 2, 9], "c": [4, 2, 8], "d": [4, 2, 11]}
    steps = [[("a", range(10))], [("c", range(0, 6))], [("c", range(6, 10))],
             [("d", range(8, 11))]]
    keys = keys_of(runtime, ["a", "c", "d"], steps, states, prompt_len, tables)
    for r, n in prompt_len.items():
        assert torch.equal(keys[r], reference_key(states[r][:n])), r
    # a's old sum in block 2 would give another key
    leaked = states["d"][:11].clone()
    leaked[4:8] = states["a"][4:8]
    assert not torch.equal(keys["d"], reference_key(leaked))


def test_a_hit_on_a_block_not_summed_whole_routes_to_no_edit_and_is_counted():
    """Block 2 was reused and only partly refilled (c's positions 4-5): a request claiming it
    as a whole cached block cannot have its key, and a start off a block boundary neither."""
    runtime = make_runtime()
    states = {r: integer_states(16, seed=i) for i, r in enumerate("acde")}
    prompt_len = {"a": 10, "c": 6, "d": 11, "e": 11}
    tables = {"a": [7, 2, 9], "c": [4, 2], "d": [4, 2, 11], "e": [7, 3, 10]}
    key = reference_key(states["d"][:11])[None]  # d would route here with its whole key
    runtime.add_edit(edit(0, key), key)
    steps = [[("a", range(10))], [("c", range(6))], [("d", range(8, 11))],
             [("e", range(6, 11))]]
    run(runtime, steps, states, prompt_len, tables, {})
    assert runtime.routes["d"] == -1 and runtime.routes["e"] == -1
    assert runtime.stats()["incomplete_pooled_keys"] == 2


def test_the_block_buffer_is_sized_from_the_kv_cache_and_grows_if_needed():
    runtime = make_runtime()
    states = {"a": integer_states(8, seed=1)}
    run(runtime, [[("a", range(6))]], states, {"a": 6}, {"a": [0, 1]}, {})
    blocks = runtime.pooler.blocks
    assert blocks.sums.shape == (NUM_BLOCKS, HIDDEN) and blocks.sums.dtype == torch.float32
    assert blocks.counts[:2].tolist() == [BLOCK - 1, 2]  # position 0 is not pooled
    assert torch.equal(blocks.sums[1], states["a"][4:6].sum(dim=0))
    run(runtime, [[("a", range(6))]], states, {"a": 6}, {"a": [0, NUM_BLOCKS + 3]}, {})
    assert blocks.sums.shape[0] == NUM_BLOCKS + 4 and blocks.counts[0] == BLOCK - 1
