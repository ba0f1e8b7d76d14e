"""What each CLI command does; every handler returns a JSON-able dict (`text` for humans)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from . import preflight
from .chat_form import prompt_forms, trained_prompts
from .config import EditConfig, SolaConfig
from .edit import EditFormatError
from .key_map import SHIPPED as SHIPPED_CONFIGS
from .models import ModelFetchError
from .preflight import KeyGroup
from .store import EditStore, StoreError

USER_ERRORS = (ValueError, KeyError, StoreError, ModelFetchError, EditFormatError, OSError)


# --- shared helpers -----------------------------------------------------------------------------
def load_config(path: Path | None) -> SolaConfig:
    """A config file, or a configuration shipped in `sola_vllm/maps/` named without suffix
    (e.g. `smollm2-135m-instruct-mean-l6`: mean-pooled keys and their fitted key map)."""
    if path is None:
        return SolaConfig()
    path = Path(path)
    shipped = SHIPPED_CONFIGS / f"{path}.json"
    if path.suffix == "" and path.parent == Path(".") and not path.exists() and shipped.exists():
        path = shipped
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from exc
    return SolaConfig.from_dict(data)


def command_config(args, store: EditStore | None = None, edit=None) -> SolaConfig:
    """`--config` when given; else the model's default for this store (`default_config`: the
    recommended configuration of the model, or the one the store's edits, or else `edit`,
    were read with)."""
    if args.config is not None:
        return load_config(args.config)
    from .default_config import default_config

    return default_config(args.model, store, edit).config


def config_for_store(config: SolaConfig, store: EditStore | None) -> SolaConfig:
    """Serve a store with the layer set its edits were trained on and their keys read as
    they were (from the artifact headers, without loading the tensors)."""
    summary = store.first_summary() if store is not None and store.exists() else None
    if summary is None:
        return config
    edit = EditConfig(layers=tuple(summary["layers"]), modules=tuple(summary["modules"]),
                      rank=config.edit.rank, scale=config.edit.scale,
                      key_pool=summary.get("key_pool", "last"),
                      route_layer=summary.get("route_layer"))
    return SolaConfig(edit=edit, router=config.router, train=config.train)


def open_engine(model: str | None, config: SolaConfig, store: EditStore | None = None,
                progress: bool = True):
    from .engine import RoutedEngine

    _say(progress, "loading the base model ...")
    engine = RoutedEngine.from_pretrained(model, config_for_store(config, store))
    if store is not None and store.exists():
        loaded = store.load()  # one pass: verified edits and problems
        for problem in loaded.problems:
            _say(True, f"warning: {problem}")
        for edit in loaded.edits:
            engine.add(edit)
    return engine


@contextlib.contextmanager
def stdout_to_stderr():
    """Point file descriptor 1 at stderr (child processes included) for the duration."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _existing_store(path: Path) -> EditStore:
    store = EditStore(path)
    if not store.exists():
        raise StoreError(f"no edit store at {path} (train an edit into it first)")
    return store


@contextlib.contextmanager
def audited(store_path: Path, action: str, edit_id: str | None, author: str = ""):
    """A record in the store's audit log (as the server writes) for a change made here."""
    import getpass

    from .serving.audit import AuditLog, audit_path, now

    record = {"time": now(), "client": f"local:{getpass.getuser()}@pid{os.getpid()}",
              "method": "CLI", "path": f"sola-vllm edit {action}", "authenticated": False,
              "auth": "local", "edit_id": edit_id, "author": author or None}
    try:
        yield
    except BaseException as exc:
        AuditLog(audit_path(store_path)).append({**record, "status": "failed",
                                                 "error": type(exc).__name__})
        raise
    AuditLog(audit_path(store_path)).append({**record, "status": "ok", "error": None})


def _edit_line(summary: dict) -> str:
    return (f"{summary['id']:<28} {summary['state']:<8} "
            f"{summary['prompts'][0]!r} -> {summary['target']!r}")


# --- model --------------------------------------------------------------------------------------
def model_fetch(args) -> dict:
    from .models import fetch_default_model, verify_model_dir

    path = fetch_default_model(progress=not args.json, force=args.force)
    if args.verify:
        verify_model_dir(path)
    return {"path": str(path), "verified": bool(args.verify), "text": str(path)}


# --- edits --------------------------------------------------------------------------------------
def edit_train(args) -> dict:
    from tqdm import tqdm

    store = EditStore(args.store)
    config = command_config(args, store)
    state = _initial_state(args)
    probes = _probes(args)  # a bad probe file fails before the model loads
    engine = open_engine(args.model, config, store, progress=not args.json)
    # the keys training stores are these same key queries: check before spending the training
    prompts = trained_prompts(engine.tokenizer, args.prompt, engine.config.train.chat_form)
    new = KeyGroup(args.id or "new edit", state, engine.key_queries(prompts), prompts,
                   prompt_forms(args.prompt, prompts))
    check = _refuse_collisions(preflight.check_with_engine(engine, new, probes), args.force)
    bar = tqdm(total=config.train.steps, desc="training edit", disable=args.json, leave=False)

    def on_step(step: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}")

    try:
        edit = engine.train(args.prompt, args.target, edit_id=args.id, author=args.author,
                            note=args.note, on_step=on_step)
    finally:
        bar.close()
    with audited(store.path, "train", edit.id, args.author):
        store.add(edit, author=args.author, note=args.note, state=state)
        if args.no_activate:
            store.revoke(edit.id, author=args.author, note="stored revoked (--no-activate)")
    summary = store.get(edit.id).summary()
    info = edit.train_info
    text = (f"trained edit {edit.id} in {info['seconds']} s ({info['steps']} steps, "
            f"loss {info['loss']:.4f}, fit={info['fit']}) -> {args.store} ({summary['state']})")
    return {"edit": summary, "check": {**check, "edit": edit.id},
            "text": "\n".join([text, *_check_lines(check, header=False)])}


def edit_list(args) -> dict:
    if getattr(args, "server", None):
        return _remote_list(args.server, args.admin_token)
    store = _existing_store(args.store)
    edits = store.list()
    problems = store.problems()
    lines = [_edit_line(s) for s in edits] or ["(no edits)"]
    lines += [f"problem: {p}" for p in problems]
    return {"edits": edits, "problems": problems, "text": "\n".join(lines)}


def edit_show(args) -> dict:
    store = _existing_store(args.store)
    summary = store.get(args.id).summary()
    history = store.history(args.id)
    return {"edit": summary, "history": history,
            "text": json.dumps({**summary, "history": history}, indent=2, default=str)}


def edit_transition(args) -> dict:
    """`edit stage|canary|promote|revoke|restore ID`: one lifecycle step, journaled."""
    op = args.action
    if getattr(args, "server", None):
        return _remote_transition(args, op)
    store = _existing_store(args.store)
    with audited(store.path, op, args.id, args.author):
        state = store.transition(args.id, op, author=args.author, note=args.note)
    return {"id": args.id, "state": state, "text": f"edit {args.id} is now {state}"}


def edit_export(args) -> dict:
    store = _existing_store(args.store)
    if args.id is None:
        if args.peft:
            raise ValueError("--peft exports one edit: give its id")
        out = store.export_store(args.out)
        return {"path": str(out), "text": f"exported the store to {out}"}
    if args.peft:
        from .peft_export import export_peft

        out = export_peft(store.get(args.id), args.out)
        return {"path": str(out), "text": f"exported edit {args.id} as a PEFT adapter to {out}"}
    out = store.export_edit(args.id, args.out)
    return {"path": str(out), "text": f"exported edit {args.id} to {out}"}


def edit_import(args) -> dict:
    """An exported store keeps its states (no pre-flight: its edits were checked when they were
    added); one artifact is checked against the store's routed edits first."""
    store = EditStore(args.store)
    with audited(store.path, "import", None, args.author):
        if Path(args.path).is_dir():
            ids = store.import_store(args.path)
            return {"imported": ids, "text": f"imported {len(ids)} edit(s): {', '.join(ids)}"}
        state = _initial_state(args)
        edit = _read_artifact(args.path)
        check = _refuse_collisions(_offline_check(args, store, edit, state), args.force)
        store.import_edit(args.path, author=args.author, note=args.note, state=state)
    return {"imported": [edit.id], "check": check,
            "text": "\n".join([f"imported edit {edit.id} ({state})",
                               *_check_lines(check, header=False)])}


def edit_check(args) -> dict:
    """The pre-flight check of a new edit (an artifact, or prompts) without adding it: against
    a store with the reference engine, and/or against a running server."""
    if not (args.store or args.server):
        raise ValueError("give --store DIR and/or --server URL to check against")
    if bool(args.file) == bool(args.prompt):
        raise ValueError("give exactly one of --file ARTIFACT or --prompt TEXT (repeatable)")
    edit = _read_artifact(args.file) if args.file else None
    result: dict = {}
    if args.store:
        result["store"] = _offline_check(args, _existing_store(args.store), edit, "active",
                                         prompts=args.prompt)
    if args.server:
        from .serving import client

        prompts = edit.prompts if edit is not None else args.prompt
        result["server"] = client.check(args.server, prompts, _probes(args),
                                        edit.id if edit is not None else args.id,
                                        token=args.admin_token)
    lines = []
    for where, check in result.items():
        lines += [f"{where}:", *_check_lines(check)]
    passed = all(check["ok"] for check in result.values())
    return {**result, "passed": passed, "exit_status": 0 if passed else 1,
            "text": "\n".join(lines)}


# --- the pre-flight check -------------------------------------------------------------------------
def _initial_state(args) -> str:
    state = getattr(args, "state", None) or "active"
    if getattr(args, "no_activate", False) and state != "active":
        raise ValueError("--no-activate stores the edit revoked: it does not go with --state")
    return state


def _probes(args) -> list[str] | None:
    return preflight.load_probe_prompts(args.probes) if getattr(args, "probes", None) else None


def _read_artifact(path: Path):
    from .edit import Edit

    try:
        return Edit.from_bytes(Path(path).read_bytes())
    except EditFormatError as exc:
        raise ValueError(f"{path} is not a valid edit artifact: {exc}") from exc


def _offline_check(args, store: EditStore, edit, state: str,
                   prompts: list[str] | None = None) -> dict:
    """With the reference engine when its key queries are needed (probes, or prompts without
    an artifact); else from the stored keys alone, without loading the model."""
    probes = _probes(args)
    if probes or edit is None:
        engine = open_engine(args.model, command_config(args, store, edit), store,
                             progress=not args.json)
        if edit is None:  # keyed as training would key them
            trained = trained_prompts(engine.tokenizer, prompts, engine.config.train.chat_form)
            new = KeyGroup(args.id or "new edit", state, engine.key_queries(trained), trained,
                           prompt_forms(prompts, trained))
        else:
            new = KeyGroup.of_edit(edit, state)
        return preflight.check_with_engine(engine, new, probes)
    router = command_config(args, store, edit).router
    routed = [KeyGroup.of_edit(e, e.state) for e in (store.load().edits if store.exists() else [])
              if e.state in ("active", "canary")]
    return preflight.check(KeyGroup.of_edit(edit, state), routed, router.thresholds,
                           router.metric, key_map=router.load_key_map())


def _thresholds_text(thresholds: dict[str, float]) -> str:
    """"threshold 0.037", or with chat keys at their own: "threshold 0.037, chat keys 0.0069"."""
    text = f"threshold {thresholds['raw']:.4g}"
    if thresholds["chat"] != thresholds["raw"]:
        text += f", chat keys {thresholds['chat']:.4g}"
    return text


def _refuse_collisions(check: dict, force: bool) -> dict:
    if check["collisions"] and not force:
        raise ValueError(preflight.collision_message(check))
    return check


def _check_lines(check: dict, header: bool = True) -> list[str]:
    lines = [f"edit {check['edit']}: {'ok' if check['ok'] else 'COLLIDES'} "
             f"({check['metric']} {_thresholds_text(check['thresholds'])})"] if header else []
    lines += [f"  collides with {c['edit']} ({c['state']}) at distance {c['distance']:.4g}: "
              f"{c['prompt']!r} ~ {c['other_prompt']!r}" for c in check["collisions"]]
    if check["probes"] is not None:
        taken = check["routes_to_new"]
        lines.append(f"  {len(taken)} of {len(check['probes'])} probe(s) route to it")
        lines += [f"    {p['distance_to_new']:.4g} {p['prompt']!r}" for p in check["probes"]
                  if p["route"] == check["edit"]]
    return lines


# --- a running server (`sola-vllm serve`) ---------------------------------------------------------
def edit_push(args) -> dict:
    from .serving import client

    sources = [name for name, given in (("--file", args.file), ("--store", args.store),
                                        ("--prompt", args.prompt)) if given]
    if len(sources) != 1:
        raise ValueError("give exactly one of --file ARTIFACT, --store DIR --id ID, or "
                         f"--prompt TEXT --target TEXT (got {sources or 'none'})")
    if args.prompt:
        if not args.target:
            raise ValueError("--prompt needs --target (the answer the model should give)")
        reply = client.push_training(args.server, args.prompt, args.target, args.id,
                                     args.author, args.note, token=args.admin_token,
                                     **_push_options(args))
    else:
        if args.target:
            raise ValueError("--target goes with --prompt")
        if args.store and not args.id:
            raise ValueError("--store needs --id: the edit to push")
        blob = (Path(args.file).read_bytes() if args.file
                else _existing_store(args.store).get(args.id).to_bytes())
        options = _push_options(args)
        probes = options.pop("probes")
        reply = client.push_artifact(args.server, blob, args.author, args.note, **options,
                                     token=args.admin_token)
        if probes:  # an artifact's body carries no probes: the check route routes them
            from .edit import Edit

            edit = Edit.from_bytes(blob)
            probed = client.check(args.server, edit.prompts, probes, edit.id,
                                  token=args.admin_token)
            reply["check"] = {**reply["check"], "probes": probed["probes"],
                              "routes_to_new": probed["routes_to_new"]}
    edit = reply["edit"]
    lines = [f"pushed edit {edit['id']} to {args.server}: {_edit_line(edit)}"]
    if reply.get("check"):
        lines += _check_lines(reply["check"], header=False)
    return {**reply, "text": "\n".join(lines)}


def _push_options(args) -> dict:
    return {"state": args.state or "active", "force": args.force, "probes": _probes(args)}


def _remote_transition(args, op: str) -> dict:
    from .serving import client

    reply = client.transition(args.server, args.id, op, args.author, args.note,
                              token=args.admin_token)
    state = reply["edit"]["state"]
    return {**reply, "id": args.id, "state": state,
            "text": f"edit {args.id} is now {state} on {args.server}"}


def _remote_list(server: str, token: str | None) -> dict:
    from .serving import client

    reply = client.list_edits(server, token=token)
    lines = [_edit_line(s) if "problem" not in s else f"{s['id']}: {s['problem']}"
             for s in reply["edits"]] or ["(no edits)"]
    lines += [f"problem: {p}" for p in reply["problems"]]
    return {**reply, "text": "\n".join(lines)}


def audit(args) -> dict:
    """The last audit records, from a server or read straight from the store's audit log."""
    from .serving.audit import AuditLog, audit_path

    if args.server:
        from .serving import client

        reply = client.audit(args.server, args.limit, token=args.admin_token)
    else:
        path = args.audit_log or audit_path(args.store)
        reply = AuditLog(path).tail(args.limit)
    lines = [" ".join(f"{r.get(k)}" for k in ("time", "client", "auth", "method", "path",
                                               "status", "author")) for r in reply["records"]]
    return {**reply, "text": "\n".join(lines) or f"(no audit records in {reply['path']})"}


def serve(args) -> dict:
    from .serving.serve import serve as exec_server

    return exec_server(args, args.vllm_args)


# --- generation ---------------------------------------------------------------------------------
def generate(args) -> dict:
    store = _existing_store(args.store) if args.store is not None else None
    config = command_config(args, store)
    if args.engine == "vllm":
        if args.canary:
            raise ValueError("--canary works with --engine reference (on a server, send "
                             '"vllm_xargs": {"sola_canary": true} with the request)')
        rows = _generate_vllm(args, config, store)
    else:
        engine = open_engine(args.model, config, store, progress=not args.json)
        results = engine.generate(args.prompt, max_new_tokens=args.max_tokens,
                                  canary=args.canary)
        rows = [{"prompt": p, "text": g.text, "token_ids": g.token_ids,
                 "edit": g.route.edit_id, "distance": g.route.distance}
                for p, g in zip(args.prompt, results, strict=True)]
    text = "\n".join(f"[{r.get('edit') or 'base'}] {r['prompt']}{r['text']}" for r in rows)
    return {"results": rows, "engine": args.engine, "text": text}


def _generate_vllm(args, config: SolaConfig, store: EditStore | None) -> list[dict]:
    """Greedy generation inside vLLM with the plugin and the store's edits (hot-added)."""
    import torch

    from .serving.llm import SolaLLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    on_cpu = not torch.cuda.is_available()
    with stdout_to_stderr():  # vLLM and its engine processes log to stdout
        llm = SolaLLM(args.model, config_for_store(config, store), enforce_eager=on_cpu,
                      max_model_len=2048, **({"gpu_memory_utilization": 0.5} if on_cpu else {}))
        if store is not None:
            for edit in store.all():
                llm.add_edit(edit, active=edit.state == "active")
        try:
            completions = llm.generate(args.prompt, max_tokens=args.max_tokens)
        finally:
            llm.close()
    return [{"prompt": p, "text": c.text, "token_ids": c.token_ids}
            for p, c in zip(args.prompt, completions, strict=True)]


def calibrate(args) -> dict:
    """Distance distributions and a suggested routing threshold for a store and probe set."""
    from .eval import calibrate as cal

    cal.check_keep(args.keep)
    store = _existing_store(args.store)
    active = [s["id"] for s in store.list() if s["state"] == "active" and "problem" not in s]
    probes = cal.load_probes(args.probes, active)  # checked before the model loads
    engine = open_engine(args.model, command_config(args, store), store, progress=not args.json)
    report = {"store": str(args.store), "probes_file": str(args.probes),
              **cal.calibrate(engine, probes, keep=args.keep)}
    if args.out is not None:
        cal.write_outputs(report, args.out)
    return {**report, "text": cal.format_text(report)}


def evaluate(args) -> dict:
    """Edit quality on benchmark data (see `sola_vllm.eval.harness`)."""
    from .eval.command import eval_command

    return eval_command(args, command_config)


def fit_metric(args) -> dict:
    """Fit a key map for the model and its configured keys, and calibrate its threshold."""
    from .eval.fit_map import fit_metric_command

    result = fit_metric_command(args, open_engine, command_config)
    lines = [f"key map written to {result['out']} ({result['key_pool']}-pooled keys entering "
             f"layer {result['route_layer']}, {result['dim']} dimensions, "
             f"fitted on {result['fit']['pairs']} pairs)"]
    for cal in result.get("calibration", []):
        fitted = ", optimistic: its pairs fitted the map" if cal["fitted_on"] else ""
        lines.append(f"threshold {cal['threshold']:.4g} on {cal['data']} dev (its own "
                     f"{cal['own_threshold']:.4g}{fitted}): paraphrase hit "
                     f"{cal['paraphrase_hit']:.3f}, "
                     f"hard negatives routed {cal['hard_negative_routed']:.3f}, unrelated "
                     f"routed {cal['unrelated_routed']:.3f}"
                     + ("" if cal.get("other_relation_routed") is None else
                        f", same-subject other-relation routed "
                        f"{cal['other_relation_routed']:.3f}")
                     + f" ({cal['keys']} keys)")
    return {**result, "text": "\n".join(lines)}


def demo(args) -> dict:
    """Train an edit on the default model, show the edited answer, revoke it, show the original."""
    tmp = None
    if args.store is None:
        tmp = tempfile.TemporaryDirectory(prefix="sola-demo-")
        args.store = Path(tmp.name) / "store"
    try:
        return _demo(args)
    finally:
        if tmp is not None:
            tmp.cleanup()


def _demo(args) -> dict:
    say = (lambda m: None) if args.json else (lambda m: print(m, flush=True))
    store = EditStore(args.store)
    engine = open_engine(args.model, command_config(args, store), store, progress=not args.json)
    prompts = [args.prompt, "The Eiffel Tower is located in the city of"]

    def answer(stage: str) -> dict:
        gens = engine.generate(prompts, max_new_tokens=args.max_tokens)
        for p, g in zip(prompts, gens, strict=True):
            say(f"  [{g.route.edit_id or 'base model'}] {p!r} -> {g.text!r}")
        return {"stage": stage, "answers": [g.text for g in gens],
                "edits": [g.route.edit_id for g in gens]}

    say("1. the base model answers:")
    stages = [answer("base")]
    say(f"2. training an edit: {args.prompt!r} -> {args.target!r} ...")
    edit = engine.train([args.prompt], args.target)
    store.add(edit, note="sola-vllm demo")
    engine.add(edit)
    say(f"   done in {edit.train_info['seconds']} s; stored as {edit.id} in {args.store}")
    say("3. with the edit active (the unrelated prompt stays on the base model):")
    stages.append(answer("edited"))
    store.revoke(edit.id, note="sola-vllm demo")
    engine.revoke(edit.id)
    say(f"4. after revoking {edit.id}, the original answer is back:")
    stages.append(answer("revoked"))
    restored = stages[2]["answers"] == stages[0]["answers"]
    say(f"   revoked answers identical to the base model's: {restored}")
    return {"edit": edit.id, "stages": stages, "revoked_equals_base": restored, "text": ""}
