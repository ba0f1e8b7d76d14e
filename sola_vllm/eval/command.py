"""`sola-vllm eval`: run the harness, write report.json / report.md / plots into --out."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from pathlib import Path

from .harness import EvalConfig, run
from .methods import METHODS
from .prompt_forms import PROMPT_FORMS

QUICK = {"edits": 6, "checkpoints": (1, 3, 6), "joint_epochs": 3}


def add_parser(sub, add_model, add_json) -> None:
    p = sub.add_parser("eval", help="measure edit quality on benchmark data (zsRE, CounterFact)",
                       description="Reliability, generality, locality, retention over T "
                                   "edits, rollback and routing; resumable (see --out).")
    p.add_argument("--data", required=True, type=Path,
                   help="zsRE (MEND format) or ROME known-facts JSON, e.g. "
                        "../shared/data/zsre_mend_eval_1000.json")
    p.add_argument("--edits", type=int, default=1000, help="edits in the stream (default 1000)")
    p.add_argument("--engine", choices=("reference", "vllm"), default="reference")
    p.add_argument("--out", type=Path, default=Path("sola-eval"),
                   help="output and resume directory (default ./sola-eval)")
    p.add_argument("--split", choices=("test", "dev"), default="test")
    p.add_argument("--view", choices=("full", "one_per_subject"), default="full")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated, from {','.join(METHODS)}")
    p.add_argument("--checkpoints", default="1,10,100,1000", help="values of T")
    p.add_argument("--threshold-keep", type=float, default=None, metavar="KEEP",
                   help="calibrate the sola method's threshold on the evaluated store: the "
                        "largest that keeps KEEP of the other split's prompts (and of its "
                        "locality prompts) unrouted; no reported record is read for it")
    p.add_argument("--prompt-form", choices=PROMPT_FORMS, default="raw",
                   help="measure prompts as written (raw, a completion) or each as a user "
                        "message in the model's chat template (chat, as /v1/chat/completions "
                        "runs it); edits train on the raw prompt, and on its chat form with "
                        "--chat-form")
    p.add_argument("--chat-form", action=argparse.BooleanOptionalAction, default=None,
                   help="train each edit on its prompt's chat form too (default: the "
                        "config's train.chat_form)")
    p.add_argument("--quick", action="store_true",
                   help=f"a CI-sized run: {QUICK['edits']} edits, T = 1, 3, 6")
    add_model(p)
    add_json(p)


def eval_command(args, command_config) -> dict:
    try:
        checkpoints = tuple(int(x) for x in args.checkpoints.split(","))
    except ValueError as e:
        raise ValueError(f"--checkpoints must be comma-separated ints: {args.checkpoints}") from e
    options = {"edits": args.edits, "checkpoints": checkpoints, **(QUICK if args.quick else {})}
    config = command_config(args)
    if args.chat_form is not None:
        config = dataclasses.replace(
            config, train=dataclasses.replace(config.train, chat_form=args.chat_form))
    cfg = EvalConfig(data=args.data, engine=args.engine, out=args.out, split=args.split,
                     view=args.view,
                     methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
                     model=args.model, config=config, threshold_keep=args.threshold_keep,
                     prompt_form=args.prompt_form, **options)
    progress = None if args.json else (lambda m: print(m, file=sys.stderr, flush=True))
    report = run(cfg, progress)
    report["meta"]["quick"] = bool(args.quick)
    report["meta"]["command"] = "sola-vllm " + shlex.join(sys.argv[1:])
    from .report import render_markdown, write_outputs

    files = write_outputs(report, cfg.out)
    return {"files": files, "report": report, "text": render_markdown(report)}
