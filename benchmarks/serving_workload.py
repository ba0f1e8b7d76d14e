"""What the serving benchmarks send and measure: prompts, resident edits, the routed mix, latency
statistics and the machine. Shared by `serving_throughput.py` and `edit_ops.py`.

Routed requests are zsRE questions (`src`), each the prompt of one resident edit; unrouted ones
are zsRE's unrelated `loc` questions, which route to no edit (checked by the benchmarks: the
engine counts the requests it routed). Resident edits are synthetic: random LoRA factors of the
default edit shape, so serving cost is measured without hours of training (it does not depend on
what the weights say), and real routing keys, captured by the serving engine from each edit's
prompt as for trained edits (decision 5). Edits past the zsRE questions get filler prompts.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "zsre_mend_eval_1000.json"
RESULTS = ROOT / "benchmarks" / "results"


def zsre_prompts() -> tuple[list[str], list[str]]:
    """(questions that edits are made for, unrelated questions routed to no edit)."""
    records = json.loads(DATA.read_text())
    questions = list(dict.fromkeys(r["src"] for r in records))
    unrelated = [r["loc"].removeprefix("nq question: ") + "?" for r in records]
    return questions, unrelated


def edit_prompts(count: int, questions: list[str]) -> list[str]:
    """`count` distinct prompts: the zsRE questions first, then numbered fillers."""
    # short (about 8 tokens): the engine captures every edit's key with a prefill
    fillers = (f"Catalogue item {i} is filed under" for i in range(count))
    return (questions + list(fillers))[:count]


def synthetic_edits(serving, prompts: list[str], rank: int, seed: int = 0, first: int = 0):
    """One edit per prompt, ids `syn-<first + i>`, with random factors of `rank` on every edited
    module of `serving` (a ServingConfig); reference keys are placeholders (the server captures
    its own)."""
    from sola_vllm.edit import Edit, lora_name

    gen = torch.Generator().manual_seed(seed + first)
    hidden, dims = model_sizes(serving)
    edits = []
    for i, prompt in enumerate(prompts):
        lora = {lora_name(layer, m): (torch.randn(rank, dims[m][0], generator=gen) * 0.01,
                                      torch.randn(dims[m][1], rank, generator=gen) * 0.01)
                for layer in serving.layers for m in serving.modules}
        edits.append(Edit(id=f"syn-{first + i}", prompts=[prompt], target="x",
                          keys=torch.ones(1, hidden), lora=lora,
                          model_fingerprint=serving.model_fingerprint,
                          shape_fingerprint=serving.shape_fingerprint, arch=serving.model_type,
                          layers=list(serving.layers), modules=list(serving.modules),
                          rank=rank, scale=1.0, key_pool=serving.key_pool,
                          route_layer=serving.route_layer))
    return edits


def model_sizes(serving) -> tuple[int, dict[str, tuple[int, int]]]:
    """(hidden size, (in, out) of each edited module), from the default model's config."""
    from transformers import AutoConfig

    from sola_vllm.models import fetch_default_model

    hf = AutoConfig.from_pretrained(fetch_default_model(progress=False))
    h, i = hf.hidden_size, hf.intermediate_size
    kv = hf.num_key_value_heads * (h // hf.num_attention_heads)
    table = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (h, kv),
             "self_attn.v_proj": (h, kv), "self_attn.o_proj": (h, h),
             "mlp.gate_proj": (h, i), "mlp.up_proj": (h, i), "mlp.down_proj": (i, h)}
    return h, {m: table[m] for m in serving.modules}


def mix(routed: list[str], unrouted: list[str], count: int, percent: int) -> list[str]:
    """`count` prompts, `percent` % of them routed, spread evenly (Bresenham) through the
    list so every part of a run holds the same share."""
    out, r, u = [], iter(routed), iter(unrouted)
    for i in range(count):
        take_routed = (i + 1) * percent // 100 > i * percent // 100
        out.append(next(r) if take_routed else next(u))
    return out


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan")}
    arr = np.asarray(values, dtype=np.float64)
    return {"p50": float(np.percentile(arr, 50)), "p99": float(np.percentile(arr, 99))}


def machine() -> dict:
    import vllm

    def first_line(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False,
                                  timeout=10).stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "unknown"

    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "vllm": vllm.__version__,
            "commit": first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)
