"""Chat keys that survive a client's own system prompt or a conversation: pool the last user turn.

A chat-form key (`train.chat_form`) is the mean of the states entering the route layer over the
whole chat prompt: the template's default system prompt, the user message and the assistant
header. A client that sends its own system prompt, or asks in a later turn, runs other tokens
before the question, and its query reaches no edit (`benchmarks/chat_routing.py`: 0.000).
This measures the alternative: pool only the last user turn (from the first token of its
content to the end: the message, its end-of-turn marker and the assistant header), for keys
and queries alike. States inside the turn still attend to what came before; the question is
how much.

Dev split, one record per subject: each case's key is read from its prompt's chat form (the
default system prompt, one user message), pooled over the whole prompt ("full", what sola-vllm
serves) or over the last user turn ("turn"), both under the configuration's key map. Queries:
each case's prompt and paraphrases (positives: they should reach their own key), unrelated
prompts (zsRE `loc`, CounterFact's locality) and, for CounterFact, the hard negatives
(other-relation prompts about the same subject, the same relation about other subjects), each
sent four ways: "default" (the key's own form), "system" (a system prompt of the client's own),
"second_turn" (after an unrelated first exchange) and "raw" (no template). Each pooling gets the
dev rule's threshold: the largest that keeps `--keep` of every negative group of the default
form unrouted. Routing only (nearest key among the cases' keys; no LoRA, no generation).

    .venv/bin/python benchmarks/chat_turn_window.py --data ../shared/data/rome_known_1000.json \
        [--cases 200] [--config smollm2-135m-instruct-mean-l6-strict]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without an installed sola_vllm
    sys.path.insert(0, str(ROOT))

from sola_vllm.chat_form import chat_text  # noqa: E402
from sola_vllm.commands import load_config  # noqa: E402
from sola_vllm.engine import RoutedEngine  # noqa: E402
from sola_vllm.eval.data import load, one_per_subject  # noqa: E402
from sola_vllm.eval.stored import share  # noqa: E402
from sola_vllm.kernels.nearest_key import pairwise_distance_ref  # noqa: E402
from sola_vllm.train import residuals_at  # noqa: E402

SYSTEM = "You are a concise assistant. Answer in a few words."
FIRST_TURN = [{"role": "user", "content": "Hello! Can you help me with a few questions?"},
              {"role": "assistant", "content": "Of course. What would you like to know?"}]
FORMS = ("default", "system", "second_turn", "raw")
POOLINGS = ("full", "turn")


def sent(tokenizer, prompt: str, form: str) -> str:
    """The text a client of `form` runs for `prompt`."""
    user = [{"role": "user", "content": prompt}]
    if form == "raw":
        return prompt
    if form == "system":
        return chat_text(tokenizer, [{"role": "system", "content": SYSTEM}, *user])
    return chat_text(tokenizer, user if form == "default" else [*FIRST_TURN, *user])


@torch.inference_mode()
def pooled(engine, prompt: str, form: str) -> dict[str, torch.Tensor]:
    """The prompt's query in each pooling, raw fp32 [d]: "full" as the router reads it (every
    token but the first), "turn" from the last user message's first token on."""
    text = sent(engine.tokenizer, prompt, form)
    enc = engine.tokenizer(text, return_offsets_mapping=True, add_special_tokens=True)
    ids = torch.tensor([enc.input_ids])
    layer = engine.shape.route_layer
    states = residuals_at(engine, [layer], ids, torch.ones_like(ids),
                          torch.arange(ids.shape[1])[None])[layer][0].float()
    start = text.rindex(prompt)
    turn = [i for i, (_, end) in enumerate(enc.offset_mapping) if end > start and i > 0]
    return {"full": states[1:].mean(0), "turn": states[turn].mean(0)}


def queries(engine, prompts: list[str], form: str) -> dict[str, torch.Tensor]:
    rows = [pooled(engine, p, form) for p in prompts]
    return {pool: engine.mapped(torch.stack([r[pool] for r in rows])) for pool in POOLINGS}


def nearest(q: torch.Tensor, keys: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    return pairwise_distance_ref(q, keys, metric).min(dim=1)


def threshold_keeping(distances: list[torch.Tensor], keep: float) -> float:
    """The largest threshold under which at most 1 - keep of every group routes (strict <)."""
    return min(float(d.sort().values[int((1 - keep) * len(d))]) for d in distances)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--cases", type=int, default=200)
    ap.add_argument("--per-case", type=int, default=2, help="paraphrases/negatives per case")
    ap.add_argument("--config", default="smollm2-135m-instruct-mean-l6-strict")
    ap.add_argument("--keep", type=float, default=0.99)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    started = time.perf_counter()
    config = load_config(args.config)
    engine = RoutedEngine.from_pretrained(None, config)
    data = load(args.data)
    cases = one_per_subject(data.split("dev"))[:args.cases]
    k = args.per_case
    groups = {"prompt": [(i, c.prompt) for i, c in enumerate(cases)],
              "paraphrase": [(i, p) for i, c in enumerate(cases) for p in c.paraphrases[:k]],
              "unrelated": [(None, p) for c in cases for p in c.locality[:k]],
              "other_relation": [(None, p) for c in cases for p in c.other_relation[:k]],
              "neighbour": [(None, p) for c in cases for p in c.neighbours[:k]]}
    groups = {name: items for name, items in groups.items() if items}
    keys = queries(engine, [c.prompt for c in cases], "default")
    metric = config.router.metric
    found = {}  # (form, group, pool) -> (distance, nearest case)
    for form in FORMS:
        for name, items in groups.items():
            q = queries(engine, [p for _, p in items], form)
            for pool in POOLINGS:
                found[form, name, pool] = nearest(q[pool], keys[pool], metric)
        print(f"queried {form} ({time.perf_counter() - started:.0f} s)", flush=True)
    negatives = [g for g in groups if groups[g][0][0] is None]
    report = {"benchmark": "chat_turn_window", "data": str(args.data), "split": "dev",
              "cases": len(cases), "config": args.config, "keys": "chat form, default system",
              "system": SYSTEM, "first_turn": FIRST_TURN, "keep": args.keep,
              "n": {g: len(v) for g, v in groups.items()}, "poolings": {}}
    for pool in POOLINGS:
        threshold = threshold_keeping([found["default", g, pool][0] for g in negatives],
                                      args.keep)
        rows = {}
        for form in FORMS:
            row = {}
            for name, items in groups.items():
                dist, index = found[form, name, pool]
                routed = (dist < threshold).tolist()
                if items[0][0] is None:
                    row[f"{name}_routed"] = share(routed)
                else:
                    row[f"{name}_to_own"] = share(r and int(j) == i for (i, _), r, j
                                                  in zip(items, routed, index.tolist()))
            rows[form] = row
            print(f"{pool} pooling, threshold {threshold:.4g}, {form}: " + ", ".join(
                f"{key} {value:.3f}" for key, value in row.items()), flush=True)
        report["poolings"][pool] = {"threshold": threshold, "rows": rows}
    report["seconds"] = round(time.perf_counter() - started, 1)
    out = args.out or ROOT / "benchmarks" / "results" / f"chat_turn_window_{data.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
