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
`train.chat_form` keys an edit; the LoRA is not retrained here): rows `*_with_chat_keys`, one
store serving both kinds of client. Each query routes below its nearest key's own threshold,
the configuration's for that key's form (`RouterConfig.thresholds`: `threshold` for raw keys,
`chat_threshold` for chat-form keys). Two more rows ask what the chat-form key (read with the
template's default system prompt, one user message) does not cover: `chat_own_system_*`, the
message after a system prompt of the client's own (`--system`), and `chat_second_turn_*`, the
message as the second user turn, after an unrelated first exchange. Routing only: no
generation. `--config` may name a JSON file with other thresholds (the store's training recipe
must match).

    .venv/bin/python benchmarks/chat_routing.py --data ../shared/data/zsre_mend_eval_1000.json \
        --eval-dir sola-eval [--config last-token]
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without an installed sola_vllm
    sys.path.insert(0, str(ROOT))

from sola_vllm.chat_form import chat_prompt, chat_text  # noqa: E402
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


SYSTEM = "You are a concise assistant. Answer in a few words."
FIRST_TURN = [{"role": "user", "content": "Hello! Can you help me with a few questions?"},
              {"role": "assistant", "content": "Of course. What would you like to know?"}]


def user(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


def wrapper(tokenizer, form: str, system: str):
    """How a client of this form sends a prompt: as is, or through the chat endpoint."""
    return {"raw": lambda p: p,
            "chat": lambda p: chat_prompt(tokenizer, p),
            "chat_own_system": lambda p: chat_text(
                tokenizer, [{"role": "system", "content": system}, *user(p)]),
            "chat_second_turn": lambda p: chat_text(tokenizer, [*FIRST_TURN, *user(p)])}[form]


def route_form(engine, groups: dict, by_id: dict, thresholds: dict, form: str,
               system: str = SYSTEM) -> dict:
    wrap = wrapper(engine.tokenizer, form, system)
    nearest = {k: engine.nearest(queries=engine.key_queries([wrap(p) for _, p in v], 64))
               for k, v in groups.items()}
    routes = {k: routes_at(v, thresholds) for k, v in nearest.items()}
    row = measure(groups, routes, by_id)
    print(f"{engine.shape.describe_keys()}, thresholds {thresholds}, {form} prompts: "
          + ", ".join(f"{k} {v:.3f}" for k, v in row.items()), flush=True)
    return row


def main() -> None:
    ap = store_parser(__doc__.split("\n")[0])
    ap.add_argument("--system", default=SYSTEM, help="the client's own system prompt")
    args = ap.parse_args()
    config, cfg, data, stream, edits = open_stored(args)
    cases = [c for c in stream if c.split == cfg.split]
    groups = {"prompt": [(c, c.prompt) for c in cases],
              "para": [(c, p) for c in cases for p in c.paraphrases],
              "loc": [(c, p) for c in cases for p in c.locality]}
    engine = RoutedEngine.from_pretrained(None, config)
    engine.add_all(edits)
    by_id = {c.id: c for c in stream}
    thresholds = config.router.thresholds
    rows = {}
    for form in ("raw", "chat"):
        rows[form] = route_form(engine, groups, by_id, thresholds, form)
    # each edit keyed on its chat form too (`with_chat_forms`); its LoRA is not retrained,
    # so this measures routing only
    keyed = with_chat_keys(engine, edits)
    for e in edits:
        engine.remove(e.id)
    engine.add_all(keyed)
    for form in ("raw", "chat", "chat_own_system", "chat_second_turn"):
        rows[f"{form}_with_chat_keys"] = route_form(engine, groups, by_id, thresholds, form,
                                                    args.system)
    name = Path(str(args.config)).stem
    write_report(args, "chat_routing",
                 ROOT / "benchmarks" / "results" / f"chat_routing_{data.name}_{name}.json",
                 {"keys": engine.shape.describe_keys(), "split": cfg.split,
                  "threshold": thresholds["raw"], "thresholds": thresholds,
                  "system": args.system, "first_turn": FIRST_TURN,
                  "edits": len(stream),
                  "n": {k: len(v) for k, v in groups.items()}, "rows": rows})

if __name__ == "__main__":
    main()
