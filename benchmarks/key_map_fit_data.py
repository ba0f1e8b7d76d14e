"""Which dev pairs should a key map be fitted on? A dev-only comparison (issue 4).

Two-fold over each benchmark's dev subjects: a map is fitted on fold A's (prompt, paraphrase)
pairs of CounterFact only, or of CounterFact and zsRE together, and measured on fold B of each
benchmark: B's prompts are the keys, B's paraphrases must reach a key of their own subject, A's
prompts (same style, other subjects) are the hard negatives, and the threshold routes `1 - keep`
of them. Then the folds swap; three seeds each. No test record is read.

    .venv/bin/python benchmarks/key_map_fit_data.py --config smollm2-135m-instruct-mean-l6 \
        --out benchmarks/results/key_map_fit_data.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import mean

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without an installed sola_vllm
    sys.path.insert(0, str(ROOT))

from sola_vllm.commands import load_config, open_engine  # noqa: E402
from sola_vllm.eval.fit_map import dataset_pairs  # noqa: E402
from sola_vllm.eval.metric_study import FitConfig, fit_linear_metric  # noqa: E402

DATA = {"zsre": ROOT.parent / "shared/data/zsre_mend_eval_1000.json",
        "counterfact": ROOT.parent / "shared/data/rome_known_1000.json"}
FITS = (("counterfact",), ("counterfact", "zsre"))


class Pairs:
    """One benchmark's dev pairs, their query rows and a two-fold split by subject."""

    def __init__(self, engine, path: Path):
        self.pairs = dataset_pairs(path)
        self.prompts = engine.key_queries([p for p, _, _ in self.pairs])
        self.paraphrases = engine.key_queries([q for _, q, _ in self.pairs])
        subjects = list(dict.fromkeys(g for _, _, g in self.pairs))
        first = set(subjects[::2])
        self.folds = ([i for i, (_, _, g) in enumerate(self.pairs) if g in first],
                      [i for i, (_, _, g) in enumerate(self.pairs) if g not in first])

    def rows(self, fold: int):
        idx = self.folds[fold]
        return self.prompts[idx], self.paraphrases[idx], [self.pairs[i][2] for i in idx]


def paraphrase_hit(key_map, keys, paraphrases, subjects, negatives, keep: float) -> float:
    unit = lambda x: F.normalize(key_map(x), dim=-1)  # noqa: E731
    k = unit(keys)
    tau = float(torch.quantile((1 - unit(negatives) @ k.T).min(dim=1).values, 1 - keep))
    best = (1 - unit(paraphrases) @ k.T).min(dim=1)
    own = torch.tensor([subjects[j] == subjects[i] for i, j in enumerate(best.indices.tolist())])
    return float(((best.values < tau) & own).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="smollm2-135m-instruct-mean-l6")
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/key_map_fit_data.json")
    args = ap.parse_args()
    engine = open_engine(None, load_config(args.config))
    data = {name: Pairs(engine, path) for name, path in DATA.items()}
    runs = []
    for fit_fold in (0, 1):
        test_fold = 1 - fit_fold
        for fit_on in FITS:
            parts = [data[name].rows(fit_fold) for name in fit_on]
            groups = [f"{name}:{g}" for name, part in zip(fit_on, parts) for g in part[2]]
            for seed in range(args.seeds):
                key_map = fit_linear_metric(torch.cat([p[0] for p in parts]),
                                            torch.cat([p[1] for p in parts]), groups,
                                            FitConfig(dim=args.dim, seed=seed))
                run = {"fit": "+".join(fit_on), "fit_fold": fit_fold, "seed": seed}
                for name, pairs in data.items():
                    keys, paraphrases, subjects = pairs.rows(test_fold)
                    negatives = pairs.rows(fit_fold)[0]
                    for keep in (0.99, 0.999):
                        run[f"{name}@{keep}"] = paraphrase_hit(key_map, keys, paraphrases,
                                                               subjects, negatives, keep)
                runs.append(run)
    summary = {}
    print(f"paraphrase hit on the held-out dev fold (mean over {2 * args.seeds} fits):")
    for fit_on in FITS:
        name = "+".join(fit_on)
        summary[name] = {k: mean(r[k] for r in runs if r["fit"] == name)
                         for k in runs[0] if "@" in k}
        print(f"  fitted on {name:18s} " + "  ".join(f"{k} {v:.3f}"
                                                       for k, v in summary[name].items()))
    both, cf = summary["counterfact+zsre"], summary["counterfact"]
    print("ratio (counterfact+zsre / counterfact): " + "  ".join(
        f"{k} {both[k] / cf[k]:.3f}x" for k in both))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": args.config, "dim": args.dim, "seeds": args.seeds,
                                    "pairs": {n: len(d.pairs) for n, d in data.items()},
                                    "summary": summary, "runs": runs}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
