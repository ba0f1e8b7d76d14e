"""Chat clients: `sola-vllm serve --config smollm2-135m-instruct-mean-l6-chat` on the default
model trains each edit on its prompt's chat form too (`train.chat_form`), and routes its
chat-form key at the threshold calibrated on chat forms, its raw key at the default's
(`RouterConfig.chat_threshold`). A chat message asking the edited question gets the new
answer from /v1/chat/completions, run from exactly the tokens the chat form was keyed on; an
unrelated chat message and, after the edit is revoked, every message keep the base model's
exact tokens; completions still reach the edit."""

import pytest
from test_default_serving import EDITED, TARGET, UNRELATED
from test_http_server import SERVE_ARGS, call, complete, module_server

from sola_vllm.chat_form import chat_prompt, chat_prompt_ids

pytestmark = pytest.mark.slow

CHAT = "smollm2-135m-instruct-mean-l6-chat"
CHAT_ARGS = tuple(CHAT if a == "last-token" else a for a in SERVE_ARGS)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from module_server(tmp_path_factory, "serve-chat", CHAT_ARGS)


def chat(url: str, message: str) -> tuple[str, list[int], list[int]]:
    """A greedy /v1/chat/completions answer to one user message: (text, its token ids, the
    prompt's token ids as vLLM ran them)."""
    status, reply = call(url, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": message}], "max_tokens": 12,
        "temperature": 0, "return_token_ids": True})
    assert status == 200, reply
    choice = reply["choices"][0]
    return choice["message"]["content"], choice["token_ids"], reply["prompt_token_ids"]


def test_a_chat_form_edit_answers_chat_clients_and_revokes_exactly(server, default_engine):
    url = server.url
    assert CHAT in server.args
    messages = (EDITED, UNRELATED)
    base = {m: chat(url, m) for m in messages}
    # the chat endpoint runs exactly the tokens the edit's chat form is keyed and trained on
    assert base[EDITED][2] == chat_prompt_ids(default_engine.tokenizer, EDITED)
    assert base[EDITED][1] is not None  # token ids, so the exactness below compares tokens
    status, reply = call(url, "POST", "/v1/sola/edits", {"prompts": [EDITED], "target": TARGET,
                                                         "id": "rhine-chat"})
    assert status == 201, reply
    assert reply["edit"]["prompts"] == [EDITED, chat_prompt(default_engine.tokenizer, EDITED)]
    assert reply["edit"]["key_forms"] == ["raw", "chat"]
    edited = {m: chat(url, m) for m in messages}
    assert edited[EDITED][0].startswith(TARGET), edited[EDITED]
    assert edited[UNRELATED] == base[UNRELATED]
    assert complete(url, EDITED)[0].startswith(" " + TARGET)  # completions still reach it
    # the pre-flight check keys a new edit's chat form too: both of its keys collide
    status, report = call(url, "POST", "/v1/sola/edits/check", {"prompts": [EDITED]})
    assert status == 200, report
    chat_form = chat_prompt(default_engine.tokenizer, EDITED)
    assert {(c["edit"], c["prompt"]) for c in report["collisions"]} == {
        ("rhine-chat", EDITED), ("rhine-chat", chat_form)}, report
    assert report["thresholds"] == {"raw": 0.037, "chat": 0.0069}
    # each key collides within its own form's threshold (both keys are the same as the new ones)
    assert {c["prompt"]: c["threshold"] for c in report["collisions"]} == {
        EDITED: 0.037, chat_form: 0.0069}
    status, reply = call(url, "DELETE", "/v1/sola/edits/rhine-chat")
    assert status == 200, reply
    assert {m: chat(url, m) for m in messages} == base
