"""Grouped routed-LoRA apply against a per-token loop; -1 rows stay bit-identical."""

import pytest
import torch
from torch import nn

from sola_vllm.lora import LoraContext, RoutedLoRALinear, apply_indices

POPULARITY = {
    "distinct": lambda b, e: torch.arange(b) % e,
    "identical": lambda b, e: torch.zeros(b, dtype=torch.long),
    "none": lambda b, e: torch.full((b,), -1),
    "mixed": lambda b, e: torch.where(torch.arange(b) % 3 == 0, -1, torch.arange(b) % e),
}


@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
def test_grouped_apply_matches_per_token_loop(popularity, conv1d):
    batch, seq, d_in, d_out, num_edits, rank = 7, 5, 24, 40, 3, 4
    base = nn.Linear(d_in, d_out)
    if conv1d:  # GPT-2 Conv1D: weight stored [in, out]
        from transformers.pytorch_utils import Conv1D

        base = Conv1D(d_out, d_in)
        nn.init.normal_(base.weight)
    ctx = LoraContext()
    layer = RoutedLoRALinear(base, ctx, conv1d)
    assert (layer.in_features, layer.out_features) == (d_in, d_out)
    adapters = {}
    for e in range(num_edits):
        a, b = torch.randn(rank, d_in), torch.randn(d_out, rank)
        layer.set_adapter(f"e{e}", a, b, 0.5)
        adapters[e] = (a, b)
    x = torch.randn(batch, seq, d_in)
    slots = POPULARITY[popularity](batch, num_edits)
    key_pos = torch.randint(0, seq, (batch,))
    apply_mask = torch.arange(seq)[None, :] >= key_pos[:, None]
    ctx.plan = [(f"e{s}", idx) for s, idx in apply_indices(slots, apply_mask).items()]
    got = layer(x)
    base_out = base(x)
    for i in range(batch):
        for t in range(seq):
            if slots[i] < 0 or not apply_mask[i, t]:
                assert torch.equal(got[i, t], base_out[i, t])
            else:
                a, b = adapters[int(slots[i])]
                want = base_out[i, t] + 0.5 * (b @ (a @ x[i, t]))
                torch.testing.assert_close(got[i, t], want, atol=1e-5, rtol=1e-5)


def test_adapter_shape_mismatch_is_refused():
    layer = RoutedLoRALinear(nn.Linear(8, 16), LoraContext(), conv1d=False)
    with pytest.raises(ValueError, match="maps 8 -> 16"):
        layer.set_adapter("x", torch.randn(4, 9), torch.randn(16, 4), 1.0)
