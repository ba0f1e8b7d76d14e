"""A shipped key map's routing threshold, recalibrated on the benchmarks' dev splits with every
negative group of `fit-metric --calibrate` (`eval.fit_map.DevDistances`): other subjects' prompts
(hard), unrelated prompts, and the keyed subjects' own other-relation prompts (same subject,
another question; CounterFact-style data). For each `--keep`: each file's threshold (the
largest that keeps KEEP of each of its groups unrouted), the smallest over the files, and the
dev rates at it. Without refitting the map. Routing only; no token is generated.

    .venv/bin/python benchmarks/map_threshold.py --config smollm2-135m-instruct-mean-l6 \
        --calibrate ../shared/data/rome_known_1000.json ../shared/data/zsre_mend_eval_1000.json \
        [--keep 0.999 0.99] [--prompt-form chat]

`--prompt-form chat`: every key and query is the prompt's chat form (one user message in the
model's chat template, `chat_form.py`), as edits trained with `train.chat_form` are keyed and
chat clients are routed; their mean-pooled states share the template's system prompt and role
markers, so their distances are smaller than raw prompts'.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without an installed sola_vllm
    sys.path.insert(0, str(ROOT))

from sola_vllm.commands import load_config  # noqa: E402
from sola_vllm.engine import RoutedEngine  # noqa: E402
from sola_vllm.eval.fit_map import calibrate  # noqa: E402
from sola_vllm.eval.prompt_forms import PROMPT_FORMS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="smollm2-135m-instruct-mean-l6")
    ap.add_argument("--calibrate", type=Path, nargs="+", required=True)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.999, 0.99])
    ap.add_argument("--prompt-form", choices=PROMPT_FORMS, default="raw")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                    "map_threshold.json")
    args = ap.parse_args()
    config = load_config(args.config)
    key_map = config.router.load_key_map()
    if key_map is None:
        sys.exit(f"configuration {args.config} has no key map")
    engine = RoutedEngine.from_pretrained(None, config)
    rows = {}
    for keep in args.keep:
        rows[f"{keep:g}"] = calibrate(engine, key_map, args.calibrate, keep, config.router.metric,
                                      args.prompt_form)
        for cal in rows[f"{keep:g}"]:
            other = cal["other_relation_routed"]
            print(f"keep {keep:g}: threshold {cal['threshold']:.4f} ({cal['data']} dev alone: "
                  f"{cal['own_threshold']:.4f}): paraphrase hit {cal['paraphrase_hit']:.3f}, "
                  f"hard negatives routed {cal['hard_negative_routed']:.3f}, unrelated routed "
                  f"{cal['unrelated_routed']:.3f}, other-relation routed "
                  f"{'-' if other is None else f'{other:.3f}'} ({cal['keys']} keys)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "benchmark": "map_threshold", "config": str(args.config),
        "prompt_form": args.prompt_form,
        "map_threshold": key_map.threshold, "command": "benchmarks/map_threshold.py " +
        " ".join(sys.argv[1:]), "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
