"""Serving cost of routed edits: plain vLLM against vLLM with the sola-vllm plugin at 0, 100,
1,000 and 10,000 resident edits with 0 %, 50 % and 100 % of requests routed, and against vLLM's
own multi-LoRA (`enable_lora`, the same edits as explicit per-request adapters). Same model,
prompts and greedy sampling (`ignore_eos`, so every request makes `--max-tokens` tokens) for
every configuration, in one invocation.

Every measurement of a sola-vllm or LoRA configuration is paired with a plain-vLLM measurement
taken right after it, and the ratio is taken within the pair: slow drifts of the machine (other
load, heat) then cancel instead of landing on whichever configuration ran during them.

    offline: `LLM` engines stepped by hand, so time to first token (TTFT) and time per output
             token (TPOT, per request: (last - first token) / (tokens - 1)) are measured per
             request; all requests arrive at once.
    http:    `sola-vllm serve` and vLLM's plain API server on loopback, streaming completions
             from `--concurrency` clients (see `http_load.py`).

    .venv/bin/python benchmarks/serving_throughput.py                 # the full sweep
    .venv/bin/python benchmarks/serving_throughput.py --quick         # a 2-minute smoke run
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from serving_workload import (  # noqa: E402
    RESULTS,
    edit_prompts,
    machine,
    mix,
    percentiles,
    synthetic_edits,
    write_json,
    zsre_prompts,
)

ENGINE = dict(dtype="bfloat16", enforce_eager=True, max_model_len=1024,
              gpu_memory_utilization=0.5, seed=0)


# --- measuring one configuration -----------------------------------------------------------------
def measure(llm, prompts: list[str], max_tokens: int, lora_requests=None) -> dict:
    """Submit every prompt at once and step the engine until all finish."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True,
                            output_kind=RequestOutputKind.CUMULATIVE)
    engine, tag = llm.llm_engine, uuid.uuid4().hex[:8]
    started = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(f"bench-{tag}-{i}", prompt, params,
                           lora_request=lora_requests[i] if lora_requests else None)
    first, last, made = {}, {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            now, count = time.perf_counter(), len(out.outputs[0].token_ids)
            if count and out.request_id not in first:
                first[out.request_id] = now
            last[out.request_id], made[out.request_id] = now, count
    seconds = time.perf_counter() - started
    tokens = sum(made.values())
    ttft = [first[r] - started for r in first]
    tpot = [(last[r] - first[r]) / (made[r] - 1) for r in first if made[r] > 1]
    return {"requests": len(prompts), "seconds": seconds, "output_tokens": tokens,
            "tokens_per_s": tokens / seconds, "ttft_s": percentiles(ttft),
            "tpot_s": percentiles(tpot)}


def paired(name: str, run_config, run_plain, results: dict, extra: dict | None = None,
           repeats: int = 1) -> None:
    """Measure a configuration and plain vLLM, `repeats` times over; each ratio is taken
    within a pair, and the median pair is reported (with every pair's ratio, for the spread).
    Pairs alternate their order (config first, then plain first: ABBA), so a drift of the
    machine's speed during the sweep does not favour either side."""
    pairs = [ordered_pair(run_config, run_plain, config_first=i % 2 == 0)
             for i in range(repeats)]
    for got, base in pairs:
        got["plain"] = base
        got["ratio_tokens_per_s"] = got["tokens_per_s"] / base["tokens_per_s"]
        got["ratio_tpot_p50"] = got["tpot_s"]["p50"] / base["tpot_s"]["p50"]
        got["ratio_ttft_p50"] = got["ttft_s"]["p50"] / base["ttft_s"]["p50"]
    pairs.sort(key=lambda pair: pair[0]["ratio_tokens_per_s"])
    got, base = pairs[len(pairs) // 2]
    if repeats > 1:  # every pair's ratios first: the medians then replace the reported pair's
        every = {key: [g[key] for g, _ in pairs]
                 for key in ("ratio_tokens_per_s", "ratio_tpot_p50", "ratio_ttft_p50")}
        got["pair_ratios_tokens_per_s"] = every["ratio_tokens_per_s"]
        got["pair_ratios_tpot_p50"] = every["ratio_tpot_p50"]
        for key, values in every.items():
            got[key] = float(np.median(values))
    got.update(extra or {})
    results[name] = got
    spread = (f"  pairs {min(got['pair_ratios_tokens_per_s']):.3f}.."
              f"{max(got['pair_ratios_tokens_per_s']):.3f}" if repeats > 1 else "")
    print(f"  {name:<34} {got['tokens_per_s']:7.1f} tok/s  x{got['ratio_tokens_per_s']:.3f}  "
          f"TPOT p50 {got['tpot_s']['p50'] * 1e3:7.1f} ms x{got['ratio_tpot_p50']:.3f}  "
          f"TTFT p50 {got['ttft_s']['p50']:6.2f} s  (plain {base['tokens_per_s']:.1f} tok/s)"
          f"{spread}", flush=True)


def ordered_pair(run_config, run_plain, config_first: bool) -> tuple[dict, dict]:
    if config_first:
        got = run_config()
        return got, run_plain()
    base = run_plain()
    return run_config(), base


def warm(llm, prompts: list[str], args) -> None:
    """One unmeasured run of a full-size batch: an engine's first runs are slow (the first
    configuration's plain-vLLM runs read 47.5 tok/s against 55 later, after a 4-prompt warm-up),
    which made the first pair of a sweep read 1.08-1.19 for sola-vllm with no edit."""
    measure(llm, prompts[: args.requests], args.max_tokens)


def close(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


# --- the sweeps ----------------------------------------------------------------------------------
def routed_hits(sola) -> int:
    stats = sola.stats()
    if "routed_requests" in stats:
        return int(stats["routed_requests"])
    return sum(e["hits"] for e in sola.list_edits())  # servers from before that stat


def start_sola(args, model: Path, unrelated, results: dict):
    from sola_vllm.serving.llm import SolaLLM

    top = max(args.edits)
    started = time.perf_counter()
    if args.config is not None:
        from sola_vllm.commands import load_config

        config = load_config(args.config)
    else:  # what `sola-vllm serve` runs for this model
        from sola_vllm.default_config import default_config

        choice = default_config(model)
        config, results["config_name"] = choice.config, choice.name
    results["config"] = config.to_dict()
    sola = SolaLLM(model, config, max_edits=max(top, 1), max_keys=max(top, 1), **ENGINE)
    results["startup_sola_s"] = time.perf_counter() - started
    warm(sola.llm, unrelated, args)
    return sola


def plain_on(plain, args):
    """Plain vLLM on the configuration's own prompts (routed ones included: they are ordinary
    questions to an engine without edits), so each pair compares the same work."""
    return lambda batch: measure(plain, batch, args.max_tokens)


def sola_sweep(args, sola, questions, unrelated, run_plain, results: dict, save) -> list:
    from sola_vllm.config import EditConfig

    top = max(args.edits)
    prompts = edit_prompts(top, questions)
    rank = EditConfig().rank
    resident, kept = 0, []
    for count in sorted(args.edits):
        if count > resident:
            edits = synthetic_edits(sola.serving, prompts[resident:count], rank, first=resident)
            kept += edits[: max(0, args.lora_adapters - len(kept))]
            started = time.perf_counter()
            sola.add_edits(edits)
            results[f"add_{resident}_to_{count}_s"] = time.perf_counter() - started
            resident = count
            # one unmeasured run after a large add: the first run after one was slow twice
            # (0.87 of plain vLLM, then 0.95 in the next pair) and is not steady serving
            measure(sola.llm, mix(prompts, unrelated, args.requests, 0), args.max_tokens)
        for percent in (args.routed if count else [0]):
            batch = mix(prompts, unrelated, args.requests, percent)
            resident_prompts = set(prompts[:count])
            expected = sum(p in resident_prompts for p in batch)
            before = routed_hits(sola)
            paired(f"sola_{count}_edits_{percent}pct_routed",
                   lambda b=batch: measure(sola.llm, b, args.max_tokens),
                   lambda b=batch: run_plain(b), results,
                   {"edits": count, "routed_percent": percent, "expected_routed": expected},
                   args.repeats)
            got = (routed_hits(sola) - before) // args.repeats
            results[f"sola_{count}_edits_{percent}pct_routed"]["routed_requests"] = got
            save()
            if got != expected:
                print(f"  WARNING: {got} requests routed, {expected} expected", flush=True)
    close(sola.llm)
    return kept


def lora_sweep(args, model: Path, edits, unrelated, run_plain, results: dict, save) -> None:
    """vLLM's own multi-LoRA: each edit exported as a PEFT adapter, routed requests name
    their edit's adapter explicitly (the user's alternative to routing)."""
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    from sola_vllm.peft_export import export_peft

    folder = Path(tempfile.mkdtemp(prefix="sola-bench-peft-"))
    adapters = {}
    for i, edit in enumerate(edits):
        path = export_peft(edit, folder / edit.id, str(model))
        adapters[edit.prompts[0]] = LoRARequest(edit.id, i + 1, str(path))
    os.environ.pop("SOLA_VLLM_PREFIX_GUARD", None)  # a plain vLLM engine with LoRA enabled
    started = time.perf_counter()
    llm = LLM(model=str(model), enable_lora=True, max_lora_rank=max(e.rank for e in edits),
              max_loras=min(len(edits), args.max_loras), max_cpu_loras=len(edits), **ENGINE)
    results["startup_lora_s"] = time.perf_counter() - started
    warm(llm, unrelated, args)
    prompts = [e.prompts[0] for e in edits]
    for percent in args.routed:
        batch = mix(prompts, unrelated, args.requests, percent)
        loras = [adapters.get(p) for p in batch]
        measure(llm, batch, 2, loras)  # loads the adapters from disk: not part of serving
        paired(f"vllm_lora_{len(edits)}_adapters_{percent}pct", lambda b=batch, q=loras:
               measure(llm, b, args.max_tokens, q), lambda b=batch: run_plain(b), results,
               {"edits": len(edits), "routed_percent": percent,
                "max_loras": min(len(edits), args.max_loras)}, args.repeats)
        save()
    close(llm)


def offline(args, results: dict, save) -> None:
    from vllm import LLM

    from sola_vllm.models import fetch_default_model

    model = fetch_default_model(progress=False)
    questions, unrelated = zsre_prompts()
    # creation order is a choice: with both engines alive, the one made first may run
    # differently (an A/A pair read 1.08-1.19 with plain vLLM made first)
    sola = start_sola(args, model, unrelated, results) if args.sola_first else None
    started = time.perf_counter()
    plain = LLM(model=str(model), **ENGINE)
    results["startup_plain_s"] = time.perf_counter() - started
    warm(plain, unrelated, args)
    run_plain = plain_on(plain, args)
    sola = sola or start_sola(args, model, unrelated, results)
    kept = sola_sweep(args, sola, questions, unrelated, run_plain, results, save)
    if args.lora_adapters:
        lora_sweep(args, model, kept, unrelated, run_plain, results, save)
    close(plain)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["offline", "http", "all"], default="all")
    parser.add_argument("--edits", type=lambda s: [int(x) for x in s.split(",")],
                        default=[0, 100, 1000, 10000])
    parser.add_argument("--routed", type=lambda s: [int(x) for x in s.split(",")],
                        default=[0, 50, 100], help="percent of requests routed")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--lora-adapters", type=int, default=100,
                        help="edits served as vLLM LoRA adapters (0: skip)")
    parser.add_argument("--max-loras", type=int, default=64,
                        help="vLLM's max_loras: distinct adapters in one batch")
    parser.add_argument("--repeats", type=int, default=1,
                        help="pairs per configuration (the median pair is reported)")
    parser.add_argument("--sola-first", action="store_true",
                        help="offline: start the sola-vllm engine before plain vLLM's")
    parser.add_argument("--http-edits", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 0 and 20 edits, 8 requests of 8 tokens")
    parser.add_argument("--config", type=Path, default=None,
                        help="offline: sola-vllm options for the plugin's engine (a JSON file "
                             "or a shipped name, e.g. last-token; default: the model's "
                             "recommended configuration, as `sola-vllm serve` picks it)")
    parser.add_argument("--out", type=Path, default=RESULTS / "serving_throughput.json")
    args = parser.parse_args()
    if args.quick:
        args.edits, args.requests, args.max_tokens = [0, 20], 8, 8
        args.lora_adapters, args.http_edits, args.concurrency = 8, 20, 4
    if any(p < 0 or p > 100 for p in args.routed) or any(n < 0 for n in args.edits):
        parser.error("--routed takes percentages 0..100, --edits counts >= 0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    results = {"args": {k: (str(v) if isinstance(v, Path) else v)
                        for k, v in vars(args).items()},
               "command": " ".join(sys.argv), "machine": machine(), "offline": {}, "http": {}}
    print(f"{args.requests} requests x {args.max_tokens} tokens, {ENGINE['dtype']}, eager; "
          "each configuration is followed by plain vLLM, ratios are within the pair",
          flush=True)
    if args.mode in ("offline", "all"):
        print("offline (LLM engines stepped in this process):", flush=True)
        offline(args, results["offline"], save=lambda: write_json(args.out, results))
        write_json(args.out, results)
    if args.mode in ("http", "all"):
        from http_load import http_sweep

        print(f"http ({args.concurrency} concurrent streaming clients):", flush=True)
        http_sweep(args, results["http"], paired)
        write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
