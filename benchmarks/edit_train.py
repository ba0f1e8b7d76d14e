"""Seconds to train one edit on the default model, and peak memory (issue: target <= 10 s).

Trains edits for the first N usable zsRE records (question `src` -> new answer `alt`) from
`../shared/data/zsre_mend_eval_1000.json`, one after another on one engine, and reports the
median and p90 seconds per edit, how many edits reproduce their target greedily (and, for a
configuration that trains chat forms too, how many answer their chat form with it), and the
peak resident memory. `--config` names the configuration (a file, or a shipped name; default:
what `sola-vllm` commands run on the model). Writes JSON.

    .venv/bin/python benchmarks/edit_train.py --edits 20 \
        [--config smollm2-135m-instruct-mean-l6-chat]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "zsre_mend_eval_1000.json"


def zsre_edits(path: Path, count: int) -> list[tuple[str, str]]:
    """(prompt, target) pairs; records with an empty or blank `alt` are skipped."""
    records = json.loads(path.read_text())
    pairs = [(r["src"].strip(), r["alt"].strip()) for r in records if r["alt"].strip()]
    return pairs[:count]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=20)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--config", default=None,
                        help="a config file or shipped name (default: the model's default)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: benchmarks/results/edit_train[_<config>].json")
    args = parser.parse_args()

    if str(ROOT) not in sys.path:  # run from a checkout without an installed sola_vllm
        sys.path.insert(0, str(ROOT))
    from sola_vllm.chat_form import chat_prompt
    from sola_vllm.commands import load_config
    from sola_vllm.default_config import default_config
    from sola_vllm.engine import RoutedEngine

    name = args.config or default_config(args.model).name
    config = load_config(args.config) if args.config else default_config(args.model).config
    out = args.out or ROOT / "benchmarks" / "results" / (
        "edit_train.json" if args.config is None else f"edit_train_{Path(name).stem}.json")
    edits = zsre_edits(args.data, args.edits)
    engine = RoutedEngine.from_pretrained(args.model, config)
    chat_form = config.train.chat_form
    rss_loaded = peak_rss_mib()
    engine.train(["Warm-up prompt"], "warm up")  # first call pays one-off allocator/thread costs
    seconds, steps, reproduced, chat_reproduced = [], [], 0, 0
    for i, (prompt, target) in enumerate(edits):
        started = time.perf_counter()
        edit = engine.train([prompt], target, edit_id=f"bench-{i}")
        seconds.append(time.perf_counter() - started)
        steps.append(edit.train_info["steps"])
        engine.add(edit)
        got = engine.generate([prompt], max_new_tokens=len(target) + 8)[0]
        reproduced += got.text.strip() == target
        if chat_form:
            chat = engine.generate([chat_prompt(engine.tokenizer, prompt)],
                                   max_new_tokens=len(target) + 8)[0]
            chat_reproduced += chat.text.strip() == target
        engine.remove(edit.id)
        print(f"[{i + 1}/{len(edits)}] {seconds[-1]:.2f} s, {steps[-1]} steps, "
              f"{'ok ' if got.text.strip() == target else 'MISS'} {prompt!r} -> {got.text!r}",
              file=sys.stderr)
    ordered = sorted(seconds)
    result = {
        "benchmark": "edit_train",
        "model": str(args.model or "SmolLM2-135M-Instruct"), "config": name,
        "shape": repr(engine.shape), "train_config": engine.config.train.__repr__(),
        "edits": len(edits),
        "median_seconds": statistics.median(seconds),
        "p90_seconds": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))],
        "mean_steps": statistics.mean(steps), "reproduced_target": reproduced,
        "chat_form_reproduced_target": chat_reproduced if chat_form else None,
        "peak_rss_mib": peak_rss_mib(), "rss_after_load_mib": rss_loaded,
        "target_seconds": 10.0,
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "torch": torch.__version__, "python": platform.python_version(),
    }
    chat = f" ({chat_reproduced} in chat form)" if chat_form else ""
    print(f"train one edit ({name}): median {result['median_seconds']:.2f} s (p90 "
          f"{result['p90_seconds']:.2f} s) vs target 10 s -> ratio "
          f"{result['median_seconds'] / 10.0:.2f}; {reproduced}/{len(edits)} reproduce their "
          f"target{chat}; peak RSS {result['peak_rss_mib']:.0f} MiB")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
