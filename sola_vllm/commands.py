"""What each CLI command does; every handler returns a JSON-able dict (`text` for humans)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .config import EditConfig, SolaConfig
from .edit import EditFormatError
from .models import ModelFetchError
from .store import EditStore, StoreError

USER_ERRORS = (ValueError, KeyError, StoreError, ModelFetchError, EditFormatError, OSError)


# --- shared helpers -----------------------------------------------------------------------------
def load_config(path: Path | None) -> SolaConfig:
    if path is None:
        return SolaConfig()
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from exc
    return SolaConfig.from_dict(data)


def config_for_store(config: SolaConfig, store: EditStore | None) -> SolaConfig:
    """Serve a store with the layer set its edits were trained on."""
    edits = store.all() if store is not None and (store.path / "store.json").exists() else []
    if not edits:
        return config
    first = edits[0]
    edit = EditConfig(layers=tuple(first.layers), modules=tuple(first.modules),
                      rank=config.edit.rank, scale=config.edit.scale)
    return SolaConfig(edit=edit, router=config.router, train=config.train)


def open_engine(model: str | None, config: SolaConfig, store: EditStore | None = None,
                progress: bool = True):
    from .engine import RoutedEngine

    _say(progress, "loading the base model ...")
    engine = RoutedEngine.from_pretrained(model, config_for_store(config, store))
    if store is not None and (store.path / "store.json").exists():
        for problem in store.problems():
            _say(True, f"warning: {problem}")
        for edit in store.all():
            engine.add(edit)
    return engine


def _say(progress: bool, message: str) -> None:
    if progress:
        print(message, file=sys.stderr, flush=True)


def _existing_store(path: Path) -> EditStore:
    if not (Path(path) / "store.json").exists():
        raise StoreError(f"no edit store at {path} (train an edit into it first)")
    return EditStore(path)


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
    config = load_config(args.config)
    engine = open_engine(args.model, config, store, progress=not args.json)
    bar = tqdm(total=config.train.steps, desc="training edit", disable=args.json, leave=False)

    def on_step(step: int, loss: float) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{loss:.4f}")

    try:
        edit = engine.train(args.prompt, args.target, edit_id=args.id, author=args.author,
                            note=args.note, on_step=on_step)
    finally:
        bar.close()
    store.add(edit, author=args.author, note=args.note)
    if args.no_activate:
        store.revoke(edit.id, author=args.author, note="stored revoked (--no-activate)")
    summary = store.get(edit.id).summary()
    info = edit.train_info
    text = (f"trained edit {edit.id} in {info['seconds']} s ({info['steps']} steps, "
            f"loss {info['loss']:.4f}, fit={info['fit']}) -> {args.store}")
    return {"edit": summary, "text": text}


def edit_list(args) -> dict:
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


def _set_state(args, revoke: bool) -> dict:
    store = _existing_store(args.store)
    (store.revoke if revoke else store.restore)(args.id)
    state = store.get(args.id).state
    return {"id": args.id, "state": state, "text": f"edit {args.id} is now {state}"}


def edit_revoke(args) -> dict:
    return _set_state(args, revoke=True)


def edit_restore(args) -> dict:
    return _set_state(args, revoke=False)


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
    store = EditStore(args.store)
    if Path(args.path).is_dir():
        ids = store.import_store(args.path)
    else:
        ids = [store.import_edit(args.path, author=args.author, note=args.note).id]
    return {"imported": ids, "text": f"imported {len(ids)} edit(s): {', '.join(ids)}"}


# --- generation ---------------------------------------------------------------------------------
def generate(args) -> dict:
    store = _existing_store(args.store) if args.store is not None else None
    engine = open_engine(args.model, load_config(args.config), store, progress=not args.json)
    results = engine.generate(args.prompt, max_new_tokens=args.max_tokens)
    rows = [{"prompt": p, "text": g.text, "token_ids": g.token_ids, "edit": g.route.edit_id,
             "distance": g.route.distance} for p, g in zip(args.prompt, results, strict=True)]
    text = "\n".join(f"[{r['edit'] or 'base'}] {r['prompt']}{r['text']}" for r in rows)
    return {"results": rows, "text": text}


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
    engine = open_engine(args.model, load_config(args.config), store, progress=not args.json)
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
