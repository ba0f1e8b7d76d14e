"""An evaluated store, read back: what the benchmarks that reread an eval run share (the
options naming the run, the stream's trained `sola` edits, checked complete, and how they read
routes off nearest keys)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .harness import EvalConfig, edit_stream, edits_dir
from .methods import build_methods


def store_parser(description: str) -> argparse.ArgumentParser:
    """--data, --eval-dir, --config, --edits, --view and --out; callers add their own."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--eval-dir", type=Path, required=True, help="an eval run's --out")
    ap.add_argument("--config", default="smollm2-135m-instruct-mean-l6")
    ap.add_argument("--edits", type=int, default=1000)
    ap.add_argument("--view", choices=("full", "one_per_subject"), default="full")
    ap.add_argument("--out", type=Path, default=None, help="JSON (default: results/...)")
    return ap


def stored_stream(cfg: EvalConfig):
    """(dataset, stream, each stream case's `sola` edit as the eval trained it under
    `cfg.out`). Raises ValueError naming the store if any edit is missing."""
    from ..store import EditStore

    data, stream = edit_stream(cfg)
    store = EditStore(edits_dir(cfg, build_methods(["sola"], cfg.config)[0]))
    if not store.exists():
        raise ValueError(f"no sola edits under {cfg.out} for this configuration's training "
                         f"recipe ({store.path.name}): run sola-vllm eval --out {cfg.out} first")
    by_id = {e.id: e for e in store.all()}
    missing = [c.id for c in stream if c.id not in by_id]
    if missing:
        raise ValueError(f"{store.path}: {len(missing)} of the stream's edits are not trained "
                         f"(run sola-vllm eval first), e.g. {missing[:3]}")
    return data, stream, [by_id[c.id] for c in stream]


def open_stored(args, **options):
    """(config, EvalConfig, dataset, stream, edits) of the run `store_parser`'s options name
    (`options`: more EvalConfig fields, e.g. seed); exits with the reason if it is incomplete."""
    import sys

    from ..commands import load_config

    config = load_config(args.config)
    cfg = EvalConfig(data=args.data, edits=args.edits, out=args.eval_dir, view=args.view,
                     config=config, **options)
    try:
        data, stream, edits = stored_stream(cfg)
    except ValueError as exc:
        sys.exit(str(exc))
    return config, cfg, data, stream, edits


def with_chat_keys(engine, edits: list) -> list:
    """Each edit with one more key, its first prompt's chat form (`chat_form.chat_prompt`)
    read by `engine`, and that form among its prompts (a "chat" key, `Edit.key_forms`); its
    LoRA is left as trained (for benchmarks that measure routing only)."""
    import dataclasses

    import torch

    from ..chat_form import chat_prompt

    forms = [chat_prompt(engine.tokenizer, e.prompts[0]) for e in edits]
    keys = engine.key_queries(forms, 64)
    return [dataclasses.replace(e, prompts=[*e.prompts, form], keys=torch.cat([e.keys, key[None]]),
                                key_forms=[*e.forms(), "chat"])
            for e, form, key in zip(edits, forms, keys, strict=True)]


def routes_at(nearest, threshold: float | dict[str, float]) -> list[str | None]:
    """The edit each nearest-key result routes to at `threshold` (None: no edit): one for
    every key, or one per key form (`RouterConfig.thresholds`)."""
    from ..config import KEY_FORMS

    thresholds = threshold if isinstance(threshold, dict) else dict.fromkeys(KEY_FORMS, threshold)
    return [r.under(thresholds) for r in nearest]


def share(flags) -> float:
    """The share of true flags, rounded to 6 places (NaN when there are none)."""
    flags = list(flags)
    return round(sum(map(float, flags)) / len(flags), 6) if flags else float("nan")


def write_report(args, benchmark: str, default_out: Path, report: dict) -> Path:
    """`report` as JSON at --out (else `default_out`), after what names the run it read:
    the benchmark, --data, --eval-dir and --config."""
    out = args.out or default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": benchmark, "data": str(args.data),
                               "eval_dir": str(args.eval_dir), "config": str(args.config),
                               **report}, indent=1) + "\n")
    print(f"wrote {out}")
    return out
