"""Chat requests: do prompts sent through the model's chat template route as the raw prompts do?

Edits are keyed on their raw prompts (the engine captures a key by running the prompt as is).
A client of /v1/chat/completions sends the same question wrapped in the chat template (system
prompt, role markers, the assistant header last), so its key token and the states pooled into
its key differ. Reads an evaluated store (`sola-vllm eval --out DIR`), makes the stream's edits
active and routes, raw and chat-wrapped (`tokenizer.apply_chat_template`, one user message,
generation prompt added), on the reported split:
- edit prompts to their own edit (reliability's routing),
- paraphrases to their own edit or one with the same answer (generality's routing),
- unrelated prompts (locality) routed at all (they must not be).
Then the same after each edit gets one more key, its prompt's chat form (`with_chat_keys`, as
`train.chat_form` keys an edit; the LoRA is not retrained here): rows `*_with_chat_keys`.
Routing only: no generation. `--config` may name a JSON file with another threshold (the
store's training recipe must match).

    .venv/bin/python benchmarks/chat_routing.py --data ../shared/data/zsre_mend_eval_1000.json \
        --eval-dir sola-eval [--config last-token]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without an installed sola_vllm
    sys.path.insert(0, str(ROOT))

from sola_vllm.chat_form import chat_prompt  # noqa: E402
from sola_vllm.engine import RoutedEngine  # noqa: E402
from sola_vllm.eval.stored import (  # noqa: E402
    open_stored,
    routes_at,
    share,
    store_parser,
    with_chat_keys,
    write_report,
)


def measure(groups: dict, routes: dict, by_id: dict) -> dict:
    return {
        "prompt_to_own": share(x == c.id for (c, _), x in zip(groups["prompt"],
                                                              routes["prompt"])),
        "paraphrase_to_own_or_same_answer": share(
            x is not None and (x == c.id or by_id[x].target == c.target)
            for (c, _), x in zip(groups["para"], routes["para"])),
        "unrelated_routed": share(x is not None for x in routes["loc"]),
    }


def route_form(engine, groups: dict, by_id: dict, threshold: float, form: str) -> dict:
    wrap = (lambda p: p) if form == "raw" else (lambda p: chat_prompt(engine.tokenizer, p))
    nearest = {k: engine.nearest(queries=engine.key_queries([wrap(p) for _, p in v], 64))
               for k, v in groups.items()}
    routes = {k: routes_at(v, threshold) for k, v in nearest.items()}
    row = measure(groups, routes, by_id)
    print(f"{engine.shape.describe_keys()}, threshold {threshold:.4g}, {form}: " + ", ".join(
        f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    ap = store_parser(__doc__.split("\n")[0])
    args = ap.parse_args()
    config, cfg, data, stream, edits = open_stored(args)
    cases = [c for c in stream if c.split == cfg.split]
    groups = {"prompt": [(c, c.prompt) for c in cases],
              "para": [(c, p) for c in cases for p in c.paraphrases],
              "loc": [(c, p) for c in cases for p in c.locality]}
    engine = RoutedEngine.from_pretrained(None, config)
    engine.add_all(edits)
    by_id = {c.id: c for c in stream}
    threshold = config.router.threshold
    rows = {}
    for form in ("raw", "chat"):
        rows[form] = route_form(engine, groups, by_id, threshold, form)
    # each edit keyed on its chat form too (`with_chat_forms`); its LoRA is not retrained,
    # so this measures routing only
    keyed = with_chat_keys(engine, edits)
    for e in edits:
        engine.remove(e.id)
    engine.add_all(keyed)
    for form in ("raw", "chat"):
        rows[f"{form}_with_chat_keys"] = route_form(engine, groups, by_id, threshold, form)
    name = Path(str(args.config)).stem
    write_report(args, "chat_routing",
                 ROOT / "benchmarks" / "results" / f"chat_routing_{data.name}_{name}.json",
                 {"keys": engine.shape.describe_keys(), "split": cfg.split,
                  "threshold": threshold, "edits": len(stream),
                  "n": {k: len(v) for k, v in groups.items()}, "rows": rows})

if __name__ == "__main__":
    main()
