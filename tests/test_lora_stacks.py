"""LoraStacks.apply (fused gathers) against apply_ref (one token at a time), over the popularity
of edits in a batch, odd sizes, ranks under the maximum and both serving dtypes."""

import pytest
import torch

from sola_vllm.serving.lora_stacks import LoraStacks, RoutedTokens
from sola_vllm.serving.runtime import LoraTarget

IN, OUT, SLOTS, MAX_RANK = 37, 53, 9, 8
# fp32: the two paths only sum in another order, over deltas that reach ~180 (randn factors,
# scale up to 2.5; an fp32 ulp there is 1.5e-5), so rounding moves an output by a few ulps
# (seen: 1.8e-5 on an AVX-512 machine);
# bf16: y is rounded once to bf16 in both
TOLERANCE = {torch.float32: dict(atol=5e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


def popularity(kind: str, num_tokens: int, gen: torch.Generator) -> torch.Tensor:
    t = torch.arange(num_tokens)
    slots = {
        "distinct": t % SLOTS,
        "uniform": torch.randint(0, SLOTS, (num_tokens,), generator=gen),
        "zipf": (torch.rand(num_tokens, generator=gen).pow(3) * SLOTS).long(),  # skew to 0
        "identical": torch.full((num_tokens,), 4),
        "skewed": torch.where(t % 7 == 0, t % SLOTS, 2),
        "none": torch.full((num_tokens,), -1),
    }[kind]
    base_rows = torch.rand(num_tokens, generator=gen) < 0.3  # some tokens of every batch: base
    return torch.where(base_rows, -1, slots).int()


def make_stacks(gen: torch.Generator) -> LoraStacks:
    # one linear holding two modules side by side (like gate_up_proj), one holding a single one
    targets = [[LoraTarget("m0", 0, OUT, IN), LoraTarget("m1", OUT, OUT, IN)],
               [LoraTarget("m2", 0, IN, OUT)]]
    stacks = LoraStacks(targets, SLOTS, MAX_RANK)
    for slot in range(SLOTS):
        rank = 1 + slot % MAX_RANK  # every rank from 1 to the maximum
        lora = {"m0": (torch.randn(rank, IN, generator=gen), torch.randn(OUT, rank, generator=gen)),
                "m1": (torch.randn(rank, IN, generator=gen), torch.randn(OUT, rank, generator=gen)),
                "m2": (torch.randn(rank, OUT, generator=gen), torch.randn(IN, rank, generator=gen))}
        stacks.write(slot, lora, rank, scale=0.5 + slot / 4)
    return stacks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_tokens", [1, 13, 133])
@pytest.mark.parametrize("kind", ["distinct", "uniform", "zipf", "identical", "skewed", "none"])
def test_apply_matches_the_per_token_reference(kind, num_tokens, dtype):
    gen = torch.Generator().manual_seed(num_tokens)
    stacks = make_stacks(gen)
    tok_slot = popularity(kind, num_tokens, gen)
    routed = RoutedTokens.from_slots(tok_slot)
    for group, (width_in, width_out) in enumerate([(IN, 2 * OUT), (OUT, IN)]):
        x = torch.randn(num_tokens, width_in, generator=gen).to(dtype)
        base = torch.randn(num_tokens, width_out, generator=gen).to(dtype)
        fast, ref = base.clone(), base.clone()
        stacks.apply(group, fast, x, routed)
        stacks.apply_ref(group, ref, x, tok_slot)
        unrouted = tok_slot < 0
        assert torch.equal(fast[unrouted], base[unrouted])  # -1 rows: bit for bit untouched
        torch.testing.assert_close(fast, ref, **TOLERANCE[dtype])
        if (~unrouted).any():
            assert not torch.equal(fast[~unrouted], base[~unrouted])


def test_write_replaces_a_slot_and_pads_past_the_rank_with_zeros():
    gen = torch.Generator().manual_seed(0)
    stacks = make_stacks(gen)
    a, b = torch.randn(2, IN, generator=gen), torch.randn(OUT, 2, generator=gen)
    stacks.write(3, {"m0": (a, b)}, rank=2, scale=1.0)  # an edit of m0 only, rank 2
    got_a, got_b = stacks.factors("m0", 3)
    assert torch.equal(got_a[:2], a) and torch.equal(got_b[:, :2], b)
    assert not got_a[2:].any() and not got_b[:, 2:].any()
    for name in ("m1", "m2"):  # modules the edit leaves alone: zero, nothing left of before
        assert not any(f.any() for f in stacks.factors(name, 3))
    assert torch.equal(stacks.factors("m0", 4)[0], make_stacks(
        torch.Generator().manual_seed(0)).factors("m0", 4)[0])  # other slots untouched
