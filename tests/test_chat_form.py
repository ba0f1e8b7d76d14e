"""Chat forms of edit prompts (`chat_form.py`): rendered as vLLM's chat endpoint runs them,
trained and keyed beside the raw prompt (`TrainConfig.chat_form`), and refused clearly where the
tokenizer has no chat template."""

import dataclasses

import pytest
import torch

from sola_vllm.chat_form import ChatFormError, chat_prompt, chat_prompt_ids, with_chat_forms
from sola_vllm.config import EditConfig, SolaConfig, TrainConfig
from sola_vllm.engine import RoutedEngine
from sola_vllm.models import tiny_model

PROMPT = "The secret password of the castle is"
TARGET = "blue harbor seven lantern"
CONFIG = SolaConfig(edit=EditConfig(layers=(2, 3)),
                    train=TrainConfig(steps=150, lr=5e-2, stop_loss=3.0, append_eos=False,
                                      chat_form=True))


@pytest.fixture(scope="module")
def engine():
    return RoutedEngine.from_pretrained(tiny_model("llama"), CONFIG)


class _BosTokenizer:
    """A tokenizer that adds a BOS of its own, like Llama 3's, with a template that writes one:
    a completion of the rendered text would start with two BOS tokens."""

    bos_token, bos_token_id, chat_template = "<s>", 1, "set"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert not tokenize and add_generation_prompt
        return f"<s>[user] {messages[0]['content']} [assistant]"

    def __call__(self, text, add_special_tokens=True):
        ids = [1] if add_special_tokens else []
        if text.startswith("<s>"):
            ids, text = [*ids, 1], text[3:]
        return type("Encoding", (), {"input_ids": ids + [ord(ch) for ch in text]})


def test_chat_prompt_is_the_text_the_chat_endpoint_runs(engine):
    tok = engine.tokenizer
    text = chat_prompt(tok, PROMPT)
    rendered = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                       add_generation_prompt=True)
    assert text == rendered and PROMPT in text and text != PROMPT
    served = chat_prompt_ids(tok, PROMPT)
    assert served == engine.encode(text)


def test_a_tokenizer_that_adds_bos_does_not_get_it_twice():
    tok = _BosTokenizer()
    text = chat_prompt(tok, "hi")
    assert text == "[user] hi [assistant]"
    ids = chat_prompt_ids(tok, "hi")
    assert ids[:2] == [1, ord("[")]  # one BOS, as the chat endpoint runs it


def test_no_template_or_empty_prompt_is_refused(engine):
    bare = type("Bare", (), {"chat_template": None})()
    with pytest.raises(ChatFormError, match="no chat template"):
        chat_prompt(bare, PROMPT)
    with pytest.raises(ChatFormError, match="non-empty"):
        chat_prompt(engine.tokenizer, "  ")


def test_with_chat_forms_adds_each_form_once(engine):
    tok = engine.tokenizer
    forms = with_chat_forms(tok, [PROMPT, "Another prompt", PROMPT])
    assert forms == [PROMPT, "Another prompt", PROMPT, chat_prompt(tok, PROMPT),
                     chat_prompt(tok, "Another prompt")]


def test_chat_form_training_keys_and_answers_both_forms(engine):
    engine.add(edit := engine.train([PROMPT], TARGET, edit_id="chat"))
    try:
        chat = chat_prompt(engine.tokenizer, PROMPT)
        assert edit.prompts == [PROMPT, chat] and edit.key_forms == ["raw", "chat"]
        assert edit.train_info["fit"], edit.train_info
        # each key is what routing reads from that prompt (the engine's own key query)
        torch.testing.assert_close(edit.keys, engine.key_queries([PROMPT, chat]), rtol=1e-5,
                                   atol=1e-5)
        raw_out, chat_out = engine.generate([PROMPT, chat], max_new_tokens=4)
        assert raw_out.route.edit_id == "chat" and chat_out.route.edit_id == "chat"
        assert raw_out.text == " " + TARGET
        assert chat_out.text == TARGET  # the chat prompt ends in a newline: no space
    finally:
        engine.remove("chat")


def test_batched_training_keys_chat_forms_as_chat_keys(engine):
    from sola_vllm.train_many import EditRequest, train_edits

    quick = dataclasses.replace(CONFIG.train, steps=2)
    (edit,) = train_edits(engine, [EditRequest("many", (PROMPT, "Another prompt"), TARGET)],
                          quick)
    assert edit.key_forms == ["raw", "raw", "chat", "chat"] and edit.keys.shape[0] == 4
    assert edit.prompts[2:] == [chat_prompt(engine.tokenizer, p) for p in edit.prompts[:2]]


def test_without_chat_form_only_the_raw_prompt_is_trained(engine):
    raw_only = dataclasses.replace(CONFIG.train, chat_form=False)
    edit = engine.train([PROMPT], TARGET, edit_id="raw", config=raw_only)
    assert edit.prompts == [PROMPT] and edit.keys.shape[0] == 1 and edit.forms() == ["raw"]


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_chat_form_must_be_a_bool(value):
    with pytest.raises(ValueError, match="chat_form must be true or false"):
        TrainConfig(chat_form=value)

