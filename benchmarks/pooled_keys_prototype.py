"""Prototype, end to end on the reference engine: routing by mean-pooled prompt states under a
learned linear metric (`sola_vllm.eval.metric_study`) instead of last-token keys (decision 1).
Not served: it measures what the design would give before the router is changed.

Every zsRE test record (one per subject) becomes an edit trained as usual (LoRAs on
`--edit-layers`); its key is the mean of its prompt's states entering `--route-layer` over all
tokens but the first, compared after a map fitted on CounterFact dev pairs (no zsRE text). The
threshold keeps 99 % of the zsRE dev prompts (hard negatives) and 99 % of the unrelated prompts
unrouted. With every edit loaded it reports reliability and generality (greedy exact match and
teacher-forced token accuracy, as `sola-vllm eval` defines them), the share of paraphrases
routed to their own edit, locality (unrelated prompts token-identical to the base model) and the
share of hard negatives routed. Writes JSON.

    .venv/bin/python benchmarks/pooled_keys_prototype.py --route-layer 8 --edit-layers 8,9,10 \
        --out benchmarks/results/pooled_keys_prototype_L8.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def pooled_engine_class():
    from sola_vllm.engine import RoutedEngine
    from sola_vllm.kernels.nearest_key import nearest_key_ref

    class PooledKeyEngine(RoutedEngine):
        """Routes each prompt by the mean of its states entering `route_layer` (tokens 1..key),
        mapped by `metric`, against the stored keys mapped alike (cosine distance)."""

        metric = None
        route_layer_states = None

        def watch_route_layer(self, layer: int) -> None:
            def grab(module, args, kwargs):
                self.route_layer_states = args[0] if args else kwargs["hidden_states"]
            self.decoder_layers[layer].register_forward_pre_hook(grab, with_kwargs=True)

        def route_keys(self, queries):
            table = self.routing_table
            if len(table) == 0:
                return super().route_keys(queries)
            slot, dist, _ = nearest_key_ref(self.metric(queries.float()),
                                            self.metric(table.keys), table.owners,
                                            self.router.threshold, "cosine")
            return slot.long(), dist

        def _key_layer_hook(self, module, args, kwargs):
            if self._apply_mask is not None and self._pending is not None:
                hidden = self.route_layer_states  # [B, T, H], left-padded rows
                if hidden is None:  # routing at the first edited layer: this hook's input
                    hidden = args[0] if args else kwargs["hidden_states"]
                mask, key_pos = self._pending.attention_mask, self._pending.key_pos
                queries = []
                for row in range(hidden.shape[0]):
                    first, last = int(mask[row].nonzero()[0]), int(key_pos[row])
                    start = first + 1 if last > first else first
                    queries.append(hidden[row, start:last + 1].float().mean(dim=0))
                self._slots, self._distances = self.route_keys(torch.stack(queries))
                self._pending = None
            return super()._key_layer_hook(module, args, kwargs)

    return PooledKeyEngine


def pooled_rows(engine, texts: list[str], layer: int) -> torch.Tensor:
    from sola_vllm.eval.routing_study import query_rows
    from sola_vllm.eval.states import residual_states

    return torch.cat([query_rows(s[layer], "mean1")
                      for s in residual_states(engine, texts, [layer])])


def nearest_distance(engine, texts, keys, layer) -> torch.Tensor:
    queries = F.normalize(engine.metric(pooled_rows(engine, texts, layer)), dim=-1)
    return (1 - queries @ F.normalize(engine.metric(keys), dim=-1).T).min(dim=1).values


def score(engine, prompts, cases, batch: int = 32) -> dict:
    from sola_vllm.train import target_ids

    em, tf, own = [], [], []
    for start in range(0, len(prompts), batch):
        chunk, chunk_cases = prompts[start:start + batch], cases[start:start + batch]
        targets = [target_ids(engine, p, c.target, append_eos=False)
                   for p, c in zip(chunk, chunk_cases, strict=True)]
        predicted, routes = engine.teacher_forced(chunk, targets)
        gens = engine.generate(chunk, max_new_tokens=max(len(t) for t in targets))
        for i, (t, p, g, r) in enumerate(zip(targets, predicted, gens, routes, strict=True)):
            tf.append(sum(a == b for a, b in zip(t, p, strict=True)) / len(t))
            em.append(float(g.token_ids[:len(t)] == t))
            own.append(float(r.edit_id == edit_id(start + i)))
    return {"em": sum(em) / len(em), "tf": sum(tf) / len(tf), "routed_own": sum(own) / len(own)}


def edit_id(i: int) -> str:
    return f"e{i:04d}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--route-layer", type=int, default=8)
    p.add_argument("--edit-layers", default="8,9,10")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=float, default=0.99)
    p.add_argument("--edits", type=int, default=None, help="first N records only")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    from sola_vllm.config import EditConfig, SolaConfig
    from sola_vllm.eval.data import load, one_per_subject
    from sola_vllm.eval.metric_study import FitConfig, fit_linear_metric, pair_rows
    from sola_vllm.train_many import EditRequest, train_edits

    started = time.perf_counter()
    edit_layers = tuple(int(x) for x in args.edit_layers.split(","))
    if args.route_layer > edit_layers[0]:
        raise SystemExit("--route-layer must not come after the first edited layer")
    engine = pooled_engine_class().from_pretrained(
        None, config=SolaConfig(edit=EditConfig(layers=edit_layers)))
    if args.route_layer < edit_layers[0]:
        engine.watch_route_layer(args.route_layer)
    facts = load(DATA / "rome_known_1000.json")
    zsre = load(DATA / "zsre_mend_eval_1000.json")
    fit = [c for c in facts.split("dev") if c.paraphrases]
    x, y, _ = pair_rows(engine, fit, args.route_layer, "mean1", other_relation=False)
    engine.metric = fit_linear_metric(x, y, [c.subject.lower() for c in fit],
                                      FitConfig(dim=args.dim, seed=args.seed))
    cases = [c for c in one_per_subject(zsre.split("test")) if c.paraphrases][:args.edits]
    hard = [c.prompt for c in zsre.split("dev")]
    unrelated = [c.locality[0] for c in cases]
    keys = pooled_rows(engine, [c.prompt for c in cases], args.route_layer)
    engine.router.threshold = min(
        float(torch.quantile(nearest_distance(engine, g, keys, args.route_layer), 1 - args.keep))
        for g in (hard, unrelated))
    base_unrelated = [g.token_ids for g in engine.generate(unrelated, max_new_tokens=16)]
    t_train = time.perf_counter()
    edits = train_edits(engine, [EditRequest(edit_id(i), (c.prompt,), c.target)
                                 for i, c in enumerate(cases)])
    train_seconds = time.perf_counter() - t_train
    engine.add_all([dataclasses.replace(e, keys=keys[i:i + 1].clone())
                    for i, e in enumerate(edits)])
    after = [g.token_ids for g in engine.generate(unrelated, max_new_tokens=16)]
    hard_routed = [r.edit_id is not None for s in range(0, len(hard), 64)
                   for r in engine.forward_logits(hard[s:s + 64])[2]]
    report = {
        "benchmark": "pooled_keys_prototype", "data": "zsre test, one record per subject",
        "metric_fitted_on": f"counterfact dev ({len(fit)} pairs)",
        "route_layer": args.route_layer, "edit_layers": list(edit_layers), "dim": args.dim,
        "seed": args.seed, "keep": args.keep, "edits": len(cases),
        "threshold": engine.router.threshold,
        "reliability": score(engine, [c.prompt for c in cases], cases),
        "generality": score(engine, [c.paraphrases[0] for c in cases], cases),
        "locality": sum(a == b for a, b in zip(base_unrelated, after, strict=True)) / len(after),
        "hard_negative_routed": sum(hard_routed) / len(hard_routed),
        "train_seconds": round(train_seconds, 1),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
