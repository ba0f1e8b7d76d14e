"""The main job as README runs it (`./dev serve`): `sola-vllm serve` on the default model with no
`--config` serves the model's recommended configuration (`smollm2-135m-instruct-mean-l6-strict`:
mean-pooled keys under the fitted map, the strict threshold). An edit trained by the server
itself answers its prompt and a close paraphrase of it; the same question about another
subject, another question about the same subject and an unrelated prompt keep the base model's
exact tokens; revoking the edit restores the base model's exact tokens everywhere. An edit
trained with its chat form answers the same question sent to /v1/chat/completions."""

import pytest
from test_http_server import SERVE_ARGS, call, complete, module_server

pytestmark = pytest.mark.slow

EDITED = "Which river flows through the city of Cairo?"
TARGET = "The Rhine."
PARAPHRASE = "Which river passes through the city of Cairo?"  # 0.028 from the key (ref. engine)
SAME_RELATION = "Which river flows through the city of Vienna?"  # 0.158
OTHER_RELATION = "What is the population of Cairo?"  # 0.745
UNRELATED = "The Eiffel Tower is located in the city of"
PROMPTS = (EDITED, PARAPHRASE, SAME_RELATION, OTHER_RELATION, UNRELATED)
DEFAULT_ARGS = tuple(a for a in SERVE_ARGS if a != "last-token" and a != "--config")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    yield from module_server(tmp_path_factory, "serve-default", DEFAULT_ARGS)


def test_the_default_server_routes_a_paraphrase_and_revokes_exactly(server):
    url = server.url
    assert "--config" not in server.args
    base = {p: complete(url, p) for p in PROMPTS}
    status, reply = call(url, "POST", "/v1/sola/edits",
                         {"prompts": [EDITED], "target": TARGET, "id": "rhine"})
    assert status == 201, reply
    edited = {p: complete(url, p) for p in PROMPTS}
    for prompt in (EDITED, PARAPHRASE):
        assert edited[prompt][0].startswith(" " + TARGET), (prompt, edited[prompt])
        assert base[prompt][0] != edited[prompt][0]
    for prompt in (SAME_RELATION, OTHER_RELATION, UNRELATED):
        assert edited[prompt] == base[prompt], prompt
    status, reply = call(url, "DELETE", "/v1/sola/edits/rhine")
    assert status == 200, reply
    assert {p: complete(url, p) for p in PROMPTS} == base
    log = server.log.read_text(errors="replace")
    assert ("mean-pooled keys entering layer 6 under key map smollm2-135m-instruct-mean-l6, "
            "cosine distance < 0.037" in log)

