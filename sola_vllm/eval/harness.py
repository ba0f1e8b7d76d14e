"""The evaluation harness (GRACE / WISE conventions, SoLA arXiv 2603.11239): train each edit of a
benchmark stream, then measure reliability, generality, locality and routing at T = 1, 10, 100,
1000 resident edits, and rollback after revoking a random half. See `report.DEFINITIONS`.

Resumable: trained edits live in one edit store per method under `out/edits/`, and every engine
output in `out/outcomes.jsonl`; a re-run trains and generates only what is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..chat_form import trained_prompts
from ..config import SolaConfig
from ..train_many import EditRequest
from ..train_many import train_edits as train_many
from .data import EditCase, load, one_per_subject
from .methods import METHODS, Method, build_methods, router_summary
from .outcomes import Outcomes
from .prompt_forms import PROMPT_FORMS, in_form

ENGINES = ("reference", "vllm")
JOINT_BATCH, JOINT_LR, JOINT_MIN_STEPS = 16, 5e-3, 60  # lora-all: tuned to fit 3 pairs
TRAIN_CHUNK = 16  # edits trained per pass (sola_vllm.train_many)
HARD_PROBES = 500  # later edits' prompts probed for hard false fires at each checkpoint
VIEWS = ("full", "one_per_subject")
CALIBRATED_METHOD = "sola"  # --threshold-keep sets its threshold; sola-paper keeps the paper's


@dataclass(slots=True)
class EvalConfig:
    data: Path
    edits: int = 1000
    engine: str = "reference"
    out: Path = Path("sola-eval")
    split: str = "test"
    view: str = "full"
    methods: tuple[str, ...] = METHODS
    checkpoints: tuple[int, ...] = (1, 10, 100, 1000)
    model: str | None = None
    config: SolaConfig = field(default_factory=SolaConfig)
    loc_tokens: int = 12  # greedy tokens compared for locality
    joint_epochs: int = 8  # lora-all
    seed: int = 0  # which half is revoked in the rollback test
    threshold_keep: float | None = None  # sola's threshold from the store (store_threshold)
    prompt_form: str = "raw"  # what is measured: raw prompts or chat messages (prompt_forms)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine {self.engine!r} is not one of {ENGINES}")
        if self.view not in VIEWS:
            raise ValueError(f"view {self.view!r} is not one of {VIEWS}")
        if not isinstance(self.edits, int) or self.edits < 1:
            raise ValueError(f"edits must be a positive int, got {self.edits!r}")
        if not self.checkpoints or min(self.checkpoints) < 1:
            raise ValueError(f"checkpoints must be positive ints, got {self.checkpoints!r}")
        build_methods(list(self.methods), self.config)  # validates the names
        if self.threshold_keep is not None and not 0.0 < self.threshold_keep <= 1.0:
            raise ValueError(f"--threshold-keep must be in (0, 1], got {self.threshold_keep!r}")
        if self.prompt_form not in PROMPT_FORMS:
            raise ValueError(f"prompt form {self.prompt_form!r} is not one of {PROMPT_FORMS}")


def edit_stream(cfg: EvalConfig):
    data = load(cfg.data)
    stream = data.stream(cfg.split)
    if cfg.view == "one_per_subject":
        stream = one_per_subject(stream)
    return data, stream[:cfg.edits]


def checkpoints_for(cfg: EvalConfig, n: int) -> list[int]:
    return sorted({t for t in cfg.checkpoints if t < n} | {n})


def run(cfg: EvalConfig, progress=None) -> dict:
    """Evaluate every method of `cfg`; returns the report (see `report.py` for its schema)."""
    started = time.perf_counter()
    data, stream = edit_stream(cfg)
    checkpoints = checkpoints_for(cfg, len(stream))
    outcomes = Outcomes(cfg.out / "outcomes.jsonl")
    results = []
    try:
        for method in build_methods(list(cfg.methods), cfg.config):
            if cfg.threshold_keep is not None and method.name == CALIBRATED_METHOD:
                method = calibrated(cfg, method, data, stream, progress)
            say(progress, f"method {method.name}: {method.description}")
            if cfg.engine == "vllm":
                from .vllm_engine import evaluate_method_vllm

                results.append(evaluate_method_vllm(cfg, method, stream, checkpoints, progress))
            else:
                results.append(evaluate_method(cfg, method, stream, checkpoints, outcomes,
                                               progress))
    finally:
        outcomes.close()
    from .data import conflict_ceiling

    meta = {
        "data": data.name, "data_path": str(cfg.data), "split": cfg.split, "view": cfg.view,
        "prompt_form": cfg.prompt_form, "engine": cfg.engine,
        "model": str(cfg.model or "SmolLM2-135M-Instruct (default)"),
        "model_fingerprint": _model_fingerprint(cfg.model), "edits": len(stream),
        "checkpoints": checkpoints, "quick": False, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "seconds": round(time.perf_counter() - started, 1), "versions": _versions(),
        "command": "", "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "conflict_ceiling": round(conflict_ceiling(evaluated(cfg, stream)), 4),
        "skipped_records": list(data.skipped), "route_mismatches": outcomes.route_mismatches,
        "config": cfg.config.to_dict(),
    }
    return {"meta": meta, "methods": results}


def calibrated(cfg: EvalConfig, method: Method, data, stream: list[EditCase],
               progress) -> Method:
    """`method` with its threshold calibrated on its own store of `stream`
    (`store_threshold`: the other split's prompts, `cfg.threshold_keep` of them unrouted); its
    edits are trained first where missing."""
    from ..engine import RoutedEngine
    from .store_threshold import store_threshold

    engine = RoutedEngine.from_pretrained(cfg.model, method.config)
    try:
        engine.add_all(train_edits(engine, method, stream, edits_dir(cfg, method), progress))
        found = store_threshold(engine, data, stream, cfg.split, cfg.threshold_keep)
    finally:
        del engine
    say(progress, f"  threshold {found['threshold']:.4g}, calibrated on the store's "
                  f"{found['keys']} {cfg.split} keys against {found['negatives']} "
                  f"{found['split']} negatives (keep {cfg.threshold_keep})")
    config = method.config
    router = dataclasses.replace(config.router, threshold=found["threshold"])
    (rebuilt,) = build_methods([method.name], SolaConfig(edit=config.edit, router=router,
                                                         train=config.train))
    return dataclasses.replace(rebuilt, calibration=found)


def say(progress, message: str) -> None:
    if progress is not None:
        progress(message)


def evaluated(cfg: EvalConfig, cases: list[EditCase]) -> list[EditCase]:
    """The cases metrics are averaged over: the reporting split's records among `cases`."""
    return [c for c in cases if c.split == cfg.split]


# --- one method on the reference engine ---------------------------------------------------------
def evaluate_method(cfg: EvalConfig, method: Method, stream: list[EditCase],
                    checkpoints: list[int], outcomes: Outcomes, progress) -> dict:
    from ..engine import RoutedEngine

    engine = RoutedEngine.from_pretrained(cfg.model, method.config)
    probe = Probe(engine, outcomes, cfg.loc_tokens)
    rows, rollback, distances = [], None, None
    if method.kind == "routed":
        engine.add_all(train_edits(engine, method, stream, edits_dir(cfg, method), progress))
    trained, stream = stream, in_form(stream, engine.tokenizer, cfg.prompt_form)
    for t in checkpoints:
        cases = evaluated(cfg, stream[:t])
        if method.kind == "routed":
            engine.set_active([c.id for c in stream[:t]])
        elif method.kind == "joint":
            joint_lora(engine, cfg, method, trained[:t], t, progress)
        # outputs are cached per trained recipe (and per joint LoRA), never across recipes
        variant = edits_dir(cfg, method).name
        if method.kind == "joint":
            variant += "/" + next(iter(engine.edits))
        say(progress, f"  T={t}: {len(cases)} cases")
        with route_all(engine, method.kind == "joint"):
            row, dist = probe.checkpoint(variant, cases, routed=method.kind != "base")
        if method.kind == "routed":
            edited = {c.subject.lower() for c in stream[:t]}  # siblings ask the same fact
            later = [c for c in stream[t:] if c.subject.lower() not in edited][:HARD_PROBES]
            row["routing"]["hard_false_fire"] = probe.hard_false_fire(later)
        if method.kind == "joint":  # it routes nothing: every prompt gets its LoRA
            row["routing"] = None
        rows.append({"T": t, **row})
        distances = dist
    if method.kind == "routed":
        rollback = probe.rollback(edits_dir(cfg, method).name, stream, evaluated(cfg, stream),
                                  cfg.seed)
    return {"name": method.name, "description": method.description,
            "router": router_summary(method),
            "checkpoints": rows, "rollback": rollback,
            "distances": distances if method.kind == "routed" else None}


def edits_dir(cfg: EvalConfig, method: Method) -> Path:
    """Where a method's trained edits are kept: one store per training recipe (edit shape and
    training options), so a re-run with other options never reuses edits trained otherwise.
    Router options are not part of it: they change routing, not what was trained; how keys are
    read is (keys are stored with the edits)."""
    from ..config import fingerprint

    recipe = {k: v for k, v in method.config.to_dict().items() if k != "router"}
    edit = recipe["edit"]
    if edit["key_pool"] == "last" and edit["route_layer"] is None:  # the paper's keys: the
        del edit["key_pool"], edit["route_layer"]  # recipe of runs made before pooled keys
    if not recipe["train"]["chat_form"]:  # likewise for runs made before chat forms
        del recipe["train"]["chat_form"]
    return cfg.out / "edits" / f"{method.name}-{fingerprint(recipe)[:10]}"


def train_edits(engine, method: Method, stream: list[EditCase], path: Path, progress) -> list:
    """Each case's edit, trained once on `engine` and kept in an edit store (resumable)."""
    from ..store import EditStore

    store = EditStore(path) if EditStore(path).exists() else EditStore.create(path)
    have = {e["id"] for e in store.list()}
    todo = [c for c in stream if c.id not in have]
    bar = _bar(progress, len(todo), f"training {method.name}")
    for start in range(0, len(todo), TRAIN_CHUNK):  # independent LoRAs, trained side by side
        chunk = [EditRequest(c.id, (c.prompt,), c.target, f"eval {method.name}")
                 for c in todo[start:start + TRAIN_CHUNK]]
        for edit in train_many(engine, chunk, method.config.train, chunk=TRAIN_CHUNK):
            store.add(edit)
        bar.update(len(chunk))
    bar.close()
    by_id = {e.id: e for e in store.all()}
    return [by_id[c.id] for c in stream]


def joint_lora(engine, cfg: EvalConfig, method: Method, cases: list[EditCase], t: int,
               progress) -> None:
    """Install the lora-all baseline fine-tuned on `cases` as the engine's only edit: at least
    `JOINT_MIN_STEPS` optimizer steps, and `cfg.joint_epochs` epochs over many edits. Kept in
    the method's store, so a re-run reuses it."""
    from ..store import EditStore
    from .baselines import train_joint_lora

    for old in list(engine.edits):
        engine.remove(old)
    path, edit_id = edits_dir(cfg, method), f"lora-all-{t}-e{cfg.joint_epochs}-s{cfg.seed}"
    store = EditStore(path) if EditStore(path).exists() else EditStore.create(path)
    if edit_id in {e["id"] for e in store.list()}:
        engine.add(store.get(edit_id))
        return
    steps_per_epoch = -(-len(cases) // JOINT_BATCH)
    epochs = max(cfg.joint_epochs, -(-JOINT_MIN_STEPS // steps_per_epoch))
    say(progress, f"  fine-tuning one LoRA on {len(cases)} edits ({epochs} epochs)")
    chat_form = method.config.train.chat_form  # the chat forms too, as each edit trains
    pairs = [(p, c.target) for c in cases
             for p in trained_prompts(engine.tokenizer, [c.prompt], chat_form)]
    edit = train_joint_lora(engine, pairs, epochs=epochs,
                            batch_size=JOINT_BATCH, lr=JOINT_LR, seed=cfg.seed, edit_id=edit_id)
    store.add(edit)
    engine.add(edit)


@contextlib.contextmanager
def route_all(engine, enabled: bool):
    """For the lora-all baseline: every prompt routes to its one LoRA."""
    if not enabled:
        yield
        return
    from .baselines import route_everything

    with route_everything(engine):
        yield


class Probe:
    """Routes, generates and scores the prompts of a set of cases on one engine."""

    def __init__(self, engine, outcomes: Outcomes, loc_tokens: int):
        self.engine, self.outcomes, self.loc_tokens = engine, outcomes, loc_tokens
        self._queries: dict[str, torch.Tensor] = {}

    def routes(self, prompts: list[str], routed: bool) -> dict[str, tuple[str | None, float]]:
        """prompt -> (the edit it routes to or None, distance to its nearest key)."""
        unique = list(dict.fromkeys(prompts))
        if not routed:
            return {p: (None, float("inf")) for p in unique}
        missing = [p for p in unique if p not in self._queries]
        if missing:
            for p, q in zip(missing, self.engine.key_queries(missing, 64), strict=True):
                self._queries[p] = q
        queries = torch.stack([self._queries[p] for p in unique])
        nearest = self.engine.nearest(queries=queries)
        thresholds = self.engine.router.thresholds
        return {p: (r.under(thresholds), r.distance) for p, r in zip(unique, nearest, strict=True)}

    def answers(self, variant: str, pairs: list[tuple[str, str]], routes) -> list[dict]:
        """(prompt, target) -> {"tf": token accuracy, "em": greedy exact match}."""
        from ..train import target_ids

        engine = self.engine
        prompts = [p for p, _ in pairs]
        targets = [target_ids(engine, p, t, append_eos=False) for p, t in pairs]
        r = [routes[p][0] for p in prompts]
        forced = self.outcomes.forced(engine, variant, prompts, targets, r)
        greedy = self.outcomes.greedy(engine, variant, prompts, [len(t) for t in targets], r)
        return [{"tf": sum(a == b for a, b in zip(f, t, strict=True)) / len(t),
                 "em": float(g[:len(t)] == t)}
                for f, g, t in zip(forced, greedy, targets, strict=True)]

    def unchanged(self, variant: str, prompts: list[str], routes) -> list[float]:
        """1.0 where the greedy output equals the base model's, token for token."""
        n = [self.loc_tokens] * len(prompts)
        routed = [routes[p][0] for p in prompts]
        got = self.outcomes.greedy(self.engine, variant, prompts, n, routed)
        base = self.outcomes.greedy(self.engine, variant, prompts, n, [None] * len(prompts))
        return [float(a == b) for a, b in zip(got, base, strict=True)]

    def checkpoint(self, variant: str, cases: list[EditCase], routed: bool):
        rel = [(c.prompt, c.target) for c in cases]
        gen = [(p, c.target) for c in cases for p in c.paraphrases]
        loc = [p for c in cases for p in c.locality]
        routes = self.routes([p for p, _ in rel + gen] + loc, routed)
        rel_s, gen_s = self.answers(variant, rel, routes), self.answers(variant, gen, routes)
        loc_s = self.unchanged(variant, loc, routes)
        row = {"n_eval": len(cases),
               "reliability_tf": _mean(s["tf"] for s in rel_s),
               "reliability_em": _mean(s["em"] for s in rel_s),
               "generality_tf": _mean(s["tf"] for s in gen_s),
               "generality_em": _mean(s["em"] for s in gen_s),
               "locality": _mean(loc_s), "routing": None}
        if not routed:
            return row, None
        owner = {p: c.id for c in cases for p in (c.prompt, *c.paraphrases)}
        row["routing"] = {
            "prompt_hit": _mean(routes[p][0] == owner[p] for p, _ in rel),
            "paraphrase_hit": _mean(routes[p][0] == owner[p] for p, _ in gen),
            "false_fire": _mean(routes[p][0] is not None for p in loc)}
        distances = {"hit": [routes[p][1] for p, _ in rel],
                     "paraphrase": [routes[p][1] for p, _ in gen],
                     "negative": [routes[p][1] for p in loc]}
        return row, distances

    def hard_false_fire(self, later: list[EditCase]) -> float | None:
        """Share of not-yet-edited prompts (same style, other subjects) routed to an edit."""
        routes = self.routes([c.prompt for c in later], True) if later else {}
        return _mean(r[0] is not None for r in routes.values())

    def rollback(self, variant: str, stream: list[EditCase], cases: list[EditCase],
                 seed: int) -> dict:
        """Revoke a random half of the stream's edits; revoked prompts must give the base
        model's exact output, kept edits must still work, locality must not move."""
        engine = self.engine
        before_rows, _ = self.checkpoint(variant, cases, routed=True)
        routes_before = self.routes([c.prompt for c in cases], True)
        revoked = set(random.Random(seed).sample([c.id for c in stream], len(stream) // 2))
        engine.set_states(dict.fromkeys(revoked, "revoked"))
        try:
            gone = [c for c in cases if c.id in revoked]
            kept = [c for c in cases if c.id not in revoked]
            routes = self.routes([c.prompt for c in cases] + [p for c in cases for p in c.locality],
                                 True)
            exact = self.unchanged(variant, [c.prompt for c in gone], routes)
            where = revoked_routes(gone, {c.id: c for c in stream}, revoked, routes)
            kept_s = self.answers(variant, [(c.prompt, c.target) for c in kept], routes)
            kept_before = self.answers(variant, [(c.prompt, c.target) for c in kept],
                                       routes_before)
            loc = self.unchanged(variant, [p for c in cases for p in c.locality], routes)
        finally:
            engine.set_states(dict.fromkeys(revoked, "active"))
        return {"T": len(stream), "revoked": len(revoked), "revoked_evaluated": len(gone),
                "revoked_exact": _mean(exact),
                "revoked_exact_unshadowed": _mean(e for e, w in zip(exact, where, strict=True)
                                                  if w != "kept_sibling"),
                "revoked_routes": {w: _mean(x == w for x in where) for w in REVOKED_ROUTES},
                "kept": len(kept),
                "kept_reliability_em": _mean(s["em"] for s in kept_s),
                "kept_reliability_em_before": _mean(s["em"] for s in kept_before),
                "locality": _mean(loc), "locality_before": before_rows["locality"]}


REVOKED_ROUTES = ("none", "revoked", "kept_sibling", "kept_other")


def revoked_routes(gone: list[EditCase], by_id: dict[str, EditCase], revoked: set[str],
                   routes) -> list[str]:
    """Where each revoked edit's prompt routes once revoked: to no edit, to a revoked edit (a
    rollback bug), to a kept edit of the same subject and relation (a sibling: in zsRE, another
    record of the same subject and question, with its own answer, which rightly answers the
    prompt; zsRE names no relation, so there the subject decides), or to another kept edit."""
    where = []
    for case in gone:
        target = routes[case.prompt][0]
        if target is None:
            where.append("none")
        elif target == case.id or target in revoked:
            where.append("revoked")
        elif (by_id[target].subject, by_id[target].relation) == (case.subject, case.relation):
            where.append("kept_sibling")
        else:
            where.append("kept_other")
    return where


def _bar(progress, total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=progress is None or total == 0, leave=False,
                file=sys.stderr)


def _mean(values) -> float | None:
    values = [float(v) for v in values]
    return round(sum(values) / len(values), 6) if values else None


def _model_fingerprint(model) -> str:
    from ..models import model_fingerprint, resolve_model

    return model_fingerprint(resolve_model(model))


def _versions() -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def replace(cfg: EvalConfig, **changes) -> EvalConfig:
    return dataclasses.replace(cfg, **changes)
