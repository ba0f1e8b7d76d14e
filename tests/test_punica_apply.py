"""`punica_apply`: the graph-safe metadata builder against vLLM's `LoRAKernelMeta`, and the apply
through vLLM's Triton `lora_shrink`/`lora_expand` against `apply_punica_ref` and `SolaRuntime`.

On the CPU wheel vLLM disables Triton (`vllm.triton_utils.importing`: "Triton is installed, but
doesn't include CPU backend", so HAS_TRITON is False and `triton.jit` is a no-op placeholder);
`torch.ops.vllm.lora_shrink` exists but cannot launch. `interpreted_kernels.interpreted_vllm_ops`
re-executes vLLM's own kernel sources with the real triton so they run in Triton's interpreter
(TRITON_INTERPRET=1, tests/conftest.py), with small tiles to stay fast. bf16 is GPU-only: the
interpreter returns garbage (~1e11) for these kernels in bf16 while fp16 is exact. On a CUDA
machine:
`TRITON_INTERPRET=0 pytest tests/test_punica_apply.py` also runs the `gpu` tests.
"""

import os

import pytest
import torch
from helpers import make_synthetic_edit
from interpreted_kernels import clear_pointer_caches, interpreted_vllm_ops

from sola_vllm.arch import EditShape
from sola_vllm.serving.config import ServingConfig
from sola_vllm.serving.punica_apply import (
    PunicaLoraStacks,
    PunicaMeta,
    apply_punica,
    apply_punica_ref,
)
from sola_vllm.serving.runtime import LoraTarget, SolaRuntime

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA or INTERPRETED, reason="needs CUDA and TRITON_INTERPRET=0")
needs_triton = pytest.mark.skipif(not INTERPRETED and not CUDA,
                                  reason="Triton needs CUDA or TRITON_INTERPRET=1")

# Kernel vs reference: both round at the same points (shrink -> weight dtype, delta -> y dtype),
# only the fp32 accumulation order differs, so at most ~1 ulp of y. Kernel vs SolaRuntime: the
# runtime keeps fp32 weights and never rounds the shrink, so add B*scale and h roundings.
TOLERANCE = {
    ("ref", torch.float16): dict(atol=2e-3, rtol=2e-3),  # 1 ulp of fp16 is <= 1e-3 relative
    ("ref", torch.bfloat16): dict(atol=2e-2, rtol=1.6e-2),  # 1 ulp of bf16 is <= 7.8e-3
    ("runtime", torch.float16): dict(atol=5e-3, rtol=5e-3),  # seen: 1 ulp (2e-3 at |y|~3)
    ("runtime", torch.bfloat16): dict(atol=6e-2, rtol=4e-2),
}


# --- metadata --------------------------------------------------------------------------------
def tok_pattern(popularity: str, num_tokens: int, num_slots: int, gen) -> torch.Tensor:
    def draw(values, weights=None):
        w = torch.ones(len(values)) if weights is None else weights
        idx = torch.multinomial(w, num_tokens, replacement=True, generator=gen)
        return torch.tensor(values)[idx]

    pool = torch.randperm(num_slots, generator=gen)[:8].tolist()
    if popularity == "distinct":
        tok = torch.randperm(num_slots, generator=gen)[:num_tokens]
    elif popularity == "identical":
        tok = torch.full((num_tokens,), pool[0])
    elif popularity == "none":
        tok = torch.full((num_tokens,), -1)
    elif popularity == "mixed":
        tok = torch.tensor([(-1, pool[0], pool[1])[i % 3] for i in range(num_tokens)])
    elif popularity == "zipf":
        values = [-1] + pool
        tok = draw(values, 1.0 / torch.arange(1, len(values) + 1) ** 1.5)
    else:  # "requests": contiguous runs, one route per request, as a real batch lays them out
        lengths = torch.randint(1, 20, (num_tokens,), generator=gen)
        routes = draw([-1] + pool)
        tok = torch.repeat_interleave(routes, lengths)[:num_tokens]
    return tok.int()


POPULARITY = ["distinct", "identical", "none", "mixed", "zipf", "requests"]
NUM_SLOTS, MAX_SEQS, MAX_TOKENS = 160, 140, 256


@pytest.mark.parametrize("num_tokens", [1, 7, 63, 130])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_meta_matches_vllm_prepare_tensors(popularity, num_tokens):
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

    gen = torch.Generator().manual_seed(num_tokens)
    tok = tok_pattern(popularity, num_tokens, NUM_SLOTS, gen)
    ours = PunicaMeta(MAX_TOKENS, MAX_SEQS + 1)
    vllm_meta = LoRAKernelMeta.make(MAX_SEQS, MAX_TOKENS, "cpu")
    ours.build(torch.full((5,), 3, dtype=torch.int32))  # stale state must not leak
    got = ours.build(tok)
    vllm_meta.prepare_tensors(tok)
    want = vllm_meta.meta_args(num_tokens, specialize_active_lora=False)
    assert [t.dtype for t in got] == [t.dtype for t in want]
    assert [t.shape for t in got] == [t.shape for t in want]
    assert [t.device.type for t in got[5:]] == ["cpu", "cpu"]
    assert not got[5].item() and got[6].item() == MAX_SEQS + 1  # fixed grid, never skipped
    if bool((tok == -1).all()):  # "none", and "mixed" or "zipf" at T=1 may draw it too
        # vLLM sets no_lora_flag_cpu and returns early (its other buffers are left stale); we
        # keep the flag False and emit a single group whose id is -1, so every CTA exits.
        assert want[5].item()
        assert torch.equal(got[4], torch.full_like(got[4], -1))
        return
    names = ["token_lora_mapping", "token_indices_sorted", "num_tokens_per_lora",
             "lora_token_start_loc", "active_lora_ids", "no_lora_flag_cpu"]
    for name, a, b in zip(names, got[:6], want[:6], strict=True):
        assert torch.equal(a, b), name
    # the grouping the kernels read, spelled out: group i = the tokens of slot ids[i]
    ids, cnt, start, order = got[4], got[2], got[3], got[1]
    for i in range(int((ids != -1).sum()) + int((tok == -1).any())):
        members = order[start[i]: start[i] + cnt[i]]
        assert torch.equal(members, (tok == ids[i]).nonzero().squeeze(1).int())


def test_meta_handles_zero_tokens_and_rejects_too_many():
    meta = PunicaMeta(8, 3)
    got = meta.build(torch.empty(0, dtype=torch.int32))
    assert got[0].numel() == 0 and (got[4] == -1).all() and (got[2] == 0).all()
    with pytest.raises(ValueError, match="max_tokens"):
        meta.build(torch.zeros(9, dtype=torch.int32))
    with pytest.raises(RuntimeError):  # 4 distinct values > max_segments: loud, never wrong
        meta.build(torch.tensor([-1, 0, 1, 2], dtype=torch.int32))


def test_build_compiles_fullgraph_without_host_syncs():
    """fullgraph=True fails on any graph break: .item(), nonzero, unique, bool-mask indexing,
    Python branching on tensor values. aot_eager also traces through fake tensors; inductor
    takes ~40 s on this CPU, so it is checked in the CUDA test instead."""
    meta = PunicaMeta(MAX_TOKENS, 9)
    compiled = torch.compile(meta.build, fullgraph=True, dynamic=True, backend="aot_eager")
    gen = torch.Generator().manual_seed(0)
    for popularity, num_tokens in [("zipf", 1), ("requests", 7), ("none", 63), ("mixed", 130)]:
        tok = tok_pattern(popularity, num_tokens, 8, gen)
        got = [t.clone() for t in compiled(tok)]
        want = [t.clone() for t in PunicaMeta(MAX_TOKENS, 9).build(tok)]
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_the_fullgraph_check_catches_vllms_host_syncing_builder():
    from vllm.lora.ops.triton_ops.lora_kernel_metadata import LoRAKernelMeta

    vllm_meta = LoRAKernelMeta.make(8, MAX_TOKENS, "cpu")
    compiled = torch.compile(vllm_meta.prepare_tensors, fullgraph=True, backend="aot_eager")
    with pytest.raises(torch._dynamo.exc.Unsupported, match="[Dd]ata-dependent"):  # `if no_lora:`
        compiled(torch.tensor([-1, 2, 2, 5], dtype=torch.int32))


# --- stacks ----------------------------------------------------------------------------------
def test_stacks_write_in_place_fold_the_scale_and_zero_pad():
    target = LoraTarget("0.mlp.down_proj", 0, 24, 40)
    stacks = PunicaLoraStacks([[target]], max_slots=3, max_rank=8, max_tokens=16,
                              dtype=torch.float16)
    ptrs = (stacks.a[target.name].data_ptr(), stacks.b[target.name].data_ptr())
    a, b = torch.randn(8, 40), torch.randn(24, 8)
    stacks.set_slot(1, target.name, a, b, 8, 1.0)
    a4, b4 = torch.randn(4, 40), torch.randn(24, 4)
    stacks.set_slot(1, target.name, a4, b4, 4, 0.5)  # a smaller rank overwrites every column
    assert (stacks.a[target.name].data_ptr(), stacks.b[target.name].data_ptr()) == ptrs
    assert torch.equal(stacks.a[target.name][1, :4], a4.half())
    assert torch.equal(stacks.b[target.name][1, :, :4], (b4 * 0.5).half())
    assert not stacks.a[target.name][1, 4:].any() and not stacks.b[target.name][1, :, 4:].any()
    assert not stacks.a[target.name][[0, 2]].any()
    stacks.clear_slot(1)
    assert not stacks.a[target.name].any() and not stacks.b[target.name].any()
    assert stacks.scratch(1, 5).is_contiguous() and stacks.scratch(1, 5).dtype == torch.float32
    with pytest.raises(ValueError, match="rank 9"):
        stacks.set_slot(0, target.name, torch.randn(9, 40), torch.randn(24, 9), 9, 1.0)
    with pytest.raises(ValueError, match="do not fit"):
        stacks.set_slot(0, target.name, torch.randn(4, 41), b4, 4, 1.0)
    with pytest.raises(ValueError, match="slot 3"):
        stacks.set_slot(3, target.name, a4, b4, 4, 1.0)
    with pytest.raises(ValueError, match="fp16 or bf16"):
        PunicaLoraStacks([[target]], 3, 8, 16, torch.float32)


# --- apply through vLLM's kernels ------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted_ops():
    if not INTERPRETED:
        return None
    return {small: interpreted_vllm_ops(small) for small in (True, False)}


@pytest.fixture(autouse=True)
def _fresh_pointer_caches():
    clear_pointer_caches()


def _ops(interpreted_ops, small_tiles=True):
    if INTERPRETED:
        return dict(zip(("shrink", "expand"), interpreted_ops[small_tiles], strict=True))
    return {}  # CUDA: torch.ops.vllm.lora_shrink/lora_expand


DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
# (in_features, y columns, [(offset, out)]): one linear; a merged one with a gap between its
# targets (q and v of qkv: two expands); a merged one whose targets touch (one 2-slice expand
# at offset_start=32, slices of different widths), both leaving some columns untouched.
LAYOUTS = {"single-64x96": (64, 96, [(0, 96)]),
           "gap-96x128": (96, 128, [(0, 64), (96, 32)]),
           "run-128x128": (128, 128, [(32, 32), (64, 64)])}
SLOTS, MAX_RANK, MAX_SEGMENTS = [1, 4, 5], 8, 4


def make_case(layout, num_tokens, rank, dtype, tok=None):
    in_features, width, spans = LAYOUTS[layout]
    targets = [LoraTarget(f"t{i}", off, out, in_features) for i, (off, out) in enumerate(spans)]
    stacks = PunicaLoraStacks([targets], max_slots=6, max_rank=MAX_RANK, max_tokens=64,
                              dtype=dtype, device=DEVICE)
    for slot, scale in zip(SLOTS, (1.0, 0.5, 2.0), strict=True):
        for t in targets:
            stacks.set_slot(slot, t.name, torch.randn(rank, in_features) * 0.1,
                            torch.randn(t.out_features, rank) * 0.1, rank, scale)
    if tok is None:
        tok = torch.tensor([-1, *SLOTS])[torch.randint(0, 4, (num_tokens,))]
        if num_tokens > 1:
            tok[0], tok[-1] = -1, 4
    x = torch.randn(num_tokens, in_features).to(DEVICE, dtype)
    base = torch.randn(num_tokens, width).to(DEVICE, dtype)
    return targets, stacks, tok.int().to(DEVICE), x, base


def check_untouched(y, base, tok, targets):
    rows = tok == -1
    assert torch.equal(y[rows], base[rows])  # no-edit rows: bit for bit
    edited = torch.zeros(y.shape[1], dtype=torch.bool, device=y.device)
    for t in targets:
        edited[t.offset: t.offset + t.out_features] = True
    assert torch.equal(y[:, ~edited], base[:, ~edited])  # columns of unedited modules


@needs_triton
@pytest.mark.parametrize("rank", [4, 8])
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_apply_matches_reference(interpreted_ops, layout, num_tokens, rank):
    dtype = torch.float16
    targets, stacks, tok, x, base = make_case(layout, num_tokens, rank, dtype)
    meta = PunicaMeta(64, MAX_SEGMENTS, DEVICE)
    y = base.clone()
    apply_punica(y, x, meta.build(tok), stacks, targets, **_ops(interpreted_ops))
    want = base.clone()
    apply_punica_ref(want, x, tok, stacks, targets)
    check_untouched(y, base, tok, targets)
    torch.testing.assert_close(y, want, **TOLERANCE["ref", dtype])
    if (tok >= 0).any():
        assert not torch.equal(y, base)  # the edits did something


@needs_triton
def test_apply_with_vllms_default_tiles(interpreted_ops):
    """The tiles a GPU uses without tuned configs (split-K 64, BLOCK_K 256): slow here."""
    targets, stacks, tok, x, base = make_case("gap-96x128", 5, 8, torch.float16)
    y, want = base.clone(), base.clone()
    meta = PunicaMeta(64, MAX_SEGMENTS, DEVICE)
    apply_punica(y, x, meta.build(tok), stacks, targets, **_ops(interpreted_ops, False))
    apply_punica_ref(want, x, tok, stacks, targets)
    check_untouched(y, base, tok, targets)
    torch.testing.assert_close(y, want, **TOLERANCE["ref", torch.float16])


@needs_triton
def test_batch_without_edits_is_bit_identical(interpreted_ops):
    """The kernels launch (the flag stays False: no host sync) and every CTA exits."""
    targets, stacks, tok, x, base = make_case("run-128x128", 33, 8, torch.float16,
                                              tok=torch.full((33,), -1))
    y = base.clone()
    meta = PunicaMeta(64, MAX_SEGMENTS, DEVICE)
    apply_punica(y, x, meta.build(tok), stacks, targets, **_ops(interpreted_ops))
    assert torch.equal(y, base)


def make_runtime_and_stacks(dtype):
    """A one-layer llama: q and v inside qkv_proj (k between them), gate and up filling
    gate_up_proj, down_proj on its own; edits of ranks 4, 8, 4 and scales 1, 0.5, 2."""
    hidden, inter, kv = 64, 96, 32
    modules = ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
               "mlp.down_proj")
    shape = EditShape("llama", 1, (0,), modules, 8, 1.0)
    config = ServingConfig.from_shape(shape, "llama", "m" * 64, metric="l2", threshold=0.5,
                                      max_edits=4, max_keys=8, max_rank=8)
    groups = [[LoraTarget("0.self_attn.q_proj", 0, hidden, hidden),
               LoraTarget("0.self_attn.v_proj", hidden + kv, kv, hidden)],
              [LoraTarget("0.mlp.gate_proj", 0, inter, hidden),
               LoraTarget("0.mlp.up_proj", inter, inter, hidden)],
              [LoraTarget("0.mlp.down_proj", 0, hidden, inter)]]
    runtime = SolaRuntime(config, hidden, groups, max_num_tokens=64)
    stacks = PunicaLoraStacks(groups, 4, 8, 64, dtype, DEVICE)
    for i, (rank, scale) in enumerate([(4, 1.0), (8, 0.5), (4, 2.0)]):
        edit = make_synthetic_edit(f"e{i}", layers=(0,), modules=modules, hidden=hidden,
                                   intermediate=inter, kv_dim=kv, rank=rank, scale=scale,
                                   seed=i, shape_fingerprint=shape.fingerprint())
        slot = runtime.add_edit(edit, edit.keys)["slot"]
        for name, (a, b) in edit.lora.items():
            stacks.set_slot(slot, name, a, b, rank, scale)
    return runtime, stacks, groups


@needs_triton
def test_apply_matches_the_cpu_runtime(interpreted_ops):
    dtype, num_tokens = torch.float16, 33
    runtime, stacks, groups = make_runtime_and_stacks(dtype)
    tok = torch.tensor([-1, 0, 1, 2])[torch.arange(num_tokens) % 4].int()
    runtime.set_token_slots(tok)
    meta_args = PunicaMeta(64, MAX_SEGMENTS, DEVICE).build(tok.to(DEVICE))
    for group, targets in enumerate(groups):
        in_features = targets[0].in_features
        width = max(t.offset + t.out_features for t in targets)
        x = torch.randn(num_tokens, in_features, dtype=dtype)
        base = torch.randn(num_tokens, width, dtype=dtype)
        want = base.clone()
        runtime.apply(group, want, x)
        y = base.clone().to(DEVICE)
        apply_punica(y, x.to(DEVICE), meta_args, stacks, targets, **_ops(interpreted_ops))
        check_untouched(y, base.to(DEVICE), tok.to(DEVICE), targets)
        torch.testing.assert_close(y.cpu(), want, **TOLERANCE["runtime", dtype])


def test_apply_refuses_mismatched_inputs():
    targets, stacks, tok, x, base = make_case("single-64x96", 5, 4, torch.float16)
    meta = PunicaMeta(64, MAX_SEGMENTS, DEVICE).build(tok)
    with pytest.raises(ValueError, match="must match"):
        apply_punica(base.float(), x.float(), meta, stacks, targets)
    with pytest.raises(ValueError, match="rows"):
        apply_punica(base[:4], x, meta, stacks, targets)
    with pytest.raises(ValueError, match="contiguous"):
        apply_punica(base.t().contiguous().t(), x, meta, stacks, targets)
    from vllm.triton_utils import HAS_TRITON

    if not HAS_TRITON:  # the CPU wheel: a clear error instead of a placeholder's TypeError
        with pytest.raises(RuntimeError, match="HAS_TRITON"):
            apply_punica(base.clone(), x, meta, stacks, targets)


# --- CUDA only -------------------------------------------------------------------------------
@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 33, 257])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gpu_apply_matches_reference(layout, num_tokens, dtype):
    in_features, width, spans = LAYOUTS[layout]
    targets = [LoraTarget(f"t{i}", off, out, in_features) for i, (off, out) in enumerate(spans)]
    stacks = PunicaLoraStacks([targets], 64, 16, 512, dtype, "cuda")
    for slot in range(0, 64, 3):
        for t in targets:
            rank = 16 if slot % 2 else 4
            stacks.set_slot(slot, t.name, torch.randn(rank, in_features) * 0.1,
                            torch.randn(t.out_features, rank) * 0.1, rank, 0.5 + slot / 64)
    gen = torch.Generator().manual_seed(num_tokens)
    tok = tok_pattern("requests", num_tokens, 64, gen)
    tok = torch.where(tok % 3 == 0, tok, -1).int().cuda()  # only loaded slots
    x = torch.randn(num_tokens, in_features, dtype=dtype, device="cuda")
    base = torch.randn(num_tokens, width, dtype=dtype, device="cuda")
    meta = PunicaMeta(512, 65, "cuda")
    y, want = base.clone(), base.clone()
    apply_punica(y, x, meta.build(tok), stacks, targets)
    apply_punica_ref(want, x, tok, stacks, targets)
    check_untouched(y, base, tok, targets)
    torch.testing.assert_close(y, want, **TOLERANCE["ref", dtype])


@gpu
@pytest.mark.gpu
def test_gpu_build_and_apply_replay_in_a_cuda_graph_without_syncs():
    """Capture build + apply once, then replay with new slots written into the same tok_slot
    buffer. The shrink's split-K atomics reorder fp32 sums, so compare with a tolerance; rows
    without an edit are never written, so they stay bit-identical."""
    targets, stacks, _, _, _ = make_case("gap-96x128", 33, 8, torch.float16)
    num_tokens = 33
    tok_buf = torch.full((num_tokens,), -1, dtype=torch.int32, device="cuda")
    x = torch.randn(num_tokens, 96, dtype=torch.float16, device="cuda")
    base = torch.randn(num_tokens, 128, dtype=torch.float16, device="cuda")
    y = base.clone()
    meta = PunicaMeta(64, MAX_SEGMENTS, "cuda")

    def step():
        apply_punica(y, x, meta.build(tok_buf), stacks, targets)

    step()  # warm-up: pointer tables, Triton compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # raises on any synchronizing CUDA call
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    gen = torch.Generator().manual_seed(1)
    for popularity in ["mixed", "none", "zipf", "identical"]:
        tok = tok_pattern(popularity, num_tokens, 6, gen)
        tok = torch.where(torch.isin(tok, torch.tensor(SLOTS)), tok, -1)
        tok_buf.copy_(tok.int())
        y.copy_(base)
        graph.replay()
        torch.cuda.synchronize()
        want = base.clone()
        apply_punica_ref(want, x, tok_buf, stacks, targets)
        check_untouched(y, base, tok_buf, targets)
        torch.testing.assert_close(y, want, **TOLERANCE["ref", torch.float16])


@gpu
@pytest.mark.gpu
def test_gpu_build_compiles_with_inductor():
    meta = PunicaMeta(MAX_TOKENS, MAX_SEQS + 1, "cuda")
    compiled = torch.compile(meta.build, fullgraph=True, dynamic=True)
    gen = torch.Generator().manual_seed(0)
    for popularity, num_tokens in [("zipf", 7), ("requests", 130), ("distinct", 63)]:
        tok = tok_pattern(popularity, num_tokens, NUM_SLOTS, gen).cuda()
        got = [t.clone() for t in compiled(tok)]
        want = [t.clone() for t in PunicaMeta(MAX_TOKENS, MAX_SEQS + 1, "cuda").build(tok)]
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
