"""An edit prompt in the form a chat client sends it: one user message in the model's chat
template, the assistant header last (what vLLM's /v1/chat/completions runs).

A chat request's routing key is read at that header and pools the template's system prompt and
role markers, so it never lies near the raw prompt's key (`benchmarks/chat_routing.py`: chat
prompts reached their own edit 0.000 of the time). An edit that should also answer chat
clients is trained and keyed on this form too: `with_chat_forms` adds it to its prompts.

The form is kept as text, like every edit prompt, so the artifact says exactly what was
trained, and both engines tokenize it as a completion prompt. vLLM tokenizes a rendered chat
prompt without adding special tokens; a tokenizer that adds a BOS of its own would then
double the one the template writes, so `chat_prompt` leaves the template's leading BOS out
when the tokenizer adds it back. `chat_prompt_ids` checks the two token sequences agree.
"""

from __future__ import annotations


class ChatFormError(ValueError):
    """The tokenizer cannot render a chat prompt (no chat template, or a bad prompt)."""


def chat_prompt(tokenizer, prompt: str) -> str:
    """`prompt` as one user message in `tokenizer`'s chat template, with the generation
    prompt (the assistant header) appended."""
    if not isinstance(prompt, str) or prompt.strip() == "":
        raise ChatFormError("a chat prompt needs a non-empty prompt string")
    return chat_text(tokenizer, [{"role": "user", "content": prompt}])


def chat_text(tokenizer, messages: list[dict]) -> str:
    """A conversation (`messages`, OpenAI style) as the completion text vLLM's chat endpoint
    runs: the chat template with the generation prompt appended, its leading BOS left out
    when the tokenizer adds its own."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormError("the model's tokenizer has no chat template: chat forms cannot be "
                            "trained for it (train on the raw prompt only)")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and _adds_bos(tokenizer):
        text = text[len(bos):]
    return text


def chat_prompt_ids(tokenizer, prompt: str) -> list[int]:
    """The token ids vLLM's chat endpoint runs for `prompt` (the rendered template, no special
    tokens added), checked equal to how `chat_prompt`'s text tokenizes as a completion."""
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)
    served = tokenizer(rendered, add_special_tokens=False).input_ids
    trained = tokenizer(chat_prompt(tokenizer, prompt), add_special_tokens=True).input_ids
    if served != trained:
        raise ChatFormError(f"the chat form of {prompt!r} tokenizes differently as a completion "
                            f"({len(trained)} tokens) than the chat endpoint runs it "
                            f"({len(served)} tokens)")
    return served


def with_chat_forms(tokenizer, prompts: list[str]) -> list[str]:
    """`prompts` followed by the chat form of each (one each, duplicates left out)."""
    out = list(prompts)
    for prompt in prompts:
        form = chat_prompt(tokenizer, prompt)
        if form not in out:
            out.append(form)
    return out


def trained_prompts(tokenizer, prompts: list[str], chat_form: bool) -> list[str]:
    """The prompts an edit with these prompts is trained and keyed on: with their chat forms
    when `chat_form` (`TrainConfig.chat_form`)."""
    return with_chat_forms(tokenizer, prompts) if chat_form else list(prompts)


def prompt_forms(given: list[str], trained: list[str]) -> list[str]:
    """The form of each of `trained` (what `trained_prompts` made of `given`): "raw" for a
    given prompt, "chat" for a chat form it added (`config.KEY_FORMS`)."""
    given = set(given)
    return ["raw" if p in given else "chat" for p in trained]


def _adds_bos(tokenizer) -> bool:
    bos_id = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True).input_ids
    return bos_id is not None and len(ids) > 0 and ids[0] == bos_id
