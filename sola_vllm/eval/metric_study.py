"""Routing study with a learned distance: a linear map fitted on one dataset's dev pairs
(prompt, paraphrase), measured on another dataset's test (or dev) split.

    python -m sola_vllm.eval.metric_study --train ../shared/data/rome_known_1000.json \
        --data ../shared/data/zsre_mend_eval_1000.json --one-per-subject

The distance between a key and a query is the cosine distance after a `KeyMap` (centre,
scale, project to `dim`). The map is fitted contrastively: each dev prompt must be nearer its
own paraphrase than every other subject's prompt and paraphrase (and, with `--other-relation`,
than its own subject asked another relation). Nothing of the measured dataset is seen while
fitting when `--train` names another file, and paraphrases are never keys.

Edits are the measured dataset's `--split` (test by default; dev for choosing defaults);
negatives are its locality prompts and the other split's prompts (hard negatives: the same
style, other subjects; when `--train` is the same file, a held-out third of the test subjects
instead). The threshold is set so that `--keep` of the locality prompts *and* `--keep` of the
hard negatives stay unrouted (stricter than `routing_study`, which pools them: easy locality
prompts would hide hard false fires).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..key_map import KeyMap
from .data import SPLITS, EditCase, load, one_per_subject
from .routing_study import _score, group_states, nearest, query_rows, write_report

MASKED = -1e4  # logit of a pair that is neither a positive nor a negative (same subject)


@dataclass(frozen=True)
class FitConfig:
    dim: int = 32
    steps: int = 300
    lr: float = 1e-2
    temperature: float = 0.05
    weight_decay: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("dim", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not self.weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay!r}")


def fit_linear_metric(prompts: torch.Tensor, paraphrases: torch.Tensor, groups: list[str],
                      cfg: FitConfig = FitConfig(),
                      other_relation: torch.Tensor | None = None) -> KeyMap:
    """prompts, paraphrases: [n, d] query rows of n (prompt, paraphrase) pairs; groups: each
    pair's subject (pairs of one subject are never each other's negatives); other_relation:
    optional [n, d], the same subject asked another relation (a negative of its own pair)."""
    n, d = prompts.shape
    if paraphrases.shape != (n, d) or len(groups) != n:
        raise ValueError(f"need n matching rows: prompts {tuple(prompts.shape)}, paraphrases "
                         f"{tuple(paraphrases.shape)}, {len(groups)} groups")
    if other_relation is not None and other_relation.shape != (n, d):
        raise ValueError(f"other_relation must be {(n, d)}, got {tuple(other_relation.shape)}")
    if n < 2:
        raise ValueError("fitting a metric needs at least 2 pairs")
    both = torch.cat([prompts, paraphrases]).float()
    mean, scale = both.mean(dim=0), float(both.std(dim=0).mean())
    x, y = (prompts.float() - mean) / scale, (paraphrases.float() - mean) / scale
    z = None if other_relation is None else (other_relation.float() - mean) / scale
    same = torch.tensor([[a == b for b in groups] for a in groups])
    masked = same & ~torch.eye(n, dtype=torch.bool)
    gen = torch.Generator().manual_seed(cfg.seed)
    proj = torch.nn.Parameter(torch.randn(d, cfg.dim, generator=gen) / d ** 0.5)
    opt = torch.optim.Adam([proj], lr=cfg.lr)
    target = torch.arange(n)
    for _ in range(cfg.steps):
        a, b = F.normalize(x @ proj, dim=-1), F.normalize(y @ proj, dim=-1)
        to_paraphrases = (a @ b.T / cfg.temperature).masked_fill(masked, MASKED)
        to_prompts = (a @ a.T / cfg.temperature).masked_fill(same, MASKED)
        logits = [to_paraphrases, to_prompts]
        if z is not None:
            c = F.normalize(z @ proj, dim=-1)
            logits.append((a * c).sum(dim=-1, keepdim=True) / cfg.temperature)
        loss = F.cross_entropy(torch.cat(logits, dim=1), target)
        loss = loss + cfg.weight_decay * proj.pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return KeyMap(mean=mean, scale=scale, proj=proj.detach(),
                  info={"fit": {"pairs": n, "dim": cfg.dim, "steps": cfg.steps, "lr": cfg.lr,
                                "temperature": cfg.temperature, "seed": cfg.seed,
                                "other_relation": other_relation is not None}})


def fit_groups(cases: list[EditCase], other_relation: bool) -> dict[str, list[str]]:
    """The texts a metric is fitted on: each case's prompt, first paraphrase and, optionally,
    first other-relation prompt."""
    groups = {"prompt": [c.prompt for c in cases], "paraphrase": [c.paraphrases[0] for c in cases]}
    if other_relation:
        groups["other_relation"] = [c.other_relation[0] for c in cases]
    return groups


def fit_rows(by_group: dict[str, list[torch.Tensor]], mode: str):
    """(prompt, paraphrase, other-relation or None) query rows [n, d] from `fit_groups` states."""
    rows = {g: torch.cat([query_rows(s, mode) for s in v]) for g, v in by_group.items()}
    return rows["prompt"], rows["paraphrase"], rows.get("other_relation")


def pair_rows(engine, cases: list[EditCase], layer: int, mode: str, other_relation: bool):
    """`fit_rows` of `cases` at one layer, states read here."""
    return fit_rows(group_states(engine, fit_groups(cases, other_relation), [layer])[layer], mode)


def measured_groups(cases: list[EditCase], hard: list[str]) -> dict[str, list[str]]:
    return {
        "prompt": [c.prompt for c in cases],
        "paraphrase": [c.paraphrases[0] for c in cases],
        "other_relation": [p for c in cases for p in c.other_relation[:1]],
        "locality": [c.locality[0] for c in cases if c.locality],
        "hard_negative": hard,
    }


def measure(by_group: dict[str, list[torch.Tensor]], cases: list[EditCase], layer: int,
            mode: str, transforms: dict, keep: float) -> list[dict]:
    """Route `cases`' paraphrases (and negatives) against keys from their prompts under each
    transform; `by_group`: the states of `measured_groups` at `layer`. One `_score` row per
    transform."""
    owner = {"prompt": list(range(len(cases))), "paraphrase": list(range(len(cases)))}
    rows = []
    for name, transform in transforms.items():
        keys = transform(torch.cat([query_rows(s, mode) for s in by_group["prompt"]]))
        res = {g: nearest(v, keys, "cosine", mode, transform) for g, v in by_group.items() if v}
        tau = min(float(torch.quantile(res[g][1], 1 - keep))
                  for g in ("locality", "hard_negative") if g in res)
        row = {"layer": layer, "mode": mode, "metric": name, "threshold": tau}
        rows.append(_score(row, res, tau, cases, owner))
    return rows


def edits_and_hard_negatives(cases: list[EditCase], data, split: str, same: bool):
    """Hard negatives are the prompts of the measured dataset's other split, unless the metric
    was fitted on its dev split: then the last third of the test subjects (in file order) gives
    them and the rest are the edits, so no negative was seen while fitting."""
    if not same:
        return cases, [c.prompt for c in data.split("test" if split == "dev" else "dev")]
    if split == "dev":
        raise ValueError("the metric was fitted on this dataset's dev split: measure its test "
                         "split, or fit on another dataset")
    subjects = list(dict.fromkeys(c.subject.lower() for c in cases))
    held_out = set(subjects[2 * len(subjects) // 3:])
    return ([c for c in cases if c.subject.lower() not in held_out],
            [c.prompt for c in cases if c.subject.lower() in held_out])


def main(argv: list[str] | None = None) -> None:
    from ..engine import RoutedEngine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--train", required=True, help="dataset whose dev pairs fit the metric")
    p.add_argument("--data", required=True, help="dataset measured")
    p.add_argument("--split", choices=SPLITS, default="test", help="split of --data measured")
    p.add_argument("--model", default=None)
    p.add_argument("--layers", default="8,16")
    p.add_argument("--modes", default="mean1,last", help="query rows: mean1, mean or last")
    p.add_argument("--dims", default="32,64")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--other-relation", action="store_true",
                   help="fit with same-subject, other-relation negatives (CounterFact only)")
    p.add_argument("--one-per-subject", action="store_true")
    p.add_argument("--keep", type=float, default=0.99)
    p.add_argument("--hard", type=int, default=500, help="hard negatives (other-split prompts)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    train, data = load(args.train), load(args.data)
    fit_cases = [c for c in train.split("dev") if c.paraphrases]
    if args.other_relation:
        fit_cases = [c for c in fit_cases if c.other_relation]
        if not fit_cases:
            raise SystemExit(f"{args.train} has no other-relation prompts to fit with")
    cases = data.split(args.split)
    if args.one_per_subject:
        cases = one_per_subject(cases)
    cases = [c for c in cases if c.paraphrases]
    try:
        cases, hard = edits_and_hard_negatives(cases, data, args.split,
                                               same=train.path == data.path)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    hard = hard[:args.hard]
    engine = RoutedEngine.from_pretrained(args.model)
    started = time.perf_counter()
    layers = [int(x) for x in args.layers.split(",")]
    fit_states = group_states(engine, fit_groups(fit_cases, args.other_relation), layers)
    measured = group_states(engine, measured_groups(cases, hard), layers)
    subjects = [c.subject.lower() for c in fit_cases]
    rows = []
    for layer in layers:
        for mode in args.modes.split(","):
            x, y, z = fit_rows(fit_states[layer], mode)
            transforms = {"cosine": lambda v: v}
            for dim in (int(v) for v in args.dims.split(",")):
                for seed in range(args.seeds):
                    cfg = FitConfig(dim=dim, seed=seed)
                    transforms[f"learned-{dim}-seed{seed}"] = fit_linear_metric(x, y, subjects,
                                                                                cfg, z)
            rows += measure(measured[layer], cases, layer, mode, transforms, args.keep)
    report = {"train": train.name, "train_pairs": len(fit_cases), "data": data.name,
              "split": args.split, "edits": len(cases), "hard_negatives": len(hard),
              "keep": args.keep, "one_per_subject": args.one_per_subject,
              "other_relation": args.other_relation,
              "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    write_report(args.out, report)


if __name__ == "__main__":
    main()
