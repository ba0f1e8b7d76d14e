"""First look at serving cost: plain vLLM against vLLM with the sola-vllm plugin holding 0 and
1,000 resident edits, with 0 % and 100 % of requests routed. Same model, prompts and greedy
sampling for every configuration, in one invocation; offline `LLM.generate`.

Resident edits are synthetic (random rank-4 LoRA weights; keys captured by the engine from
zsRE questions, as for real edits): training 1,000 edits would take an hour here, and the
serving cost does not depend on what the weights say. Routed requests are those questions;
unrouted ones are zsRE's unrelated `loc` questions.

    .venv/bin/python benchmarks/serving_throughput.py --edits 1000 --requests 64
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "zsre_mend_eval_1000.json"


def synthetic_edits(serving, questions, rank=4, seed=0):
    from sola_vllm.edit import Edit, lora_name

    gen = torch.Generator().manual_seed(seed)
    dims = {"mlp.up_proj": (576, 1536), "mlp.down_proj": (1536, 576)}
    edits = []
    for i, question in enumerate(questions):
        lora = {lora_name(layer, m): (torch.randn(rank, dims[m][0], generator=gen) * 0.01,
                                      torch.randn(dims[m][1], rank, generator=gen) * 0.01)
                for layer in serving.layers for m in serving.modules}
        edits.append(Edit(id=f"syn-{i}", prompts=[question], target="x",
                          keys=torch.ones(1, 576), lora=lora,
                          model_fingerprint=serving.model_fingerprint,
                          shape_fingerprint=serving.shape_fingerprint, arch="llama",
                          layers=list(serving.layers), modules=list(serving.modules),
                          rank=rank, scale=1.0))
    return edits


def run(llm_generate, prompts, max_tokens) -> dict:
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm_generate(prompts[:4], params)  # warm-up
    started = time.perf_counter()
    outs = llm_generate(prompts, params)
    seconds = time.perf_counter() - started
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"seconds": seconds, "output_tokens": tokens, "tokens_per_s": tokens / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path,
                        default=ROOT / "benchmarks/results/serving_throughput.json")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM

    from sola_vllm.models import fetch_default_model
    from sola_vllm.serving.llm import SolaLLM

    records = json.loads(DATA.read_text())
    questions = [r["src"] for r in records][: args.edits]
    unrouted = [r["loc"].removeprefix("nq question: ") + "?" for r in records][: args.requests]
    routed = questions[: args.requests]
    engine = dict(dtype=args.dtype, enforce_eager=True, max_model_len=1024,
                  gpu_memory_utilization=0.5, seed=0)
    model = fetch_default_model(progress=False)
    results = {}

    started = time.perf_counter()
    plain = LLM(model=str(model), **engine)
    results["startup_plain_s"] = time.perf_counter() - started
    results["plain"] = run(partial(plain.generate, use_tqdm=False), unrouted, args.max_tokens)
    plain.llm_engine.engine_core.shutdown()
    del plain
    gc.collect()

    started = time.perf_counter()
    sola = SolaLLM(model, max_edits=max(args.edits, 1), max_keys=max(args.edits, 1), **engine)
    results["startup_sola_s"] = time.perf_counter() - started
    gen = partial(sola.llm.generate, use_tqdm=False)
    results["sola_0_edits"] = run(gen, unrouted, args.max_tokens)
    edits = synthetic_edits(sola.serving, questions)
    started = time.perf_counter()
    sola.add_edits(edits)
    results["add_edits_s"] = time.perf_counter() - started
    results[f"sola_{args.edits}_edits_0pct_routed"] = run(gen, unrouted, args.max_tokens)
    results[f"sola_{args.edits}_edits_100pct_routed"] = run(gen, routed, args.max_tokens)
    sola.close()

    base = results["plain"]["tokens_per_s"]
    print(f"output tokens/s, {args.requests} requests x {args.max_tokens} tokens, {args.dtype}, "
          f"eager, CPU threads {torch.get_num_threads()}:")
    for name, value in results.items():
        if isinstance(value, dict):
            value["ratio_to_plain"] = value["tokens_per_s"] / base
            print(f"  {name:<32} {value['tokens_per_s']:8.1f} tok/s  "
                  f"ratio to plain vLLM {value['ratio_to_plain']:.3f}")
    print(f"  start-up: plain {results['startup_plain_s']:.1f} s, sola "
          f"{results['startup_sola_s']:.1f} s; hot-adding {args.edits} edits took "
          f"{results['add_edits_s']:.1f} s")
    results["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                          "threads": torch.get_num_threads()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
