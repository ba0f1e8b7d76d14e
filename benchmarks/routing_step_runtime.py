"""Measured: what sola-vllm's routing and routed apply cost inside a decode step of an 8B-class
model on a GPU, through the worker's own SolaRuntime.

The Llama-3-8B-shaped step of routing_step_share.py (torch ops, random bf16 weights) is cut
where vLLM's piecewise CUDA graphs cut it for sola-vllm: the layers before the route layer are
one captured graph; the router (`SolaRuntime.route`: the Triton search, the host's decisions,
the token slots) runs eagerly between the graphs; the rest is a second graph, in which the
edited layer's MLP down projection adds each routed token's LoRA delta through the punica apply
(vLLM's Triton LoRA kernels). Timed per step, CUDA events around the whole step, median:
  plain          the uncut step, one graph
  split          both graphs, nothing between them, no apply: vLLM's piecewise baseline
  decode         split + route + apply; no key token in the step (every later step of a
                 request); half the rows routed to an edit
  keys           the same with S key tokens in the step (requests whose prompt ends there),
                 routed against N resident keys: one host read of the decisions
Ratios are printed against plain and split. The torch step has no paged attention, sampling or
scheduler: a real step is longer, so these shares are upper bounds.
Needs CUDA and vLLM's LoRA kernels (vLLM, or the tests' stand-in on PYTHONPATH).

    python benchmarks/routing_step_runtime.py --out benchmarks/results/routing_step_runtime.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from cuda_timing import add_timing_args, capture, cuda_device, median_ms, save_report  # noqa: E402
from routing_step_share import LLAMA_8B, DecodeStep  # noqa: E402

from sola_vllm.arch import EditShape  # noqa: E402
from sola_vllm.edit import Edit, lora_name  # noqa: E402
from sola_vllm.serving.config import ServingConfig  # noqa: E402
from sola_vllm.serving.runtime import LoraTarget, SolaRuntime, StepMeta  # noqa: E402

MODULE, RANK, PROMPT_LEN = "mlp.down_proj", 4, 64


def make_runtime(num_keys: int, num_edits: int, route_layer: int, max_tokens: int,
                 threshold: float) -> SolaRuntime:
    """A CUDA runtime (punica apply, Triton router, cosine) holding `num_edits` rank-4 edits of
    the route layer's down projection with num_keys / num_edits random keys each."""
    dim, mlp = LLAMA_8B["hidden"], LLAMA_8B["mlp"]
    shape = EditShape("llama", LLAMA_8B["layers"], (route_layer,), (MODULE,), RANK, 1.0)
    config = ServingConfig.from_shape(shape, "llama", "m" * 64, metric="cosine",
                                      threshold=threshold, max_edits=num_edits,
                                      max_keys=num_keys, max_rank=RANK, apply="punica",
                                      router="triton")
    targets = [[LoraTarget(lora_name(route_layer, MODULE), 0, dim, mlp)]]
    runtime = SolaRuntime(config, dim, targets, max_tokens, dtype=torch.bfloat16,
                          device="cuda", max_seqs=max_tokens)
    gen = torch.Generator().manual_seed(0)
    for i in range(num_edits):
        lora = {lora_name(route_layer, MODULE): (torch.randn(RANK, mlp, generator=gen) * 0.01,
                                                  torch.randn(dim, RANK, generator=gen) * 0.01)}
        edit = Edit(id=f"e{i}", prompts=[f"prompt {i}"], target="x",
                    keys=torch.randn(num_keys // num_edits, dim, generator=gen), lora=lora,
                    model_fingerprint="m" * 64, shape_fingerprint=shape.fingerprint(),
                    arch="llama", layers=[route_layer], modules=[MODULE], rank=RANK, scale=1.0)
        runtime.add_edit(edit, edit.keys)
    return runtime


def step_meta(req_ids: list[str], positions: list[int]) -> StepMeta:
    """One token per request at `positions` (PROMPT_LEN - 1 is the key token)."""
    n = len(req_ids)
    return StepMeta(n, np.arange(n), np.asarray(positions, dtype=np.int64),
                    np.full(n, PROMPT_LEN), list(req_ids), [None] * n)


def route_decode_rows(runtime: SolaRuntime, batch: int) -> list[str]:
    """Requests d0..d{B-1} routed once at their key token: even ones to an edit (the query is
    one of its keys, spread over the edits), odd ones to none. Returns their ids."""
    ids = [f"d{j}" for j in range(batch)]
    keys, owners = runtime.routed_keys(False)[:2]
    hidden = torch.randn(batch, keys.shape[1], device="cuda")
    half = (batch + 1) // 2
    hidden[::2] = keys[torch.arange(half, device="cuda") * (keys.shape[0] // half)]
    runtime.step = step_meta(ids, [PROMPT_LEN - 1] * batch)
    runtime.route(hidden.to(torch.bfloat16))
    routed = sum(runtime.routes[r] >= 0 for r in ids)
    if routed < batch // 2:
        raise SystemExit(f"only {routed} of {batch} decode rows routed (expected {batch // 2})")
    return ids


def measure(batch: int, num_keys: int, key_tokens: list[int], args) -> list[dict]:
    layer = args.route_layer
    step = DecodeStep(LLAMA_8B, batch, args.context)
    runtime = make_runtime(num_keys, args.edits, layer, batch, args.threshold)
    decode_ids = route_decode_rows(runtime, batch)
    mid = torch.empty_like(step.x)

    def first():
        mid.copy_(step.layers(step.x, 0, layer))

    def apply(index, down, inner):
        if index == layer:
            runtime.apply(0, down, inner)

    def rest():
        return step.head(step.layers(mid, layer, LLAMA_8B["layers"], hook=apply))

    def rest_plain():
        return step.head(step.layers(mid, layer, LLAMA_8B["layers"]))

    runtime.step = step_meta(decode_ids, [PROMPT_LEN] * batch)
    runtime.route(mid)  # the apply's per-forward state, for the capture
    plain, graph_a = capture(step), capture(first)
    graph_b, graph_b_plain = capture(rest), capture(rest_plain)
    counter = iter(range(10**9))

    def routed(num_keys_in_step: int):
        def run():
            graph_a.replay()
            it = next(counter)
            ids = [f"k{it}-{j}" for j in range(num_keys_in_step)] + decode_ids[num_keys_in_step:]
            runtime.step = step_meta(ids, [PROMPT_LEN - 1] * num_keys_in_step
                                     + [PROMPT_LEN + 1] * (batch - num_keys_in_step))
            runtime.route(mid)
            graph_b.replay()
        return run

    w, r = args.warmup, args.repeats
    base = {"plain": median_ms(plain.replay, w, r),
            "split": median_ms(lambda: (graph_a.replay(), graph_b_plain.replay()), w, r),
            "decode": median_ms(routed(0), w, r)}
    rows = []
    for s in [0, *key_tokens]:
        if s > batch:
            continue
        ms = base["decode"] if s == 0 else median_ms(routed(s), w, r)
        rows.append({"batch": batch, "context": args.context, "keys": num_keys,
                     "key_tokens": s, "plain_ms": base["plain"], "split_ms": base["split"],
                     "routed_ms": ms, "vs_plain": ms / base["plain"],
                     "vs_split": ms / base["split"]})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--key-tokens", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--edits", type=int, default=100, help="resident edits (keys split)")
    parser.add_argument("--route-layer", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--threshold", type=float, default=1e-3)
    add_timing_args(parser, 5, 30, ROOT / "benchmarks/results/routing_step_runtime.json")
    args = parser.parse_args()
    name, _ = cuda_device()
    torch.manual_seed(0)
    print(f"device: {name}; Llama-3-8B-shaped decode step (bf16, context {args.context}) cut at "
          f"layer {args.route_layer}: SolaRuntime.route (Triton router, raw d=4096 cosine keys) "
          f"between two CUDA graphs, punica apply (rank {RANK}, {MODULE}) in the second; "
          f"{args.edits} edits; median of {args.repeats} steps. MEASURED.")
    print(f"{'B':>4} {'N':>7} {'S':>3} {'plain ms':>9} {'split ms':>9} {'routed ms':>10} "
          f"{'vs plain':>9} {'vs split':>9}")
    rows = []
    for batch in args.batches:
        for n in args.keys:
            measured = measure(batch, n, args.key_tokens, args)
            torch.cuda.empty_cache()  # the step's weights and the runtime's keys are freed
            for row in measured:
                rows.append(row)
                print(f"{batch:>4} {n:>7} {row['key_tokens']:>3} {row['plain_ms']:>9.3f} "
                      f"{row['split_ms']:>9.3f} {row['routed_ms']:>10.3f} "
                      f"{row['vs_plain']:>9.3f} {row['vs_split']:>9.3f}")
    save_report(args.out, {
        "device": name, "torch": torch.__version__, "model_shape": LLAMA_8B,
        "route_layer": args.route_layer, "edits": args.edits, "rank": RANK,
        "repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
