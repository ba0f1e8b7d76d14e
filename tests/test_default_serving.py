"""The main job as README runs it (`./dev serve`): `sola-vllm serve` on the default model with no
`--config` serves the model's recommended configuration, mean-pooled keys under the fitted map.
An edit trained by the server itself answers its prompt and a paraphrase of it, leaves a prompt
of the same relation about another subject and an unrelated prompt exactly as the base model
answers them, and revoking it restores the base model's exact tokens."""

import pytest
from test_http_server import SERVE_ARGS, call, complete, module_server

pytestmark = pytest.mark.slow

ROME = "The capital of France is"
PARAPHRASE = "The capital city of France is"
SAME_RELATION = "The capital of Germany is"
UNRELATED = "The Eiffel Tower is located in the city of"
PROMPTS = (ROME, PARAPHRASE, SAME_RELATION, UNRELATED)
DEFAULT_ARGS = tuple(a for a in SERVE_ARGS if a != "last-token" and a != "--config")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from module_server(tmp_path_factory, "serve-default", DEFAULT_ARGS)


def test_the_default_server_routes_a_paraphrase_and_revokes_exactly(server):
    url = server.url
    assert "--config" not in server.args
    base = {p: complete(url, p) for p in PROMPTS}
    status, reply = call(url, "POST", "/v1/sola/edits",
                         {"prompts": [ROME], "target": "Rome.", "id": "rome"})
    assert status == 201, reply
    edited = {p: complete(url, p) for p in PROMPTS}
    assert edited[ROME][0].startswith(" Rome.")
    assert edited[PARAPHRASE][0].startswith(" Rome."), edited[PARAPHRASE]
    assert base[PARAPHRASE][0] != edited[PARAPHRASE][0]
    assert edited[SAME_RELATION] == base[SAME_RELATION]
    assert edited[UNRELATED] == base[UNRELATED]
    status, reply = call(url, "DELETE", "/v1/sola/edits/rome")
    assert status == 200, reply
    assert {p: complete(url, p) for p in PROMPTS} == base
    log = server.log.read_text(errors="replace")
    assert ("mean-pooled keys entering layer 6 under key map smollm2-135m-instruct-mean-l6"
            in log)
