"""What routing adds to a decode step of an 8B-class model: an estimate from two measurements.

Measured, on one GPU: (a) the Triton nearest-key kernel routing S key tokens against N keys of
d = 4096 (a Llama-3-8B hidden size: raw keys) or of a key map's output width (64 for the shipped
maps: mapped keys); (b) a Llama-3-8B-shaped decode step built from torch ops
(random bf16 weights, 32 layers of RMSNorm, QKV, GQA attention over a KV cache through SDPA,
O, SwiGLU MLP, then the LM head), captured in a CUDA graph, for B sequences at context C.
Estimated, and printed as such: share = kernel time / step time. The torch step is a stand-in
for a serving engine's step: no paged attention, no sampling, no scheduler, so a real step is
at least as long and the share at most this. Step (b) also reports its weight-read floor
(bytes of weights / peak bandwidth) for comparison. Only routing's GPU time is counted: the
host read of its result (one per step with key tokens) is not.

    python benchmarks/routing_step_share.py --out benchmarks/results/routing_step_share.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "kernels"))
import nearest_key as nk  # noqa: E402
from cuda_timing import add_timing_args, cuda_device, graph_ms, save_report  # noqa: E402
from routing_kernel import make_case  # noqa: E402

# Llama-3-8B: hidden 4096, 32 layers, 32 query heads and 8 KV heads of 128, MLP 14336,
# vocabulary 128256
LLAMA_8B = dict(hidden=4096, layers=32, heads=32, kv_heads=8, head_dim=128, mlp=14336,
                vocab=128256)


class DecodeStep:
    """One decode step of a Llama-shaped model in plain torch: B new tokens, each written into
    its slot of a preallocated KV cache and attending to its C cached positions and itself.
    Weights are random bf16; only the shapes and the work count."""

    def __init__(self, shape: dict, batch: int, context: int, device="cuda"):
        h, kv, hd = shape["hidden"], shape["kv_heads"], shape["head_dim"]
        q_width = shape["heads"] * hd
        bf16 = dict(dtype=torch.bfloat16, device=device)
        self.shape, self.batch = shape, batch
        self.layers_weights = [dict(qkv=torch.randn(h, q_width + 2 * kv * hd, **bf16) * 0.02,
                            o=torch.randn(q_width, h, **bf16) * 0.02,
                            gate_up=torch.randn(h, 2 * shape["mlp"], **bf16) * 0.02,
                            down=torch.randn(shape["mlp"], h, **bf16) * 0.02,
                            k_cache=torch.randn(batch, kv, context + 1, hd, **bf16),
                            v_cache=torch.randn(batch, kv, context + 1, hd, **bf16))
                       for _ in range(shape["layers"])]
        self.lm_head = torch.randn(h, shape["vocab"], **bf16) * 0.02
        self.x = torch.randn(batch, h, **bf16)
        self.weight_bytes = 2 * (sum(w.numel() for layer in self.layers_weights
                                     for k, w in layer.items() if "cache" not in k)
                                 + self.lm_head.numel())
        self.kv_bytes = 2 * sum(layer[k].numel() for layer in self.layers_weights
                                for k in ("k_cache", "v_cache"))

    def __call__(self) -> torch.Tensor:
        return self.head(self.layers(self.x, 0, self.shape["layers"]))

    def layers(self, x: torch.Tensor, start: int, stop: int, hook=None) -> torch.Tensor:
        """Decoder layers [start, stop) on x [B, hidden]; hook(layer, down_out, down_in), if
        given, runs after each MLP down projection (where an edit's LoRA adds its delta)."""
        s = self.shape
        heads, kv, hd = s["heads"], s["kv_heads"], s["head_dim"]
        for index in range(start, stop):
            layer = self.layers_weights[index]
            qkv = F.rms_norm(x, (s["hidden"],)) @ layer["qkv"]
            q, k, v = qkv.split([heads * hd, kv * hd, kv * hd], dim=-1)
            q = q.view(self.batch, heads, 1, hd)
            layer["k_cache"][:, :, -1] = k.view(self.batch, kv, hd)  # the new token's slot
            layer["v_cache"][:, :, -1] = v.view(self.batch, kv, hd)
            att = F.scaled_dot_product_attention(q, layer["k_cache"], layer["v_cache"],
                                                 enable_gqa=True)
            x = x + att.reshape(self.batch, heads * hd) @ layer["o"]
            gate, up = (F.rms_norm(x, (s["hidden"],)) @ layer["gate_up"]).chunk(2, dim=-1)
            inner = F.silu(gate) * up
            down = inner @ layer["down"]
            if hook is not None:
                hook(index, down, inner)
            x = x + down
        return x

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.shape["hidden"],)) @ self.lm_head


def kernel_ms(num_keys: int, num_queries: int, dim: int, metric: str, args) -> float:
    queries, keys, owners = make_case(num_keys, dim, num_queries, torch.bfloat16, "cuda")
    out = nk.nearest_key(queries, keys, owners, 1e-3, metric,  # compiles
                         input_precision=args.precision)
    want = nk.nearest_key_ref(queries, keys, owners, 1e-3, metric)
    if not (torch.equal(out[0], want[0]) and torch.equal(out[2], want[2])):
        raise SystemExit(f"kernel disagrees with the reference at N={num_keys} S={num_queries}")
    times = graph_ms(lambda: nk.nearest_key(queries, keys, owners, 1e-3, metric, out=out,
                                            input_precision=args.precision),
                     args.warmup, args.repeats)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--keys", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dims", type=int, nargs="+", default=[4096, 64],
                        help="key widths: the hidden size (raw keys), a key map's output")
    parser.add_argument("--key-tokens", type=int, nargs="+", default=[1, 64],
                        help="key tokens routed in the step (requests whose prompt ends there)")
    parser.add_argument("--metric", default="cosine", choices=nk.METRICS)
    parser.add_argument("--precision", default="tf32x3",
                        help="ranking precision (the router's: route_kernel.RANKING_PRECISION)")
    parser.add_argument("--target", type=float, default=0.02, help="share routing may add")
    add_timing_args(parser, 5, 30, ROOT / "benchmarks/results/routing_step_share.json")
    args = parser.parse_args()
    name, peak = cuda_device()
    torch.manual_seed(0)
    routing = {(n, d, s): kernel_ms(n, s, d, args.metric, args)
               for n in args.keys for d in args.dims for s in args.key_tokens}
    print(f"device: {name}; Llama-3-8B-shaped decode step (torch ops, bf16, CUDA graph, context "
          f"{args.context}) against the Triton router ({args.metric}, fp32 keys); "
          f"median of {args.repeats} replays. The share is an ESTIMATE: kernel time / step time.")
    print(f"{'B':>4} {'step ms':>8} {'floor ms':>8} {'N':>7} {'d':>5} {'S':>4} {'route ms':>9} "
          f"{'share':>7} target <{100 * args.target:.0f}%")
    rows = []
    for batch in args.batches:
        step = DecodeStep(LLAMA_8B, batch, args.context)
        step_ms = statistics.median(graph_ms(step, args.warmup, args.repeats))
        floor_ms = (step.weight_bytes + step.kv_bytes) / (peak * 1e9) * 1e3 if peak else None
        for (n, dim, s), route_ms in routing.items():
            if s > batch:
                continue  # a step routes at most one key token per sequence in it
            share = route_ms / step_ms
            rows.append({"batch": batch, "context": args.context, "step_ms": step_ms,
                         "step_read_floor_ms": floor_ms, "weight_bytes": step.weight_bytes,
                         "kv_bytes": step.kv_bytes, "keys": n, "key_tokens": s, "dim": dim,
                         "route_ms": route_ms, "share": share, "meets": share < args.target})
            print(f"{batch:>4} {step_ms:>8.3f} {floor_ms or float('nan'):>8.3f} {n:>7} {dim:>5} "
                  f"{s:>4} "
                  f"{route_ms:>9.4f} {100 * share:>6.2f}% {'yes' if share < args.target else 'NO'}")
        del step
        torch.cuda.empty_cache()
    save_report(args.out, {
        "device": name, "peak_gbps": peak, "torch": torch.__version__,
        "triton": getattr(nk.triton, "__version__", None), "metric": args.metric,
        "precision": args.precision,
        "model_shape": LLAMA_8B, "estimate": "route kernel ms / torch decode step ms",
        "target_share": args.target, "repeats": args.repeats, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
