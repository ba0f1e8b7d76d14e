"""Rollback routing: a revoked edit's keys dropped against kept as blocking keys (owner -1).

Reads an evaluated store (`sola-vllm eval --out DIR` keeps it under `DIR/edits/`), revokes the
same random half of the stream that the eval's rollback revokes, and measures for each
`RouterConfig.revoked_keys` mode and threshold, on the reported split:
- revoked prompts: the share that routes to no edit (so gives the base model's exact output),
  to a kept edit of the same subject (in zsRE's full stream, a conflicting record), or to
  another subject's edit;
- kept edits: their prompt routes to their own edit; their paraphrases route to their own edit
  or to one with the same answer, or to none;
- locality prompts: the share routed.
Routing only (nearest keys through the reference engine); no token is generated.

    .venv/bin/python benchmarks/revoked_keys.py --data ../shared/data/zsre_mend_eval_1000.json \
        --eval-dir sola-eval [--view one_per_subject] [--thresholds 0.170 0.252]
"""

from __future__ import annotations

import random
import sys
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without an installed sola_vllm
    sys.path.insert(0, str(ROOT))

from sola_vllm.config import REVOKED_KEYS, SolaConfig  # noqa: E402
from sola_vllm.engine import RoutedEngine  # noqa: E402
from sola_vllm.eval.stored import (  # noqa: E402
    open_stored,
    routes_at,
    share,
    store_parser,
    write_report,
)


def measure(engine, groups: dict, queries: dict, by_id: dict, threshold: float) -> dict:
    gone, kept, paraphrases, locality = (groups[k] for k in ("gone", "kept", "para", "loc"))
    r = {k: routes_at(engine.nearest(queries=q), threshold) for k, q in queries.items()}

    def same_subject(case, edit_id):
        return edit_id is not None and by_id[edit_id].subject == case.subject

    def same_answer(case, edit_id):
        return edit_id is not None and (edit_id == case.id or by_id[edit_id].target == case.target)

    return {
        "revoked_unrouted": share(x is None for x in r["gone"]),
        "revoked_to_same_subject": share(same_subject(c, x) for c, x in zip(gone, r["gone"])),
        "revoked_to_other_subject": share(x is not None and not same_subject(c, x)
                                          for c, x in zip(gone, r["gone"])),
        "kept_prompt_to_own_edit": share(x == c.id for c, x in zip(kept, r["kept"])),
        "kept_paraphrase_to_own_or_same_answer": share(
            same_answer(c, x) for (c, _), x in zip(paraphrases, r["para"])),
        "kept_paraphrase_unrouted": share(x is None for x in r["para"]),
        "locality_routed": share(x is not None for x in r["loc"]),
        "n": {"revoked": len(gone), "kept": len(kept), "paraphrases": len(paraphrases),
              "locality": len(locality)},
    }


def main() -> None:
    ap = store_parser(__doc__.split("\n")[0])
    ap.add_argument("--thresholds", type=float, nargs="+", default=None,
                    help="default: the configuration's own")
    ap.add_argument("--seed", type=int, default=0, help="which half is revoked (eval --seed)")
    args = ap.parse_args()

    config, cfg, data, stream, edits = open_stored(args, seed=args.seed)
    revoked = set(random.Random(cfg.seed).sample([c.id for c in stream], len(stream) // 2))
    cases = [c for c in stream if c.split == cfg.split]
    groups = {"gone": [c for c in cases if c.id in revoked],
              "kept": [c for c in cases if c.id not in revoked]}
    groups["para"] = [(c, p) for c in groups["kept"] for p in c.paraphrases]
    groups["loc"] = [p for c in cases for p in c.locality]
    prompts = {"gone": [c.prompt for c in groups["gone"]],
               "kept": [c.prompt for c in groups["kept"]],
               "para": [p for _, p in groups["para"]], "loc": groups["loc"]}
    thresholds = args.thresholds or [config.router.threshold]
    cases_by_id = {c.id: c for c in stream}
    rows, queries = {}, None
    for mode in REVOKED_KEYS:
        mode_config = SolaConfig(edit=config.edit, train=config.train,
                                 router=replace(config.router, revoked_keys=mode))
        engine = RoutedEngine.from_pretrained(None, mode_config)
        engine.add_all(edits)
        engine.set_states(dict.fromkeys(revoked, "revoked"))
        if queries is None:  # the same queries for both modes: they do not depend on routing
            queries = {k: engine.key_queries(v, 64) for k, v in prompts.items()}
        for threshold in thresholds:
            row = measure(engine, groups, queries, cases_by_id, threshold)
            rows[f"{mode} {threshold:g}"] = {"mode": mode, "threshold": threshold, **row}
            print(f"{mode:5s} threshold {threshold:.3f}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in row.items() if k != "n"), flush=True)
        del engine
    for threshold in thresholds:
        block, drop = rows[f"block {threshold:g}"], rows[f"drop {threshold:g}"]
        print(f"threshold {threshold:.3f}: revoked prompts unrouted block "
              f"{block['revoked_unrouted']:.3f} vs drop {drop['revoked_unrouted']:.3f}; "
              "kept paraphrases to their answer "
              f"block {block['kept_paraphrase_to_own_or_same_answer']:.3f} vs drop "
              f"{drop['kept_paraphrase_to_own_or_same_answer']:.3f}")
    name = "zsre" if data.name == "zsre" else "counterfact"
    suffix = "_one_per_subject" if args.view == "one_per_subject" else ""
    write_report(args, "revoked_keys",
                 ROOT / "benchmarks" / "results" / f"revoked_keys_{name}{suffix}.json",
                 {"view": args.view, "split": cfg.split, "seed": cfg.seed,
                  "edits": len(stream), "revoked": len(revoked), "rows": rows})


if __name__ == "__main__":
    main()
