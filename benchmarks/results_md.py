"""Generate `benchmarks/RESULTS.md` (and the throughput plot) from the benchmarks' JSON files in
`benchmarks/results/`: serving_throughput.json, edit_ops.json, routing_kernel.json (GPU) and
routing_kernel_cpu.json, routing_kernel_tune.json, routing_step_share.json,
routing_step_runtime.json (and _before). Sections whose JSON is missing say so.

    .venv/bin/python benchmarks/results_md.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "benchmarks" / "RESULTS.md"
PLOT = RESULTS / "serving_throughput.png"

# issue #5's targets: (what, configuration name, field, bound, "min" | "max")
TARGETS = [
    ("1,000 resident edits, no request routed: throughput", "sola_1000_edits_0pct_routed",
     "ratio_tokens_per_s", 0.97, "min"),
    ("1,000 resident edits, every request routed: throughput", "sola_1000_edits_100pct_routed",
     "ratio_tokens_per_s", 0.90, "min"),
    ("10,000 resident edits, no request routed: TPOT p50", "sola_10000_edits_0pct_routed",
     "ratio_tpot_p50", 1.05, "max"),
    ("10,000 resident edits, every request routed: TPOT p50", "sola_10000_edits_100pct_routed",
     "ratio_tpot_p50", 1.05, "max"),
]


def load(name: str) -> dict | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.exists() else None


def ms(x: float) -> str:
    return f"{x * 1e3:.0f}"


def machine_lines(data: dict) -> list[str]:
    m = data.get("machine", {})
    return [f"Machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores"
            f"{', GPU ' + m['cuda'] if m.get('cuda') else ', no GPU'}; Python {m.get('python')}, "
            f"torch {m.get('torch')}, vLLM {m.get('vllm')}; commit {m.get('commit')}.",
            f"Command: `{data.get('command', '?')}`", ""]


def config_rows(section: dict) -> list[str]:
    rows = ["| configuration | edits | routed | tok/s | ratio | TPOT p50 / p99 (ms) | ratio "
            "| TTFT p50 / p99 (s) | plain tok/s | routed requests |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in section.items():
        if not isinstance(r, dict) or "tokens_per_s" not in r:
            continue
        routed = r.get("routed_requests")
        expected = r.get("expected_routed")
        routed_cell = "" if routed is None else (
            f"{routed}" + (f" of {expected}" if expected is not None else ""))
        rows.append(
            f"| {name} | {r.get('edits', '')} | {r.get('routed_percent', '')} % | "
            f"{r['tokens_per_s']:.1f} | **{r['ratio_tokens_per_s']:.3f}** | "
            f"{ms(r['tpot_s']['p50'])} / {ms(r['tpot_s']['p99'])} | {r['ratio_tpot_p50']:.3f} | "
            f"{r['ttft_s']['p50']:.2f} / {r['ttft_s']['p99']:.2f} | "
            f"{r['plain']['tokens_per_s']:.1f} | {routed_cell} |")
    return rows


def target_rows(offline: dict, measured_only: bool = False) -> list[str]:
    rows = ["| target | measured (median pair) | every pair | bound | met |",
            "|---|---|---|---|---|"]
    for what, name, field, bound, kind in TARGETS:
        if name not in offline and measured_only:
            continue
        if name not in offline:
            rows.append(f"| {what} | not measured | | {bound} | - |")
            continue
        value = offline[name][field]
        pairs = offline[name].get("pair_ratios_" + field.removeprefix("ratio_"), [value])
        met = value >= bound if kind == "min" else value <= bound
        rows.append(f"| {what} | {value:.3f} | {', '.join(f'{p:.3f}' for p in pairs)} | "
                    f"{'>=' if kind == 'min' else '<='} {bound} | {'yes' if met else '**no**'} |")
    lora = {k: v for k, v in offline.items() if k.startswith("vllm_lora_")}
    for name, r in lora.items():
        same = name.replace("vllm_lora_", "sola_").replace("_adapters_", "_edits_") + "_routed"
        if same in offline:
            ours, theirs = offline[same]["ratio_tokens_per_s"], r["ratio_tokens_per_s"]
            rows.append(f"| at least as fast as vLLM multi-LoRA ({r['edits']} adapters, "
                        f"{r['routed_percent']} % with one) | {ours:.3f} vs {theirs:.3f} | "
                        f">= | {'yes' if ours >= theirs else '**no**'} |")
    return rows


def plot(data: dict) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for section, style in (("offline", "-o"), ("http", "--s")):
        by_pct: dict[int, list] = {}
        for r in data.get(section, {}).values():
            if isinstance(r, dict) and "edits" in r and "ratio_tokens_per_s" in r \
                    and "max_loras" not in r:
                by_pct.setdefault(r["routed_percent"], []).append(
                    (r["edits"], r["ratio_tokens_per_s"]))
        for pct, points in sorted(by_pct.items()):
            points.sort()
            xs = [max(x, 1) for x, _ in points]
            ax.plot(xs, [y for _, y in points], style, label=f"{section}, {pct} % routed")
    lora = [r for r in data.get("offline", {}).values()
            if isinstance(r, dict) and "max_loras" in r]
    for r in lora:
        ax.plot([r["edits"]], [r["ratio_tokens_per_s"]], "kx")
    if lora:
        ax.plot([], [], "kx", label="vLLM multi-LoRA (0/50/100 %)")
    ax.set_xscale("log")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("resident edits (0 plotted at 1)")
    ax.set_ylabel("output tokens/s / plain vLLM")
    ax.set_title("sola-vllm serving throughput vs plain vLLM (paired runs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(PLOT, dpi=120)
    plt.close(fig)
    return True


def throughput_section(data: dict | None) -> list[str]:
    out = ["## Serving throughput (`serving_throughput.py`)", ""]
    if data is None:
        return out + ["Not measured yet.", ""]
    args = data.get("args", {})
    out += machine_lines(data)
    out += [f"{args.get('requests')} requests x {args.get('max_tokens')} output tokens "
            "(greedy, `ignore_eos`), bf16, eager. Every configuration is measured in pairs with "
            "plain vLLM on the same prompts, alternating which runs first; ratios are within "
            "each pair.", ""]
    for name, title in TARGET_RUNS:
        targets = load(name)
        if targets and targets.get("offline"):
            out += [f"### {title}", "", *machine_lines(targets),
                    f"Routing: {routing_line(targets)}. {targets['args'].get('requests')} "
                    f"requests x {targets['args'].get('max_tokens')} output tokens. Each target "
                    "configuration measured "
                    f"{targets['args'].get('repeats')} times, each time followed by plain vLLM; "
                    "the median pair ratio is the measurement, every pair is listed (a single "
                    "pair varies by several percent on this machine).", "",
                    *target_rows(targets["offline"]), "", *config_rows(targets["offline"]), ""]
    if data.get("offline"):
        note = f" Note: {data['note']}." if data.get("note") else ""
        out += ["### Offline (`LLM` engine), up to 10,000 edits", "",
                f"`{data.get('command')}`.{note}", "",
                *target_rows(data["offline"]), "", *config_rows(data["offline"]), ""]
        adds = {k: v for k, v in data["offline"].items() if k.startswith("add_")}
        if adds:
            out += ["Hot-adding the resident edits (key capture in the engine, then one RPC per "
                    "64 edits): " + ", ".join(f"{k[4:].replace('_to_', ' -> ').removesuffix('_s')} "
                                          f"edits {v:.0f} s" for k, v in adds.items()), ""]
    if data.get("http"):
        http = data["http"]
        out += [f"### HTTP ({args.get('concurrency')} concurrent streaming clients)", "",
                *config_rows(http), ""]
        if "push_s" in http:
            out += [f"{http['push_count']} edits pushed over HTTP before the routed runs: p50 "
                    f"{ms(http['push_s']['p50'])} ms, p99 {ms(http['push_s']['p99'])} ms.", ""]
    for name, title in EXTRA_RUNS:
        out += extra_run_lines(load(name), title)
    if plot(data):
        out += [f"![throughput vs resident edits](results/{PLOT.name})", ""]
    return out


# runs of the throughput targets with repeated pairs: (file, section title)
TARGET_RUNS = [
    ("serving_throughput_targets.json",
     "The targets, with repeated pairs (the default configuration)"),
    ("serving_throughput_targets_last_token.json",
     "The same targets with last-token keys (the default before pooled keys)"),
]


def routing_line(data: dict) -> str:
    """How the run's plugin engine routed: from the configuration it recorded, or, for runs
    from before it did, from its command (no --config then meant last-token keys)."""
    from sola_vllm.serving.serve import describe_routing

    offline = data.get("offline", {})
    if "config" in offline:
        named = f" (`{offline['config_name']}`)" if offline.get("config_name") else ""
        return describe_routing(offline["config"]) + named
    command = data.get("command", "")
    if "--config" in command:
        return f"`--config {command.split('--config', 1)[1].split()[0]}`"
    return "last-token keys entering the first edited layer, cosine distance < 0.006"


# later runs, each in its own file: (file, section title)
EXTRA_RUNS = [
    ("serving_throughput_10k.json", "10,000 resident edits, with the warmed, paired method"),
    ("serving_throughput_10k_quiet.json", "10,000 resident edits, rerun on a quiet machine"),
    ("serving_throughput_http.json", "HTTP, every routed share, with the warmed, paired method"),
    ("serving_throughput_10k_pooled.json",
     "10,000 resident edits with the default configuration (pooled keys), AMD EPYC"),
    ("serving_throughput_10k_last_token_amd.json",
     "10,000 resident edits with last-token keys, AMD EPYC (the same machine, next run)"),
    ("serving_throughput_10k_pooled_rerun.json",
     "10,000 resident edits with the default configuration, AMD EPYC, rerun"),
]


def extra_run_lines(data: dict | None, title: str) -> list[str]:
    """One later run: its command, the targets it covers, every configuration it measured."""
    if data is None:
        return []
    out = [f"### {title}", "", f"`{data.get('command')}` (commit "
           f"{data.get('machine', {}).get('commit')}).", ""]
    if data.get("note"):
        out += [f"Note: {data['note']}.", ""]
    offline = data.get("offline") or {}
    if any(name in offline for _, name, *_ in TARGETS):
        out += [*target_rows(offline, measured_only=True), ""]
    for section in ("offline", "http"):
        if data.get(section):
            out += [f"{section}:", "", *config_rows(data[section]), ""]
    http = data.get("http") or {}
    if "push_s" in http:
        out += [f"{http['push_count']} edits pushed over HTTP before the routed runs: p50 "
                f"{ms(http['push_s']['p50'])} ms, p99 {ms(http['push_s']['p99'])} ms.", ""]
    return out


def ops_section(data: dict | None) -> list[str]:
    out = ["## Hot add and revoke (`edit_ops.py`)", ""]
    if data is None:
        return out + ["Not measured yet.", ""]
    out += machine_lines(data)
    out += ["| background load | add p50 / p99 (ms) | revoke p50 / p99 (ms) | not visible to "
            "the next request | background requests served | their TPOT p50 (ms) |",
            "|---|---|---|---|---|---|"]
    for name, r in data.items():
        if name.startswith("load_"):
            step = r.get("background_tpot_p50_s")
            out.append(f"| {r['clients']} clients | {ms(r['add_s']['p50'])} / "
                       f"{ms(r['add_s']['p99'])} | {ms(r['revoke_s']['p50'])} / "
                       f"{ms(r['revoke_s']['p99'])} | {r['not_visible_to_next_request']} of "
                       f"{2 * r['changes']} | {r['background_requests_served']} | "
                       f"{ms(step) if step else '-'} |")
    out += ["", "An add runs the edit's prompt through the engine to capture its key (decision "
            "5), so under load it takes about two engine steps (the capture's prefill, then the "
            "load-and-check RPC); a revoke is answered once it is stored and queued to the "
            "engine (see README, Revoking under traffic)."]
    if "memory" in data:
        m = data["memory"]
        push = m["rss_growth_last_pushes_bytes"] / m["last_pushes"]
        out += ["", f"Memory per resident edit (rank {m['rank']}): measured "
                f"{m['measured_bytes_per_resident_edit'] / 1024:.0f} KiB = a slot, allocated at "
                f"start ({m['measured_bytes_per_empty_slot'] / 1024:.0f} KiB: a server with "
                f"{m['slots']} slots minus one with a single slot, per slot) + what a push adds "
                f"({push / 1024:.0f} KiB: growth over {m['last_pushes']} pushes); formula "
                f"rank*(in+out)*4 per module + keys*d*4 = "
                f"{m['formula_bytes_per_edit'] / 1024:.0f} KiB."]
        if data.get("note"):
            out += ["", f"Note: {data['note']}."]
    return out + [""]


def kernel_section(data: dict | None, cpu: dict | None) -> list[str]:
    out = ["## Routing kernel (`routing_kernel.py`)", ""]
    if data is None:
        return out + ["Not measured yet.", ""] + kernel_cpu_lines(cpu)
    out += [f"Device: {data.get('device')}; torch {data.get('torch')}, triton "
            f"{data.get('triton')}; peak bandwidth {data.get('peak_gbps')} GB/s. Code: "
            f"{data.get('commit', '?')}. Command: `{data.get('command', '?')}`.", "",
            "Median ms of each provider; GB/s and % of peak count every fp32 key read once "
            "(the floor). The router runs `triton_tf32x3` with the key norms it keeps "
            "(`route_kernel`); every provider's routing equals the reference's on every row "
            f"({'yes' if all(r['agrees_with_ref'] for r in data['results']) else 'NO'}).", "",
            "| N | d | S | metric | router ms | GB/s | % peak | triton ieee | torch_mm | "
            "torch_cdist | torch_ref |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    cases: dict[tuple, dict] = {}
    for row in data.get("results", []):
        s = row["setup"]
        cases.setdefault((s["N"], s["d"], s["S"], s["metric"]), {})[row["provider"]] = row
    for (n, d, q, metric), rows in cases.items():
        router = rows["triton_tf32x3"]
        med = {k: f"{v['latency_ms']['median']:.3f}" for k, v in rows.items()}
        out.append(f"| {n} | {d} | {q} | {metric} | {med['triton_tf32x3']} | "
                   f"{router['achieved_gbps']:.0f} | {100 * router['frac_of_peak']:.0f} % | "
                   f"{med['triton']} | {med['torch_mm']} | {med['torch_cdist']} | "
                   f"{med['torch_ref']} |")
    return out + [""] + kernel_cpu_lines(cpu)


def kernel_cpu_lines(data: dict | None) -> list[str]:
    if data is None:
        return []
    out = [f"On CPU ({data.get('device')}; torch {data.get('torch')}; "
           "`routing_kernel_cpu.json`), the torch providers only:", "",
           "| provider | N | d | queries | metric | median ms |", "|---|---|---|---|---|---|"]
    for row in data.get("results", []):
        setup = row["setup"]
        out.append(f"| {row['provider']} | {setup['N']} | {setup['d']} | {setup['S']} | "
                   f"{setup['metric']} | {row['latency_ms']['median']:.3f} |")
    return out + [""]


def tune_section(data: dict | None) -> list[str]:
    out = ["### Launch configurations (`routing_kernel_tune.py`)", ""]
    if data is None:
        return out + ["Not measured yet.", ""]
    out += [f"Device: {data.get('device')}. Code: {data.get('commit', '?')}. Command: "
            f"`{data.get('command', '?')}`. Each shape's configurations, checked against the "
            "reference and timed in CUDA graphs; `_tiles` in `kernels/nearest_key.py` took the "
            "winners.", "", "| N | d | S | old default ms | best ms | speed-up | best |",
            "|---|---|---|---|---|---|---|"]
    for shape in data["shapes"]:
        best = shape["best"]
        out.append(f"| {shape['N']} | {shape['d']} | {shape['S']} | {shape['default_ms']:.3f} |"
                   f" {best['ms']:.3f} | {shape['default_ms'] / best['ms']:.2f}x | "
                   f"{best['override']} |")
    return out + [""]


def step_section(share: dict | None, runtime: dict | None, before: dict | None) -> list[str]:
    out = ["## Routing in a decode step of an 8B-class model", ""]
    if share is not None:
        out += [f"Estimate (`routing_step_share.py`; {share.get('device')}; code "
                f"{share.get('commit', '?')}; `{share.get('command', '?')}`): router kernel "
                "time over a Llama-3-8B-shaped torch decode step in a CUDA graph (context "
                f"{share['rows'][0]['context']}). d = 4096: raw keys; d = 64: a key map's "
                f"output. Target: under {100 * share['target_share']:.0f} %.", "",
                "| B | step ms | N | d | key tokens | router ms | share |",
                "|---|---|---|---|---|---|---|"]
        for r in share["rows"]:
            out.append(f"| {r['batch']} | {r['step_ms']:.2f} | {r['keys']} | {r['dim']} | "
                       f"{r['key_tokens']} | {r['route_ms']:.4f} | {100 * r['share']:.2f} % |")
        out.append("")
    if runtime is not None:
        old = {(r["batch"], r["keys"], r["key_tokens"]): r for r in (before or {}).get("rows",
                                                                                         [])}
        out += [f"Measured (`routing_step_runtime.py`; {runtime.get('device')}; code "
                f"{runtime.get('commit', '?')}; `{runtime.get('command', '?')}`): the same step "
                f"cut at layer {runtime['route_layer']} between two CUDA graphs, "
                "`SolaRuntime.route` (Triton router, raw 4096-d cosine keys, "
                f"{runtime['edits']} edits) between them and the punica apply (rank "
                f"{runtime['rank']}) in the second. `before`: the same benchmark before "
                "d868a4b and 9b0a08c (a list index made the host wait for the GPU before the "
                "search; 3 to 15 key tokens took the kernel's slow broadcast path).", "",
                "| B | N | key tokens | plain ms | routed ms | vs plain | before |",
                "|---|---|---|---|---|---|---|"]
        for r in runtime["rows"]:
            prev = old.get((r["batch"], r["keys"], r["key_tokens"]))
            was = "" if prev is None else f"{prev['vs_plain']:.3f}"
            out.append(f"| {r['batch']} | {r['keys']} | {r['key_tokens']} | "
                       f"{r['plain_ms']:.3f} | {r['routed_ms']:.3f} | {r['vs_plain']:.3f} | "
                       f"{was} |")
        out.append("")
    return out


def main() -> int:
    text = ["# Benchmark results", "",
            "Generated by `benchmarks/results_md.py` from `benchmarks/results/*.json`; every "
            "number below comes from one run of the command shown with it.", ""]
    text += throughput_section(load("serving_throughput.json"))
    text += ops_section(load("edit_ops.json"))
    text += kernel_section(load("routing_kernel.json"), load("routing_kernel_cpu.json"))
    text += tune_section(load("routing_kernel_tune.json"))
    text += step_section(load("routing_step_share.json"), load("routing_step_runtime.json"),
                         load("routing_step_runtime_before.json"))
    OUT.write_text("\n".join(text))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
