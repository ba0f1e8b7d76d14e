"""SolaRuntime with the punica apply (`ServingConfig.apply`): vLLM's Triton LoRA kernels on the
runtime's own stacks, checked against the torch apply (`LoraStacks`) and `apply_punica_ref`.

Here the kernels run in Triton's interpreter on CPU (`interpreted_kernels`, injected through
SolaRuntime's `kernels`), in fp16 (bf16 is broken in the interpreter, see test_punica_apply.py).
With TRITON_INTERPRET=0 on a CUDA machine the same tests run vLLM's registered ops on the GPU.
"""

import os

import numpy as np
import pytest
import torch
from helpers import make_synthetic_edit
from interpreted_kernels import clear_pointer_caches, interpreted_vllm_ops

from sola_vllm.arch import EditShape
from sola_vllm.serving import apply_backend
from sola_vllm.serving.apply_backend import choose_apply, make_lora_backend
from sola_vllm.serving.config import ServingConfig
from sola_vllm.serving.lora_stacks import LoraStacks
from sola_vllm.serving.punica_apply import _vllm_ops, apply_punica_ref
from sola_vllm.serving.punica_backend import KernelCheckError, PunicaBackend
from sola_vllm.serving.runtime import LoraTarget, SolaRuntime, StepMeta

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not INTERPRETED and not CUDA,
                                reason="Triton needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if CUDA and not INTERPRETED else "cpu"
DTYPE = torch.float16
# kernels vs the torch runtime (fp32 weights, unrounded shrink) and vs apply_punica_ref: the
# bounds of test_punica_apply.py
VS_RUNTIME = dict(atol=5e-3, rtol=5e-3)
VS_REF = dict(atol=2e-3, rtol=2e-3)

HIDDEN, INTER, KV = 64, 96, 32
MODULES = ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj",
           "mlp.down_proj")
SHAPE = EditShape("llama", 1, (0,), MODULES, 8, 1.0)
# one llama layer as vLLM holds it: q and v inside qkv_proj (k between them, never edited),
# gate and up filling gate_up_proj, down_proj alone; (group, y width)
GROUPS = [[LoraTarget("0.self_attn.q_proj", 0, HIDDEN, HIDDEN),
           LoraTarget("0.self_attn.v_proj", HIDDEN + KV, KV, HIDDEN)],
          [LoraTarget("0.mlp.gate_proj", 0, INTER, HIDDEN),
           LoraTarget("0.mlp.up_proj", INTER, INTER, HIDDEN)],
          [LoraTarget("0.mlp.down_proj", 0, HIDDEN, INTER)]]
WIDTHS = [HIDDEN + 2 * KV, 2 * INTER, HIDDEN]


@pytest.fixture(scope="module")
def kernels():
    return interpreted_vllm_ops(small=True) if INTERPRETED else None


@pytest.fixture(autouse=True)
def _fresh_pointer_caches():
    clear_pointer_caches()


def config(apply: str = "auto", max_edits: int = 4) -> ServingConfig:
    return ServingConfig.from_shape(SHAPE, "llama", "m" * 64, metric="l2", threshold=0.5,
                                    max_edits=max_edits, max_keys=8, max_rank=8, apply=apply)


def punica_runtime(kernels, **kw) -> SolaRuntime:
    return SolaRuntime(config("punica"), HIDDEN, GROUPS, max_num_tokens=64, dtype=DTYPE,
                       device=DEVICE, max_seqs=8, kernels=kernels, **kw)


def torch_runtime() -> SolaRuntime:
    return SolaRuntime(config("torch"), HIDDEN, GROUPS, max_num_tokens=64)


def edit(i: int, rank: int = 4, scale: float = 1.0):
    return make_synthetic_edit(f"e{i}", layers=(0,), modules=MODULES, hidden=HIDDEN,
                               intermediate=INTER, kv_dim=KV, rank=rank, scale=scale, seed=i,
                               shape_fingerprint=SHAPE.fingerprint())


def apply_all(punica: SolaRuntime, reference: SolaRuntime, tok: torch.Tensor) -> None:
    """Every edited linear through both runtimes, on the token slots both already hold:
    rows without an edit and unedited columns bit for bit, routed rows within tolerance."""
    gen = torch.Generator().manual_seed(int(tok.sum()) + 100)
    unrouted = tok < 0
    for group, (targets, width) in enumerate(zip(GROUPS, WIDTHS, strict=True)):
        x = torch.randn(tok.shape[0], targets[0].in_features, generator=gen).to(DTYPE)
        base = torch.randn(tok.shape[0], width, generator=gen).to(DTYPE)
        got = base.clone().to(DEVICE)
        punica.apply(group, got, x.to(DEVICE))
        got = got.cpu()
        want = base.clone()
        reference.apply(group, want, x)
        assert torch.equal(got[unrouted], base[unrouted])  # -1 rows: never written
        edited = torch.zeros(width, dtype=torch.bool)
        for t in targets:
            edited[t.offset:t.offset + t.out_features] = True
        assert torch.equal(got[:, ~edited], base[:, ~edited])  # k_proj's columns
        torch.testing.assert_close(got, want, **VS_RUNTIME)
        ref = base.clone().to(DEVICE)
        apply_punica_ref(ref, x.to(DEVICE), tok.to(DEVICE), punica.lora.stacks, targets)
        torch.testing.assert_close(got, ref.cpu(), **VS_REF)
        if not unrouted.all():
            assert not torch.equal(got[~unrouted], base[~unrouted])  # the edits did something


def step(req_ids, lengths, positions) -> StepMeta:
    rows = np.concatenate([np.full(len(p), r) for r, p in enumerate(positions)])
    pos = np.concatenate([np.asarray(p) for p in positions])
    return StepMeta(len(pos), rows, pos, np.asarray(lengths), list(req_ids),
                    [None] * len(req_ids))


# --- (a) a routed mixed batch ---------------------------------------------------------------
def test_routed_batch_matches_the_torch_runtime_and_leaves_unrouted_rows_exact(kernels):
    punica, reference = punica_runtime(kernels), torch_runtime()
    edits = [edit(0, 4, 1.0), edit(1, 8, 0.5), edit(2, 4, 2.0)]
    for runtime in (punica, reference):
        for e in edits:
            runtime.add_edit(e, e.keys)
    # four 3-token prompts: a, b, d carry an edit's key at their key token, c routes nowhere
    hidden = torch.randn(12, HIDDEN) * 10
    hidden[2], hidden[5], hidden[11] = edits[0].keys[0], edits[1].keys[0], edits[2].keys[0]
    prefill = step("abcd", [3] * 4, [[0, 1, 2]] * 4)
    decode = step("abcd", [3] * 4, [[3]] * 4)
    for meta, hid in ((prefill, hidden), (decode, torch.randn(4, HIDDEN) * 10)):
        for runtime, on in ((punica, dict(device=DEVICE, dtype=DTYPE)), (reference, {})):
            runtime.step = meta
            runtime.route(hid.to(**on))  # the route layer's input, on the model's device
        tok = punica.tok_slot[:meta.num_tokens].cpu()
        assert torch.equal(tok, reference.tok_slot[:meta.num_tokens])
        assert (tok == -1).any() and len(set(tok.tolist())) == 4  # -1 and three edits
        apply_all(punica, reference, tok)
    assert punica.routes == {"a": 0, "b": 1, "c": -1, "d": 2}


def test_the_metadata_is_built_once_per_forward(kernels):
    runtime = punica_runtime(kernels)
    e = edit(0)
    runtime.add_edit(e, e.keys)
    builds = []
    build = runtime.lora.meta.build
    runtime.lora.meta.build = lambda tok: builds.append(tok.clone()) or build(tok)
    tok = torch.tensor([0, -1, 0, -1, -1], dtype=torch.int32)
    runtime.set_token_slots(tok)
    for group, width in enumerate(WIDTHS):
        x = torch.randn(5, GROUPS[group][0].in_features).to(DEVICE, DTYPE)
        runtime.apply(group, torch.zeros(5, width, dtype=DTYPE, device=DEVICE), x)
    assert len(builds) == 1 and torch.equal(builds[0].cpu(), tok)
    assert runtime.lora.meta.token_lora_mapping.device.type == torch.device(DEVICE).type
    with pytest.raises(RuntimeError, match="router saw 5 tokens"):
        runtime.apply(0, torch.zeros(4, WIDTHS[0], dtype=DTYPE, device=DEVICE),
                      torch.zeros(4, HIDDEN, dtype=DTYPE, device=DEVICE))


# --- (b) slot writes follow add, remove and reuse --------------------------------------------
def slot_weights(runtime: SolaRuntime, slot: int) -> dict:
    stacks = runtime.lora.stacks
    return {name: (stacks.a[name][slot].cpu(), stacks.b[name][slot].cpu())
            for name in stacks.a}


def test_removed_slots_are_cleared_and_a_reused_slot_holds_only_the_new_edit(kernels):
    punica, reference = punica_runtime(kernels), torch_runtime()
    first, kept, again = edit(0, 8, 0.5), edit(1, 4, 1.0), edit(2, 4, 2.0)
    for runtime in (punica, reference):
        for e in (first, kept):
            runtime.add_edit(e, e.keys)
        runtime.set_active("e0", False)
        runtime.remove_edit("e0")
    for a, b in slot_weights(punica, 0).values():
        assert not a.any() and not b.any()  # the removed edit's slot is all zeros
    for name in reference.lora.names():  # in the torch apply's tables too
        assert not any(f.any() for f in reference.lora.factors(name, 0))
    assert reference.lora.scale[0] == 0
    tok = torch.tensor([0, 1, -1, 0, 1], dtype=torch.int32)
    x = torch.randn(5, HIDDEN).to(DEVICE, DTYPE)
    base = torch.randn(5, WIDTHS[1]).to(DEVICE, DTYPE)
    y = base.clone()
    punica.set_token_slots(tok)
    punica.apply(1, y, x)
    assert torch.equal(y[tok.to(DEVICE) == 0], base[tok.to(DEVICE) == 0])  # adds exact zeros
    kept_before = slot_weights(punica, 1)

    for runtime in (punica, reference):
        assert runtime.add_edit(again, again.keys)["slot"] == 0  # the freed slot, reused
    for name, (a, b) in slot_weights(punica, 0).items():
        new_a, new_b = again.lora[name]
        assert torch.equal(a[:4], new_a.to(DTYPE)) and not a[4:].any()  # rank 4 of 8
        assert torch.equal(b[:, :4], (new_b * 2.0).to(DTYPE)) and not b[:, 4:].any()
    assert all(torch.equal(w, v) for name in kept_before
               for w, v in zip(slot_weights(punica, 1)[name], kept_before[name], strict=True))
    for runtime in (punica, reference):
        runtime.set_token_slots(tok)
    apply_all(punica, reference, tok)


# --- (c) configuration -----------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["cuda", "Punica", "", None])
def test_the_apply_option_is_validated(bad):
    with pytest.raises(ValueError, match=f"apply {bad!r} is not one of"):
        config(bad)


def test_the_apply_option_travels_in_the_overrides():
    cfg = config("torch")
    assert cfg.to_dict()["apply"] == "torch"
    assert ServingConfig.from_dict(cfg.to_dict()).apply == "torch"
    assert config().apply == "auto"


# --- (d) choosing the backend ----------------------------------------------------------------
def test_auto_picks_torch_where_the_kernels_cannot_run(monkeypatch):
    assert isinstance(make_lora_backend(config("auto"), GROUPS, 64, dtype=DTYPE, device="cpu"),
                      LoraStacks)
    assert isinstance(SolaRuntime(config(), HIDDEN, GROUPS, 64).lora, LoraStacks)
    assert choose_apply("auto", "cuda", torch.float32) == "torch"
    monkeypatch.setattr(apply_backend, "has_triton", lambda: False)
    assert choose_apply("auto", "cuda", DTYPE) == "torch"
    monkeypatch.setattr(apply_backend, "has_triton", lambda: True)
    assert choose_apply("auto", "cuda", torch.bfloat16) == "punica"
    assert choose_apply("torch", "cuda", DTYPE) == "torch"  # asked for: kept


@pytest.mark.parametrize("device, dtype, triton, reason", [
    ("cpu", DTYPE, True, "the model runs on cpu; vLLM's LoRA kernels need CUDA"),
    ("cuda", DTYPE, False, r"vLLM's Triton kernels are unavailable \(.*HAS_TRITON is False\)"),
    ("cuda", torch.float32, True, "the model dtype is torch.float32; .* float16 or bfloat16"),
])
def test_punica_is_refused_where_it_cannot_run(monkeypatch, device, dtype, triton, reason):
    monkeypatch.setattr(apply_backend, "has_triton", lambda: triton)
    with pytest.raises(ValueError, match=f"apply 'punica' cannot run here: {reason}"):
        choose_apply("punica", device, dtype)


def test_an_engine_asked_for_punica_on_cpu_refuses_to_start():
    """This CPU machine: no CUDA device (and vLLM's CPU wheel has no Triton either)."""
    with pytest.raises(ValueError, match="apply 'punica' cannot run here: the model runs on cpu"):
        SolaRuntime(config("punica"), HIDDEN, GROUPS, 64, dtype=DTYPE, device="cpu")
    with pytest.raises(ValueError, match="float16 or bfloat16"):  # injected kernels: dtype
        SolaRuntime(config("punica"), HIDDEN, GROUPS, 64, kernels=(None, None))


def test_serve_takes_apply_and_refuses_punica_before_vllm_starts_without_cuda(monkeypatch):
    from sola_vllm.cli import build_parser
    from sola_vllm.serving import serve

    parse = build_parser().parse_known_args
    assert parse(["serve"])[0].apply == "auto"
    assert parse(["serve", "--apply", "punica"])[0].apply == "punica"
    with pytest.raises(SystemExit):  # argparse: "invalid choice"
        parse(["serve", "--apply", "triton"])
    monkeypatch.setattr(serve, "on_cuda", lambda: False)
    with pytest.raises(ValueError, match="--apply punica cannot run here: the model runs on cpu"):
        serve.check_apply("punica")
    serve.check_apply("auto")
    serve.check_apply("torch")


def fake_engine(monkeypatch, apply: str, dtype: torch.dtype):
    """init_sola's inputs without a vLLM model: the runner check and the patching are stubbed,
    the model is one CPU parameter, the edited linear is GROUPS' down_proj."""
    from types import SimpleNamespace

    from sola_vllm.serving import models

    monkeypatch.setattr(models, "check_runner", lambda runner: None)
    monkeypatch.setattr(models, "find_runner", lambda: None)
    monkeypatch.setattr(models, "lora_targets", lambda *a: {"0.mlp.down_proj": GROUPS[2]})
    monkeypatch.setattr(models, "patch_model", lambda *a: None)
    sola = ServingConfig.from_shape(EditShape("llama", 1, (0,), ("mlp.down_proj",), 8, 1.0),
                                    "llama", "m" * 64, apply=apply).to_dict()
    vllm_config = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(sola=sola, hidden_size=HIDDEN),
                                     dtype=dtype, max_model_len=32),
        parallel_config=SimpleNamespace(tensor_parallel_size=1, pipeline_parallel_size=1,
                                        data_parallel_size=1),
        scheduler_config=SimpleNamespace(max_num_batched_tokens=16, max_num_seqs=4),
        lora_config=None, compilation_config=SimpleNamespace())
    return models.init_sola, torch.nn.Linear(2, 2), vllm_config


def test_engine_start_passes_the_models_dtype_and_device(monkeypatch):
    init_sola, model, vllm_config = fake_engine(monkeypatch, "punica", DTYPE)
    with pytest.raises(ValueError, match="apply 'punica' cannot run here: the model runs on cpu"):
        init_sola(model, vllm_config)
    from sola_vllm.serving import models

    init_sola, model, vllm_config = fake_engine(monkeypatch, "auto", DTYPE)
    seen, real = {}, models.SolaRuntime
    monkeypatch.setattr(models, "SolaRuntime", lambda *a, **kw: seen.update(kw) or real(*a, **kw))
    runtime = init_sola(model, vllm_config)
    assert seen == {"dtype": DTYPE, "device": torch.device("cpu"), "max_seqs": 4}
    assert isinstance(runtime.lora, LoraStacks) and runtime.tok_slot.shape == (32,)


# --- (e) the start-up self-check -------------------------------------------------------------
def test_the_self_check_passes_and_leaves_every_slot_empty(kernels):
    runtime = punica_runtime(kernels)
    assert isinstance(runtime.lora, PunicaBackend)
    stacks = runtime.lora.stacks
    assert not any(t.any() for t in [*stacks.a.values(), *stacks.b.values()])


def test_the_self_check_refuses_a_wrong_shrink(kernels):
    shrink, expand = kernels if kernels else _vllm_ops()

    def doubled_shrink(x, weights, out, *meta_and_scale):
        shrink(x, weights, out, *meta_and_scale[:-1], meta_and_scale[-1] * 2)

    with pytest.raises(KernelCheckError, match=r"disagree with the torch reference on the "
                                               r"linear holding 0\.self_attn\.q_proj.*largest "
                                               r"difference"):
        punica_runtime((doubled_shrink, expand))


def test_the_self_check_refuses_an_expand_that_writes_unrouted_rows(kernels):
    shrink, expand = kernels if kernels else _vllm_ops()

    def leaky_expand(inputs, weights, y, *args, **kwargs):
        expand(inputs, weights, y, *args, **kwargs)
        y[0] += 1  # token 0 of the check has no edit

    with pytest.raises(KernelCheckError, match="rows of tokens without an edit were written"):
        punica_runtime((shrink, leaky_expand))
