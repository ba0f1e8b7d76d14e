"""`sola-vllm fit-metric`: fit a key map (`key_map.KeyMap`) for a model and its keys, and
calibrate the routing threshold that goes with it, on dev data only.

    sola-vllm fit-metric --config pooled.json \
        --data ../shared/data/rome_known_1000.json ../shared/data/zsre_mend_eval_1000.json \
        --calibrate ../shared/data/rome_known_1000.json ../shared/data/zsre_mend_eval_1000.json \
        --out map.safetensors

Fitting: (prompt, paraphrase) pairs, each prompt's key read as the engine reads keys (the
config's `edit.key_pool` and `edit.route_layer`), from the dev splits of one or more
benchmark files (`--data`: zsRE or CounterFact-style, see `eval.data`; their pairs pooled) or
from `--pairs` (JSON lines `{"prompt", "paraphrase", "group"?}`; pairs of one group are never
each other's negatives). The map is fitted contrastively (`metric_study.fit_linear_metric`).

Calibration (`--calibrate`, one or more benchmark files; their dev splits), per file: the
records of the first half of its subjects (file order) become keys, the other half's prompts
are hard negatives (same style, other subjects), every dev locality prompt an unrelated
negative, and the keyed subjects' other-relation prompts (CounterFact-style data: the same
subject asked another question) same-subject negatives. A file's threshold is the largest
that keeps `--keep` of each negative group unrouted (each group separately, so easy unrelated
prompts cannot hide hard false fires); the map's threshold is the smallest over the files.
The report gives, per file, the keyed records' paraphrase hit rate at the map's threshold
(routed to a key of its own subject), the share of each negative group routed, and
whether the file's dev pairs also fitted the map (`fitted_on`: its own threshold then reads
optimistic, so calibrate on another file too). Both land in the map file's metadata
(`calibration`: one entry per file).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from ..key_map import KeyMap
from .calibrate import check_keep, suggest_threshold
from .data import DataError, load
from .metric_study import FitConfig, fit_linear_metric

MAX_PAIRS_LINE = 10_000  # characters per line of a --pairs file


def load_pairs(path: Path) -> list[tuple[str, str, str]]:
    """(prompt, paraphrase, group) rows of a JSON-lines pairs file, validated."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise DataError(f"cannot read pairs file {path}: {exc.strerror or exc}") from exc
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        if len(line) > MAX_PAIRS_LINE:
            raise DataError(f"{where}: line longer than {MAX_PAIRS_LINE} characters")
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not JSON: {exc.msg}") from exc
        if not isinstance(row, dict) or set(row) - {"prompt", "paraphrase", "group"}:
            raise DataError(f"{where}: expected an object with prompt, paraphrase and an "
                            "optional group")
        texts = [row.get("prompt"), row.get("paraphrase")]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise DataError(f"{where}: prompt and paraphrase must be non-empty strings")
        group = row.get("group", row["prompt"])
        if not isinstance(group, str):
            raise DataError(f"{where}: group must be a string")
        pairs.append((row["prompt"], row["paraphrase"], group))
    if len(pairs) < 2:
        raise DataError(f"{path}: fitting a key map needs at least 2 pairs, found {len(pairs)}")
    return pairs


def dataset_pairs(*paths: Path) -> list[tuple[str, str, str]]:
    """The dev splits' (prompt, first paraphrase, subject) of benchmark files, pooled."""
    pairs = []
    for path in paths:
        cases = [c for c in load(path).split("dev") if c.paraphrases]
        if len(cases) < 2:
            raise DataError(f"{path}: its dev split has {len(cases)} records with a paraphrase")
        pairs += [(c.prompt, c.paraphrases[0], c.subject.lower()) for c in cases]
    return pairs


def fit(engine, pairs: list[tuple[str, str, str]], cfg: FitConfig) -> KeyMap:
    prompts, paraphrases, groups = (list(col) for col in zip(*pairs, strict=True))
    fitted = fit_linear_metric(engine.key_queries(prompts), engine.key_queries(paraphrases),
                               groups, cfg)
    shape = engine.shape
    info = {**fitted.info, "model_fingerprint": engine.model_fingerprint,
            "hidden_size": engine.hidden_size, "key_pool": shape.key_pool,
            "route_layer": shape.route_layer}
    return KeyMap(fitted.mean, fitted.scale, fitted.proj, info)


def calibrate(engine, key_map: KeyMap, paths: list[Path], keep: float,
              metric: str, prompt_form: str = "raw") -> list[dict]:
    """The map's threshold on the files' dev splits (see the module docstring): one entry per
    file, each with the file's own threshold and its rates at the map's (the smallest).
    `prompt_form` "chat": keys and queries are the prompts' chat forms (`prompt_forms`)."""
    if metric != "cosine":
        raise ValueError("fit-metric calibrates cosine distances (router.metric 'cosine')")
    measured = [DevDistances.measure(engine, key_map, path, prompt_form) for path in paths]
    own = [m.threshold(keep) for m in measured]
    return [m.report(min(own), own_threshold, keep)
            for m, own_threshold in zip(measured, own, strict=True)]


@dataclass
class DevDistances:
    """Nearest-key distances on one benchmark's dev split: half its subjects' prompts are the
    keys; their paraphrases (`own_subject`: whether the nearest key is of the paraphrase's
    own subject), the other half's prompts (hard negatives), the locality prompts (unrelated)
    and the keyed subjects' other-relation prompts (same subject, another question; only
    CounterFact-style data has them) are the queries."""
    data: str
    path: Path
    keys: int
    paraphrase: torch.Tensor
    own_subject: list[bool]
    hard: torch.Tensor
    unrelated: torch.Tensor
    other_relation: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    @classmethod
    def measure(cls, engine, key_map: KeyMap, path: Path,
                prompt_form: str = "raw") -> DevDistances:
        from .prompt_forms import in_form

        data = load(path)
        cases = in_form([c for c in data.split("dev") if c.paraphrases], engine.tokenizer,
                        prompt_form)
        subjects = list(dict.fromkeys(c.subject.lower() for c in cases))
        if len(subjects) < 4:
            raise DataError(f"{path}: its dev split has {len(subjects)} subjects; calibrating "
                            "needs 4")
        keyed_subjects = set(subjects[:len(subjects) // 2])
        keyed = [c for c in cases if c.subject.lower() in keyed_subjects]
        held_out = [c for c in cases if c.subject.lower() not in keyed_subjects]

        def units(texts):
            return F.normalize(key_map(engine.key_queries(texts)), dim=-1)

        keys = units([c.prompt for c in keyed])

        def nearest(texts):
            if not texts:
                return torch.empty(0), []
            best = (1 - units(texts) @ keys.T).min(dim=1)
            return best.values, best.indices.tolist()

        paraphrase, index = nearest([c.paraphrases[0] for c in keyed])
        # a paraphrase hits when it routes to a key of its own subject (records of one subject
        # are keys side by side; which of them answers is the conflict the eval reports)
        own_subject = [keyed[i].subject.lower() == c.subject.lower()
                       for i, c in zip(index, keyed, strict=True)]
        return cls(data.name, path, len(keyed), paraphrase, own_subject,
                   nearest([c.prompt for c in held_out])[0],
                   nearest([c.locality[0] for c in cases if c.locality])[0],
                   nearest([p for c in keyed for p in c.other_relation])[0])

    def threshold(self, keep: float) -> float:
        """The largest threshold that keeps `keep` of each negative group unrouted."""
        groups = (self.hard, self.unrelated, self.other_relation)
        return min(suggest_threshold(g.tolist(), keep) if len(g) else 2.0 for g in groups)

    def report(self, threshold: float, own_threshold: float, keep: float) -> dict:
        hit = (self.paraphrase < threshold) & torch.tensor(self.own_subject)
        return {"threshold": threshold, "own_threshold": own_threshold, "keep": keep,
                "data": self.data, "path": str(self.path), "split": "dev", "keys": self.keys,
                "hard_negatives": len(self.hard), "unrelated_negatives": len(self.unrelated),
                "paraphrase_hit": float(hit.float().mean()),
                "hard_negative_routed": float((self.hard < threshold).float().mean()),
                "unrelated_routed": float((self.unrelated < threshold).float().mean()),
                "other_relation_negatives": len(self.other_relation),
                "other_relation_routed": (float((self.other_relation < threshold).float().mean())
                                          if len(self.other_relation) else None)}


def fit_metric_command(args, open_engine, command_config) -> dict:
    if (args.data is None) == (args.pairs is None):
        raise ValueError("give exactly one of --data (benchmark files) or --pairs (JSON lines)")
    check_keep(args.keep)
    config = command_config(args)
    engine = open_engine(args.model, config, progress=not args.json)
    pairs = dataset_pairs(*args.data) if args.data else load_pairs(args.pairs)
    random.Random(args.seed).shuffle(pairs)
    key_map = fit(engine, pairs, FitConfig(dim=args.dim, seed=args.seed, steps=args.steps))
    key_map.info["fit"]["data"] = [str(p) for p in args.data] if args.data else str(args.pairs)
    if args.calibrate:
        calibration = calibrate(engine, key_map, args.calibrate, args.keep,
                                config.router.metric)
        fitted = {p.resolve() for p in args.data or ()}
        for entry in calibration:  # its dev pairs fitted the map: its own threshold is optimistic
            entry["fitted_on"] = Path(entry["path"]).resolve() in fitted
        key_map.info["calibration"] = calibration
        key_map.info["threshold"] = calibration[0]["threshold"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    key_map.save(args.out)
    return {"out": str(args.out), "fingerprint": key_map.fingerprint(), "dim": key_map.out_dim,
            **{k: v for k, v in key_map.info.items() if k != "path"}}
