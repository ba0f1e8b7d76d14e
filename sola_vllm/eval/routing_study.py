"""Routing study without training: how well do keys at a layer separate paraphrases (must route
to their edit) from negatives (must not)? Compares last-token keys (decision 1) with keys
anchored at the subject's last token, matched against every prompt token of the query.

    python -m sola_vllm.eval.routing_study --data ../shared/data/zsre_mend_eval_1000.json

Edits are the dev split; negatives are the unrelated locality prompts and the test split's edit
prompts (hard negatives: the same style, other subjects). The threshold is set so that `--keep`
of all negatives stay unrouted; hit and false-fire rates are read at that threshold.
`--modes gated` routes in two steps: an edit is a candidate when any query token is near its
subject-anchored key, then the nearest last-token key among candidates decides, under
`--relation-threshold` (keeps subject-anchored keys' paraphrase hits without routing every
question that names the subject). `--transforms center,whiten` also measures keys and
queries mapped by statistics of background prompts (the test split's other prompts), to see
whether the shared component of all prompts is what hides paraphrases (zsRE dev: it is not;
see `benchmarks/results/routing_study_*.json`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ..kernels.nearest_key import pairwise_distance_ref
from .data import EditCase, load, one_per_subject
from .states import residual_states, subject_token

MODES = ("last", "subject", "mean", "mean1", "gated")
TRANSFORMS = ("raw", "center", "whiten")
WHITEN_SHRINK = 0.01  # ridge on the covariance, as a share of its mean eigenvalue


def fit_transform(rows: torch.Tensor, kind: str):
    """A map applied to keys and queries alike before the distance, fitted on `rows` [n, d]
    (background prompts, disjoint from edits and negatives): `raw` (identity), `center`
    (subtract the background mean: the component every prompt shares), `whiten` (center, then
    scale each principal direction of the background to unit variance, with a small ridge)."""
    if kind not in TRANSFORMS:
        raise ValueError(f"transform {kind!r} is not one of {TRANSFORMS}")
    if kind == "raw":
        return lambda x: x
    mean = rows.mean(dim=0)
    if kind == "center":
        return lambda x: x - mean
    evals, evecs = torch.linalg.eigh(torch.cov((rows - mean).T))
    evals = evals.clamp_min(0) + WHITEN_SHRINK * evals.mean()
    w = evecs @ torch.diag(evals.rsqrt()) @ evecs.T
    return lambda x: (x - mean) @ w


def query_rows(s: torch.Tensor, mode: str) -> torch.Tensor:
    """The query rows of one prompt's states [T, d]: its last token (`last`), every token
    (`subject`: the best match over the prompt decides), the mean over tokens (`mean`) or the
    mean over all tokens but the first (`mean1`: the first token's state is an outlier shared by
    every prompt, the "attention sink")."""
    if mode not in MODES:
        raise ValueError(f"key mode {mode!r} is not one of {MODES}")
    if mode == "subject":
        return s
    if mode == "mean1" and s.shape[0] > 1:
        return s[1:].mean(dim=0, keepdim=True)
    return s.mean(dim=0, keepdim=True) if mode.startswith("mean") else s[-1:]


def nearest(states: list[torch.Tensor], keys: torch.Tensor, metric: str,
            mode: str, transform=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: (index of the nearest key, its distance); `transform` maps query rows into
    the keys' space (keys are passed already mapped)."""
    idx, dist = [], []
    for s in states:
        q = query_rows(s, mode)
        q = transform(q) if transform is not None else q
        d = pairwise_distance_ref(q, keys, metric).min(dim=0).values  # [N]
        best = int(d.argmin())
        idx.append(best)
        dist.append(float(d[best]))
    return torch.tensor(idx), torch.tensor(dist)


def gate_distances(states: list[torch.Tensor], subject_keys: torch.Tensor,
                   last_keys: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query and edit: (the distance of the query's nearest token to the edit's
    subject-anchored key, the query's last token to the edit's last-token key), [Q, N] each."""
    subject = [pairwise_distance_ref(s, subject_keys, metric).min(dim=0).values for s in states]
    last = [pairwise_distance_ref(s[-1:], last_keys, metric)[0] for s in states]
    return torch.stack(subject), torch.stack(last)


def gated_nearest(subject: torch.Tensor, last: torch.Tensor,
                  gate: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-factor routing (`gated` mode) over `gate_distances`: an edit is a candidate when any
    query token is within `gate` of its subject-anchored key (the entity matches); among
    candidates the nearest last-token key decides (the question matches). Per query: (index of
    that edit or -1, its last-token distance or inf)."""
    gated = torch.where(subject < gate, last, torch.full_like(last, float("inf")))
    dist, idx = gated.min(dim=1)
    return torch.where(torch.isfinite(dist), idx, torch.full_like(idx, -1)), dist


def _gated_results(by_group: dict, anchor: list[int], metric: str, keep: float,
                   relation_threshold: float) -> tuple[dict, float, float]:
    """`gated` mode: the subject gate is set so `keep` of the negatives match no subject key;
    the last-token threshold is `relation_threshold`."""
    subject_keys = torch.stack([s[p] for s, p in zip(by_group["prompt"], anchor, strict=True)])
    last_keys = torch.cat([s[-1:] for s in by_group["prompt"]])
    dists = {g: gate_distances(v, subject_keys, last_keys, metric)
             for g, v in by_group.items() if v and g != "background"}
    negatives = torch.cat([dists[g][0].min(dim=1).values for g in ("locality", "hard_negative")])
    gate = float(torch.quantile(negatives, 1 - keep))
    res = {g: gated_nearest(*d, gate) for g, d in dists.items()}
    return res, relation_threshold, gate


def study(engine, cases: list[EditCase], hard: list[str], layers: list[int],
          metrics: list[str], keep: float, modes=MODES, transforms=("raw",),
          background: list[str] = (), relation_threshold: float = 0.1) -> list[dict]:
    """`hard`: prompts in the edits' own style about other subjects (the other split's);
    `background`: prompts the `center`/`whiten` transforms are fitted on;
    `relation_threshold`: the last-token threshold of the `gated` mode (raw keys only)."""
    if any(t != "raw" for t in transforms) and not background:
        raise ValueError("the center and whiten transforms need background prompts")
    groups = {
        "prompt": [c.prompt for c in cases],
        "paraphrase": [p for c in cases for p in c.paraphrases[:1]],
        "other_relation": [p for c in cases for p in c.other_relation[:1]],
        "locality": [c.locality[0] for c in cases if c.locality],
        "hard_negative": hard,
        "background": list(background),
    }
    owner = {"prompt": list(range(len(cases))),
             "paraphrase": [i for i, c in enumerate(cases) for _ in c.paraphrases[:1]]}
    states = group_states(engine, groups, layers)
    anchor = [subject_token(engine, c.prompt, c.subject_span) for c in cases]
    rows = []
    for layer in layers:
        by_group = states[layer]
        for mode, kind in ((m, k) for m in modes for k in transforms):
            if mode == "gated":
                if kind == "raw":
                    for metric in metrics:
                        res, tau, gate = _gated_results(by_group, anchor, metric, keep,
                                                        relation_threshold)
                        row = {"layer": layer, "mode": mode, "transform": kind,
                               "metric": metric, "threshold": tau, "subject_gate": gate}
                        rows.append(_score(row, res, tau, cases, owner))
                continue
            if mode == "subject":
                keys = torch.stack([s[p] for s, p in zip(by_group["prompt"], anchor, strict=True)])
            else:
                keys = torch.cat([query_rows(s, mode) for s in by_group["prompt"]])
            fit_rows = [query_rows(s, mode) for s in by_group["background"]]
            transform = fit_transform(torch.cat(fit_rows) if fit_rows else keys, kind)
            keys = transform(keys)
            for metric in metrics:
                res = {g: nearest(v, keys, metric, mode, transform) for g, v in by_group.items()
                       if v and g != "background"}
                negatives = torch.cat([res[g][1] for g in ("locality", "hard_negative")])
                tau = float(torch.quantile(negatives, 1 - keep))
                row = {"layer": layer, "mode": mode, "transform": kind, "metric": metric,
                       "threshold": tau}
                rows.append(_score(row, res, tau, cases, owner))
    return rows


def group_states(engine, groups: dict[str, list[str]],
                 layers: list[int]) -> dict[int, dict[str, list[torch.Tensor]]]:
    """{layer: {group: per-prompt states [T, d]}} of every group's prompts, read in one pass."""
    texts = [t for v in groups.values() for t in v]
    states = residual_states(engine, texts, layers)
    out = {}
    for layer in layers:
        out[layer], offset = {}, 0
        for g, v in groups.items():
            out[layer][g] = [s[layer] for s in states[offset:offset + len(v)]]
            offset += len(v)
    return out


def write_report(path: Path | None, report: dict) -> None:
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))


def _score(row: dict, res: dict, tau: float, cases: list[EditCase], owner: dict) -> dict:
    """Hit and false-fire rates of one configuration's routes (`res`: group -> (nearest edit
    index, its distance)) at threshold `tau`."""
    for g in ("prompt", "paraphrase"):
        idx, dist = res[g]
        own = torch.tensor(owner[g])
        same_target = torch.tensor([i >= 0 and cases[i].target == cases[j].target
                                    for i, j in zip(idx.tolist(), owner[g], strict=True)])
        routed = dist < tau
        row[f"{g}_hit_own"] = float((routed & (idx == own)).float().mean())
        row[f"{g}_hit_same_answer"] = float((routed & same_target).float().mean())
        row[f"{g}_routed"] = float(routed.float().mean())
        row[f"{g}_nearest_own"] = float((idx == own).float().mean())
    for g in ("other_relation", "locality", "hard_negative"):
        if g in res:
            row[f"{g}_false_fire"] = float((res[g][1] < tau).float().mean())
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    from ..engine import RoutedEngine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--model", default=None)
    p.add_argument("--layers", default="4,8,12,16,20,24,28")
    p.add_argument("--metrics", default="cosine,l2")
    p.add_argument("--modes", default=",".join(MODES), help=f"key modes, from {MODES}")
    p.add_argument("--transforms", default="raw",
                   help=f"key-space maps, from {TRANSFORMS}, fitted on --background prompts")
    p.add_argument("--background", type=int, default=1000,
                   help="background prompts for center/whiten: the test split's prompts past "
                        "the hard negatives, then its locality prompts")
    p.add_argument("--keep", type=float, default=0.99, help="share of negatives left unrouted")
    p.add_argument("--relation-threshold", type=float, default=0.1,
                   help="gated mode: the last-token threshold among subject-matched edits")
    p.add_argument("--one-per-subject", action="store_true")
    p.add_argument("--hard", type=int, default=500, help="hard negatives (test-split prompts)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    data = load(args.data)
    cases = data.split("dev")
    if args.one_per_subject:
        cases = one_per_subject(cases)
    cases = [c for c in cases if c.paraphrases]
    test = data.split("test")
    hard = [c.prompt for c in test][:args.hard]
    transforms = args.transforms.split(",")
    background = []
    if any(t != "raw" for t in transforms):
        background = ([c.prompt for c in test][args.hard:]
                      + [p for c in test for p in c.locality[:1]])[:args.background]
    engine = RoutedEngine.from_pretrained(args.model)
    started = time.perf_counter()
    rows = study(engine, cases, hard, [int(x) for x in args.layers.split(",")],
                 args.metrics.split(","), args.keep, args.modes.split(","), transforms,
                 background, args.relation_threshold)
    report = {"data": data.name, "split": "dev", "edits": len(cases), "hard_negatives": len(hard),
              "background": len(background), "relation_threshold": args.relation_threshold,
              "keep": args.keep, "one_per_subject": args.one_per_subject,
              "seconds": round(time.perf_counter() - started, 1), "rows": rows}
    write_report(args.out, report)


if __name__ == "__main__":
    main()
