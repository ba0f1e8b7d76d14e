"""Shared by the reliability tests: real edits on distinct prompts, completions with their
provenance, and knobs (env vars) that turn the bounded defaults into a longer soak."""

from __future__ import annotations

import os
from dataclasses import dataclass

from test_http_server import MARS, OTHER, ROME, call

# (edit id, prompt, target): distinct facts, so each prompt routes to its own edit only
EDITS = [("rome", ROME, "Rome."), ("mars", MARS, "Mars."), ("paris", OTHER, "London.")]
# prompts no edit touches: always answered by the base model
UNRELATED = ["The color of the sky on a clear day is", "Water boils at a temperature of",
             "The author of Romeo and Juliet is"]
MAX_TOKENS = 8


def knob(name: str, default: int) -> int:
    """A positive int from the environment (e.g. SOLA_RELIABILITY_SECONDS=600 for a soak)."""
    raw = os.environ.get(name, str(default))
    if not raw.isdigit() or int(raw) <= 0:
        raise ValueError(f"{name} must be a positive integer, got {raw!r}")
    return int(raw)


def train_edits(engine) -> dict[str, bytes]:
    """Artifacts of the EDITS trained once with the reference engine, by id."""
    return {edit_id: engine.train([prompt], target, edit_id=edit_id).to_bytes()
            for edit_id, prompt, target in EDITS}


@dataclass
class Answer:
    prompt: str
    text: str
    completion_id: str
    edits: list[str]  # provenance: edits that shaped it ([] = base model)


def answer(url: str, prompt: str) -> Answer:
    """A greedy completion and its provenance; raises on any non-200 reply."""
    status, reply = call(url, "POST", "/v1/completions", {
        "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0})
    if status != 200:
        raise RuntimeError(f"completion of {prompt!r}: HTTP {status} {reply}")
    completion_id = reply["id"]
    status, origin = call(url, "GET", f"/v1/sola/requests/{completion_id}")
    if status != 200:
        raise RuntimeError(f"provenance of {completion_id}: HTTP {status} {origin}")
    return Answer(prompt, reply["choices"][0]["text"], completion_id, origin["edits"])


def serving_states(url: str) -> dict[str, str]:
    """Each stored edit's state in the engine: active, revoked, or "not loaded"."""
    status, listing = call(url, "GET", "/v1/sola/edits")
    assert status == 200, listing
    return {e["id"]: (e["serving"] or {}).get("state", "not loaded") for e in listing["edits"]}
