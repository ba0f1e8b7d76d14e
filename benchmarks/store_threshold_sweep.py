"""What a routing threshold costs on a real store: hard false fires against paraphrase hits.

Reads an evaluated store (`sola-vllm eval --out DIR` keeps it under `DIR/edits/`) and, for a
grid of thresholds, measures on the store as the eval holds it at its last checkpoint:
- dev (calibration split, what a threshold may be chosen on; `eval.store_threshold`): the share
  of the other split's prompts (hard negatives: same style, other subjects) and of its locality
  prompts (unrelated) that route, against the reported split's keys;
- test (reported split; shown, never used to choose): the share of paraphrases that route to an
  edit of their own subject (the router's ceiling on generality), and of locality prompts that
  route.
It marks the thresholds `eval --threshold-keep KEEP` picks and the key map's own one. Routing
only (nearest keys); no token is generated.

    .venv/bin/python benchmarks/store_threshold_sweep.py \
        --data ../shared/data/zsre_mend_eval_1000.json --eval-dir sola-eval \
        --config smollm2-135m-instruct-mean-l6 [--view one_per_subject]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without an installed sola_vllm
    sys.path.insert(0, str(ROOT))

from sola_vllm.engine import RoutedEngine  # noqa: E402
from sola_vllm.eval.store_threshold import (  # noqa: E402
    StoreNegatives,
    group_thresholds,
    negative_distances,
)
from sola_vllm.eval.stored import open_stored, store_parser  # noqa: E402

GRID = [round(0.06 + 0.01 * i, 2) for i in range(25)]  # 0.06 .. 0.30


def nearest(engine, prompts: list[str]) -> tuple[torch.Tensor, list[str | None]]:
    routes = engine.nearest(prompts=prompts)
    return (torch.tensor([r.distance for r in routes], dtype=torch.float64),
            [r.edit_id for r in routes])


def main() -> None:
    ap = store_parser(__doc__.split("\n")[0])
    ap.add_argument("--keep", type=float, nargs="+", default=[0.999, 0.99],
                    help="mark the threshold eval --threshold-keep picks for each")
    args = ap.parse_args()

    config, cfg, data, stream, edits = open_stored(args)
    engine = RoutedEngine.from_pretrained(None, config)
    engine.add_all(edits)
    reported = [c for c in stream if c.split == cfg.split]

    negatives = StoreNegatives.of(data, reported, cfg.split)
    dev = negative_distances(engine, negatives, reported)  # all edits active again after
    subject = {c.id: c.subject.lower() for c in stream}
    para = [(p, c) for c in reported for p in c.paraphrases]
    para_d, para_to = nearest(engine, [p for p, _ in para])
    own = torch.tensor([to is not None and subject[to] == c.subject.lower()
                        for to, (_, c) in zip(para_to, para, strict=True)])
    loc_d = nearest(engine, [p for c in reported for p in c.locality])[0]

    marks = {f"--threshold-keep {keep}": min(group_thresholds(dev, keep).values())
             for keep in args.keep}
    marks["key map"] = config.router.threshold
    rows = []
    grid = [t for t in GRID if all(abs(t - m) > 5e-4 for m in marks.values())]
    for tau in sorted(set(grid) | set(marks.values())):
        rows.append({"threshold": tau,
                     "mark": ", ".join(k for k, v in marks.items() if v == tau),
                     "dev_hard_routed": float((dev["hard"] < tau).float().mean()),
                     "dev_unrelated_routed": (float((dev["unrelated"] < tau).float().mean())
                                              if len(dev["unrelated"]) else None),
                     "test_paraphrase_hit": float(((para_d < tau) & own).float().mean()),
                     "test_locality_routed": float((loc_d < tau).float().mean())})
    print(f"{data.name} ({args.view}): {len(stream)} edits, {len(reported)} {cfg.split} keys; "
          f"dev negatives: {len(negatives.hard)} hard, {len(negatives.unrelated)} unrelated; "
          f"{len(para)} test paraphrases")
    print(f"{'threshold':>9} {'dev hard':>9} {'dev unrel':>9} {'test para hit':>13} "
          f"{'test loc':>9}")
    for r in rows:
        unrelated = r["dev_unrelated_routed"]
        print(f"{r['threshold']:9.4f} {r['dev_hard_routed']:9.3f} "
              f"{'-' if unrelated is None else f'{unrelated:.3f}':>9}"
              f" {r['test_paraphrase_hit']:13.3f} {r['test_locality_routed']:9.3f}  {r['mark']}")
    out = args.out or ROOT / "benchmarks/results" / (
        f"store_threshold_sweep_{data.name}" + ("_one_per_subject" if args.view != "full"
                                                 else "") + ".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "data": str(args.data), "view": args.view, "config": args.config, "edits": len(stream),
        "keys": len(reported), "keep": args.keep, "marks": marks,
        "negatives": {k: len(v) for k, v in dev.items()}, "paraphrases": len(para),
        "command": "python benchmarks/store_threshold_sweep.py " + " ".join(sys.argv[1:]),
        "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
