"""The form an evaluation sends its prompts in: "raw" (as the benchmark writes them, a
completion request) or "chat" (each one a user message in the model's chat template, as
/v1/chat/completions runs it; `chat_form.chat_prompt`).

Only what is measured changes form: edits are trained on the case's raw prompt, plus its chat
form when the training config says so (`TrainConfig.chat_form`). Case ids, subjects and
targets stay, so routes, owners and rollback read the same in either form.
"""

from __future__ import annotations

import dataclasses

from ..chat_form import chat_prompt
from .data import EditCase

PROMPT_FORMS = ("raw", "chat")
_PROMPT_FIELDS = ("paraphrases", "locality", "neighbours", "other_relation")


def in_form(cases: list[EditCase], tokenizer, form: str) -> list[EditCase]:
    """`cases` with every prompt they measure in `form`."""
    if form not in PROMPT_FORMS:
        raise ValueError(f"prompt form {form!r} is not one of {PROMPT_FORMS}")
    if form == "raw":
        return list(cases)
    memo: dict[str, str] = {}

    def chat(prompt: str) -> str:
        if prompt not in memo:
            memo[prompt] = chat_prompt(tokenizer, prompt)
        return memo[prompt]

    return [dataclasses.replace(c, prompt=chat(c.prompt),
                                **{f: tuple(chat(p) for p in getattr(c, f))
                                   for f in _PROMPT_FIELDS})
            for c in cases]
