"""The evaluation harness on vLLM (`--engine vllm`): the same metrics as the reference path
(`harness.evaluate_method`), measured on the greedy tokens that vLLM with the SoLA plugin serves.

Edits are trained on the reference engine and kept in the same edit store as the reference path
(`out/edits/<method>`), so both engines evaluate the very same LoRAs; the serving engine
recomputes each edit's keys from its prompts when the edit is hot-added. vLLM runs in fp32 so its
tokens can be compared with the reference engine's, which runs in fp32 too.

What vLLM cannot give: teacher-forced token accuracy (`*_tf`) and the route each prompt took
(`routing`, `distances`, and the rollback's `revoked_routes`), which stay None. Base outputs
are generated once, before any edit is added; locality and revoked-prompt exactness compare
against them token for token.
"""

from __future__ import annotations

import gc
import os
import random
import time
from collections import defaultdict
from types import SimpleNamespace

from .data import EditCase
from .harness import EvalConfig, _mean, edits_dir, evaluated, say, train_edits
from .methods import Method, router_summary
from .prompt_forms import in_form

JOINT_REFUSED = "lora-all runs on the reference engine only (--engine reference)"
MAX_MODEL_LEN = 1024
GPU_MEMORY_UTILIZATION = 0.5
Request = tuple[str, int]  # (prompt, greedy tokens)


def evaluate_method_vllm(cfg: EvalConfig, method: Method, stream: list[EditCase],
                         checkpoints: list[int], progress) -> dict:
    """One method's result dict (the schema of `harness.evaluate_method`) from vLLM's tokens."""
    if method.kind == "joint":
        raise ValueError(JOINT_REFUSED)
    if method.kind not in ("base", "routed"):
        raise ValueError(f"method {method.name!r} has unknown kind {method.kind!r}")
    routed = method.kind == "routed"
    edits = _trained_edits(cfg, method, stream, progress) if routed else []
    tokenizer = _tokenizer(cfg)
    stream = in_form(stream, tokenizer, cfg.prompt_form)  # what is measured (trained: raw)
    final = evaluated(cfg, stream[:checkpoints[-1]])
    revoked = _revoked(cfg, stream) if routed else set()
    scorer = _Scorer(cfg, final, tokenizer)
    notes = {"start_seconds": 0.0, "add_seconds": 0.0, "generated_prompts": 0}
    rows, rollback = [], None
    with _stdout_to_stderr():  # vLLM and its engine processes log to stdout
        say(progress, f"  starting vLLM ({method.name})")
        started = time.perf_counter()
        llm = _start(cfg, method, len(stream))
        notes["start_seconds"] = round(time.perf_counter() - started, 2)
        try:
            tokens = _Tokens(llm)
            requests = scorer.requests(final)
            requests += [(c.prompt, cfg.loc_tokens) for c in final if c.id in revoked]
            say(progress, f"  base outputs: {len(set(requests))} prompts")
            base = tokens(requests)
            done, now = 0, base
            for t in checkpoints:
                cases = evaluated(cfg, stream[:t])
                say(progress, f"  T={t}: {len(cases)} cases")
                if routed:
                    started = time.perf_counter()
                    if stream[done:t]:
                        llm.add_edits(edits[done:t], active=True)
                    notes["add_seconds"] += time.perf_counter() - started
                    done = t
                    now = tokens(scorer.requests(cases))
                rows.append({"T": t, **scorer.row(cases, now, base)})
            if routed:
                rollback = _rollback(cfg, llm, tokens, scorer, stream, final, revoked, base,
                                     now, rows[-1], progress)
            notes["generated_prompts"] = tokens.generated
        finally:
            llm.close()
            gc.collect()
    notes["add_seconds"] = round(notes["add_seconds"], 2)
    return {"name": method.name, "description": method.description,
            "router": router_summary(method),
            "checkpoints": rows, "rollback": rollback, "distances": None,
            "engine_notes": notes}


def _trained_edits(cfg: EvalConfig, method: Method, stream: list[EditCase], progress) -> list:
    """The stream's edits from the method's edit store; the missing ones are trained first on
    the reference engine, which is freed before vLLM starts."""
    from ..store import EditStore

    path = edits_dir(cfg, method)
    store = EditStore(path)
    have = {e["id"] for e in store.list()} if store.exists() else set()
    if all(c.id in have for c in stream):
        by_id = {e.id: e for e in store.all()}
        return [by_id[c.id] for c in stream]
    todo = sum(c.id not in have for c in stream)
    say(progress, f"  training {todo} edits ({method.name}) on the reference engine")
    edits = _train(cfg, method, stream, path, progress)
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return edits


def _train(cfg: EvalConfig, method: Method, stream: list[EditCase], path, progress) -> list:
    from ..engine import RoutedEngine

    engine = RoutedEngine.from_pretrained(cfg.model, method.config)
    try:
        return train_edits(engine, method, stream, path, progress)
    finally:
        del engine


def _revoked(cfg: EvalConfig, stream: list[EditCase]) -> set[str]:
    """The half `Probe.rollback` revokes."""
    return set(random.Random(cfg.seed).sample([c.id for c in stream], len(stream) // 2))


def _start(cfg: EvalConfig, method: Method, n_edits: int):
    from ..serving.llm import SolaLLM

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    capacity = max(n_edits, 16)
    return SolaLLM(cfg.model, method.config, max_edits=capacity, max_keys=capacity * 2,
                   max_rank=max(8, method.config.edit.rank), dtype="float32",
                   enforce_eager=True, max_model_len=MAX_MODEL_LEN,
                   gpu_memory_utilization=GPU_MEMORY_UTILIZATION, seed=0)


class _Tokens:
    """Greedy token ids from one SolaLLM: each distinct (prompt, length) once per call, one
    batched generate call per length."""

    def __init__(self, llm):
        self.llm, self.generated = llm, 0

    def __call__(self, requests: list[Request]) -> dict[Request, list[int]]:
        by_length = defaultdict(list)
        for prompt, n in dict.fromkeys(requests):
            by_length[n].append(prompt)
        out = {}
        for n, prompts in by_length.items():
            completions = self.llm.generate(prompts, max_tokens=n)
            for prompt, completion in zip(prompts, completions, strict=True):
                out[prompt, n] = list(completion.token_ids)
            self.generated += len(prompts)
        return out


def _tokenizer(cfg: EvalConfig):
    from transformers import AutoTokenizer

    from ..models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model(cfg.model))


class _Scorer:
    """Target token ids of the evaluated cases and the metrics of one set of generations."""

    def __init__(self, cfg: EvalConfig, cases: list[EditCase], tokenizer):
        from ..train import target_ids

        holder = SimpleNamespace(tokenizer=tokenizer)
        self.loc_tokens = cfg.loc_tokens
        self.targets = {(p, c.target): target_ids(holder, p, c.target, append_eos=False)
                        for c in cases for p in (c.prompt, *c.paraphrases)}

    def answers(self, cases: list[EditCase], paraphrases: bool = False) -> list[Request]:
        prompts = [(p, c.target) for c in cases
                   for p in (c.paraphrases if paraphrases else (c.prompt,))]
        return [(p, len(self.targets[p, t])) for p, t in prompts]

    def requests(self, cases: list[EditCase]) -> list[Request]:
        loc = [(p, self.loc_tokens) for c in cases for p in c.locality]
        return self.answers(cases) + self.answers(cases, paraphrases=True) + loc

    def em(self, cases: list[EditCase], tokens: dict, paraphrases: bool = False) -> list[float]:
        pairs = [(p, c.target) for c in cases
                 for p in (c.paraphrases if paraphrases else (c.prompt,))]
        out = []
        for p, t in pairs:
            want = self.targets[p, t]
            out.append(float(tokens[p, len(want)][:len(want)] == want))
        return out

    def unchanged(self, prompts: list[str], tokens: dict, base: dict) -> list[float]:
        n = self.loc_tokens
        return [float(tokens[p, n] == base[p, n]) for p in prompts]

    def row(self, cases: list[EditCase], tokens: dict, base: dict) -> dict:
        loc = [p for c in cases for p in c.locality]
        return {"n_eval": len(cases), "reliability_tf": None,
                "reliability_em": _mean(self.em(cases, tokens)), "generality_tf": None,
                "generality_em": _mean(self.em(cases, tokens, paraphrases=True)),
                "locality": _mean(self.unchanged(loc, tokens, base)), "routing": None}


def _rollback(cfg, llm, tokens: _Tokens, scorer: _Scorer, stream: list[EditCase],
              cases: list[EditCase], revoked: set[str], base: dict, final: dict,
              final_row: dict, progress) -> dict:
    """`Probe.rollback` on vLLM: revoke the same half, measure, restore every revoked edit."""
    say(progress, f"  rollback: revoking {len(revoked)} of {len(stream)} edits")
    gone = [c for c in cases if c.id in revoked]
    kept = [c for c in cases if c.id not in revoked]
    loc = [p for c in cases for p in c.locality]
    n = cfg.loc_tokens
    done = []
    try:
        for c in stream:  # stream order: deterministic
            if c.id in revoked:
                llm.revoke(c.id)
                done.append(c.id)
        now = tokens([(c.prompt, n) for c in gone] + scorer.answers(kept)
                     + [(p, n) for p in loc])
    finally:
        for edit_id in done:
            llm.restore(edit_id)
    return {"T": len(stream), "revoked": len(revoked), "revoked_evaluated": len(gone),
            "revoked_exact": _mean(scorer.unchanged([c.prompt for c in gone], now, base)),
            # where revoked prompts route needs each request's route, which this path does
            # not read (see the module docstring)
            "revoked_exact_unshadowed": None, "revoked_routes": None,
            "kept": len(kept),
            "kept_reliability_em": _mean(scorer.em(kept, now)),
            "kept_reliability_em_before": _mean(scorer.em(kept, final)),
            "locality": _mean(scorer.unchanged(loc, now, base)),
            "locality_before": final_row["locality"]}


def _stdout_to_stderr():
    from ..commands import stdout_to_stderr

    return stdout_to_stderr()
