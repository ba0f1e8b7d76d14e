"""Choosing the edit defaults on the dev split: rank, training steps and learning rate.

For each setting, trains one edit per zsRE dev record (the first N) and measures, with the edit
routed to its own prompt and paraphrase (so routing plays no part here):
- fit: greedy output of the edit prompt starts with the new answer (reliability when routed);
- paraphrase TF / EM when the paraphrase is routed to the edit (how far the LoRA generalises:
  the ceiling generality can reach once routing finds the edit);
- seconds per edit and optimizer steps.
Prints a table and writes JSON.

    .venv/bin/python benchmarks/edit_defaults.py --edits 40
    .venv/bin/python benchmarks/edit_defaults.py --data ../shared/data/rome_known_1000.json \
        --edits 120 --settings "rank8,rank8 stop0.002" \
        --out benchmarks/results/edit_defaults_stop_counterfact.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "zsre_mend_eval_1000.json"
SETTINGS = [  # (name, edit overrides, train overrides); every other option is the default
    ("rank2", {"rank": 2}, {}),
    ("rank4", {"rank": 4}, {}),
    ("rank8", {"rank": 8}, {}),
    ("rank4 steps30", {"rank": 4}, {"steps": 30}),
    ("rank4 lr3e-3", {"rank": 4}, {"lr": 3e-3}),
    ("rank4 sgd paper", {"rank": 4}, {"steps": 40, "lr": 0.05, "optimizer": "sgd",
                                      "schedule": "cosine", "stop_loss": 0.0}),
    ("rank8 stop0.01", {"rank": 8}, {"stop_loss": 0.01}),  # train on past the fit
    ("rank8 stop0.002", {"rank": 8}, {"stop_loss": 0.002}),
    ("rank8 stop0.0005", {"rank": 8}, {"stop_loss": 0.0005}),
]


def measure(engine, cases, train_config) -> dict:
    from sola_vllm.eval.baselines import route_everything
    from sola_vllm.train import target_ids

    fit, para_tf, para_em, seconds, steps = [], [], [], [], []
    for case in cases:
        started = time.perf_counter()
        edit = engine.train([case.prompt], case.target, edit_id="sweep", config=train_config)
        seconds.append(time.perf_counter() - started)
        steps.append(edit.train_info["steps"])
        engine.add(edit)
        with route_everything(engine):  # the only key is this edit's: everything routes to it
            prompts = [case.prompt, *case.paraphrases]
            targets = [target_ids(engine, p, case.target, append_eos=False) for p in prompts]
            greedy = engine.generate(prompts, max_new_tokens=max(len(t) for t in targets))
            forced, _ = engine.teacher_forced(prompts, targets)
        engine.remove("sweep")
        em = [float(g.token_ids[:len(t)] == t) for g, t in zip(greedy, targets, strict=True)]
        fit.append(em[0])
        para_em.append(statistics.mean(em[1:]))
        para_tf.append(statistics.mean(
            sum(a == b for a, b in zip(f, t, strict=True)) / len(t)
            for f, t in zip(forced[1:], targets[1:], strict=True)))
    return {"fit": statistics.mean(fit), "paraphrase_tf": statistics.mean(para_tf),
            "paraphrase_em": statistics.mean(para_em),
            "seconds_median": statistics.median(seconds), "steps_median": statistics.median(steps)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=40)
    p.add_argument("--data", type=Path, default=DEFAULT_DATA)
    p.add_argument("--model", default=None)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/edit_defaults.json")
    p.add_argument("--settings", default=None,
                   help="comma-separated setting names to run (default: all)")
    args = p.parse_args()
    names = [n for n, _, _ in SETTINGS]
    chosen = names if args.settings is None else [n.strip() for n in args.settings.split(",")]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        p.error(f"unknown settings {unknown}; known: {names}")

    from sola_vllm.config import SolaConfig
    from sola_vllm.engine import RoutedEngine
    from sola_vllm.eval.data import load

    cases = [c for c in load(args.data).split("dev") if c.paraphrases][:args.edits]
    rows = []
    for name, edit_over, train_over in [s for s in SETTINGS if s[0] in chosen]:
        base = SolaConfig().to_dict()
        config = SolaConfig.from_dict({"edit": {**base["edit"], **edit_over},
                                       "train": {**base["train"], **train_over}})
        engine = RoutedEngine.from_pretrained(args.model, config)
        row = {"setting": name, **measure(engine, cases, config.train),
               "config": {"edit": edit_over, "train": train_over}}
        rows.append(row)
        _write(args, cases, rows)  # after every setting: a stopped run keeps what it measured
        print(f"{name:18s} fit {row['fit']:.3f}  paraphrase TF {row['paraphrase_tf']:.3f} "
              f"EM {row['paraphrase_em']:.3f}  {row['seconds_median']:.2f} s/edit "
              f"({row['steps_median']:.0f} steps)", flush=True)
    print(f"wrote {args.out}")
    return 0


def _write(args, cases, rows) -> None:
    report = {"benchmark": "edit_defaults", "data": str(args.data), "split": "dev",
              "edits": len(cases), "rows": rows, "machine": platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
