"""Same subject, other relation: does a prompt that names an edited subject but asks another
question route to that subject's edit? (Issue 4: "a prompt that mentions the subject but asks
a different relation must stay unrouted".)

Reads an evaluated CounterFact store (`sola-vllm eval --data rome_known_1000.json --out DIR`
keeps it under `DIR/edits/`), makes every edit of the stream active, and routes, on the
reported split:
- other-relation prompts: each edit's subject put into the templates of other relations (the
  `other_relation` probes of `eval.data`): the share routed at all, and to the subject's own
  edit;
- neighbours (the same relation asked of other subjects; CounterFact's locality prompts) and
  paraphrases (to their own edit or one with the same answer), for context.
Then, at the configuration's own thresholds, the other-relation prompts that route are
generated (12 greedy tokens, as the eval's locality) with their edit and with none: the share
of all other-relation prompts whose output changes (an unrouted prompt runs the base model
exactly, so it cannot change), i.e. 1 - the subject's locality.

With --chat every edit is keyed on its prompt's chat form too (`with_chat_keys`, a "chat" key),
and every prompt is routed twice, as sent (rows "raw") and in its chat form (rows "chat"):
one store serving both kinds of client. The configuration's thresholds are per key form
(`RouterConfig.thresholds`: a query routes below its nearest key's form's); `--thresholds`
sweeps one threshold for every key instead.

    .venv/bin/python benchmarks/subject_locality.py --data ../shared/data/rome_known_1000.json \
        --eval-dir sola-eval [--config last-token] [--thresholds 0.170 0.142] [--chat]
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
    other, para, neighbours = groups["other"], groups["para"], groups["neighbours"]
    return {
        "other_relation_routed": share(x is not None for x in routes["other"]),
        "other_relation_to_own_subject": share(
            x is not None and by_id[x].subject == c.subject
            for (c, _), x in zip(other, routes["other"])),
        "neighbours_routed": share(x is not None for x in routes["neighbours"]),
        "paraphrase_to_own_or_same_answer": share(
            x is not None and (x == c.id or by_id[x].target == c.target)
            for (c, _), x in zip(para, routes["para"])),
        "n": {"other_relation": len(other), "neighbours": len(neighbours),
              "paraphrases": len(para)},
    }


def changed_outputs(engine, other: list, routes: list, tokens: int = 12) -> dict:
    """Generate the routed prompts with their edits, then with every edit revoked (the base
    model); the share of all `other` prompts whose greedy tokens differ."""
    routed = [p for (_, p), x in zip(other, routes) if x is not None]
    edited = [g.token_ids for g in engine.generate(routed, tokens)] if routed else []
    engine.set_states(dict.fromkeys(engine.edits, "revoked"))
    base = [g.token_ids for g in engine.generate(routed, tokens)] if routed else []
    changed = sum(a != b for a, b in zip(edited, base, strict=True))
    return {"n": len(other), "routed": len(routed), "changed_count": changed,
            "changed": round(changed / len(other), 6), "tokens": tokens}


def chat_form_of(engine, item):
    """A group item (a prompt, or a (case, prompt) pair) with its prompt in chat form."""
    if isinstance(item, str):
        return chat_prompt(engine.tokenizer, item)
    return item[0], chat_prompt(engine.tokenizer, item[1])


def main() -> None:
    ap = store_parser(__doc__.split("\n")[0])
    ap.add_argument("--thresholds", type=float, nargs="+", default=None,
                    help="one threshold for every key, swept (default: the configuration's "
                         "own, per key form)")
    ap.add_argument("--chat", action="store_true",
                    help="key each edit on its prompt's chat form too (`with_chat_keys`; the "
                         "LoRA is not retrained for it) and route every prompt raw and in its "
                         "chat form")
    args = ap.parse_args()
    config, cfg, data, stream, edits = open_stored(args)
    cases = [c for c in stream if c.split == cfg.split]
    groups = {"other": [(c, p) for c in cases for p in c.other_relation],
              "para": [(c, p) for c in cases for p in c.paraphrases],
              "neighbours": [p for c in cases for p in c.neighbours]}
    if not groups["other"]:
        sys.exit(f"{args.data}: no other-relation prompts (CounterFact-style data has them)")
    engine = RoutedEngine.from_pretrained(None, config)
    if args.chat:
        edits = with_chat_keys(engine, edits)
    engine.add_all(edits)
    own = config.router.thresholds
    thresholds = args.thresholds or [own]
    by_id = {c.id: c for c in stream}
    rows, changed = {}, {}
    for form in ("raw", "chat") if args.chat else ("raw",):
        sent = groups if form == "raw" else {
            k: [chat_form_of(engine, p) for p in v] for k, v in groups.items()}
        nearest = {k: engine.nearest(queries=engine.key_queries(
            [p if isinstance(p, str) else p[1] for p in v], 64)) for k, v in sent.items()}
        for threshold in thresholds:
            label = threshold_label(threshold)
            routes = {k: routes_at(v, threshold) for k, v in nearest.items()}
            row = {"threshold": threshold, **measure(groups, routes, by_id)}
            rows[label if not args.chat else f"{form}/{label}"] = row
            print(f"{engine.shape.describe_keys()}, {form} prompts, threshold {label}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                              if k not in ("n", "threshold")), flush=True)
        changed[form] = changed_outputs(engine, sent["other"], routes_at(nearest["other"], own))
        engine.set_states(dict.fromkeys(engine.edits, "active"))  # changed_outputs revoked them
        print(f"other-relation outputs changed ({form} prompts, thresholds "
              f"{threshold_label(own)}): {changed[form]['changed']:.3f} "
              f"({changed[form]['routed']} routed of {changed[form]['n']})", flush=True)
    name = Path(str(args.config)).stem + ("_chat" if args.chat else "")
    write_report(args, "subject_locality",
                 ROOT / "benchmarks" / "results" / f"subject_locality_{data.name}_{name}.json",
                 {"keys": engine.shape.describe_keys(), "split": cfg.split, "chat": args.chat,
                  "thresholds": own, "edits": len(stream), "rows": rows,
                  "other_relation_outputs": changed if args.chat else changed["raw"]})


def threshold_label(threshold: float | dict) -> str:
    """"0.037", or per key form: "raw 0.037, chat 0.0069"."""
    if not isinstance(threshold, dict):
        return f"{threshold:g}"
    return ", ".join(f"{form} {value:g}" for form, value in threshold.items())


if __name__ == "__main__":
    main()
