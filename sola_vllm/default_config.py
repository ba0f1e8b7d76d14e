"""The configuration a `sola-vllm` command runs when it is given no `--config`.

A model may have a recommended configuration, shipped in `sola_vllm/maps/` and listed in
`RECOMMENDED`: one whose key map was fitted on that model's weights (the map's
`model_fingerprint`). The default model's is `smollm2-135m-instruct-mean-l6-strict`: mean-pooled
keys entering layer 6 under the fitted map `smollm2-135m-instruct-mean-l6`, threshold 0.037.

Why (issue 4, `benchmarks/edit_quality.md`, README "Evaluation"): last-token keys rarely reach
a paraphrase (generality 0.062 on zsRE's test stream, 0.004 on CounterFact). Mean-pooled keys
under the map reach far more, but they carry the subject: at the map's own threshold (0.170,
the named configuration `smollm2-135m-instruct-mean-l6`) 32 % of prompts that name an edited
subject but ask another question route to its edit, and 29 % change their answer
(CounterFact test, `benchmarks/subject_locality.py`), where last-token keys route 0.2 %. The
threshold 0.037 is the largest that keeps 99 % of every dev negative group unrouted, those
same-subject, other-relation prompts included (`benchmarks/map_threshold.py`, dev splits).
On the test splits 0.7 % of them route, and generality is 0.172 on zsRE's full stream (0.211
with one record per subject, 0.188 on CounterFact) against 0.062 (0.004) for last-token keys
and 0.544 (0.801, 0.576) at the map's threshold; reliability and locality are 1.000.

Any other model gets `SolaConfig()`: last-token keys, which need no fitted map.

`smollm2-135m-instruct-mean-l6-chat` is the strict configuration that also serves chat
clients: each edit is trained and keyed on its prompt's chat form too (`TrainConfig.chat_form`).
Chat-form keys route under `chat_threshold` 0.0069, the same dev rule applied to chat forms
(`benchmarks/map_threshold.py --prompt-form chat`); raw keys keep 0.037 (both configurations
carry both thresholds). Chat messages share the template's system prompt and role markers, so
their pooled keys sit closer together: at 0.037 a chat-form key would catch 92 % of the
other-relation chat prompts and 40 % of the same-relation ones about other subjects
(CounterFact test, `benchmarks/subject_locality.py --chat`). A store whose edits were trained
with chat forms is served, and trains new edits, with it.

An edit store that already holds edits keeps the configuration its keys were read with (as
does an edit imported into an empty store): the recommended one when the edits' key reading
matches it and they were trained on the map's model, else `SolaConfig()` (whose edit shape then
follows the store, `commands.config_for_store`). So a store trained under the old default still
serves as it was trained, and the choice never needs the model's weights when edits decide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .config import SolaConfig
from .edit import Edit
from .key_map import SHIPPED, KeyMap
from .store import EditStore

# shipped configurations that are their model's default (first match wins)
RECOMMENDED = ("smollm2-135m-instruct-mean-l6-strict",)
# a recommended configuration's variant for edits trained with their chat forms
# (`TrainConfig.chat_form`): the same keys and thresholds, chat forms trained too
CHAT_VARIANTS = {"smollm2-135m-instruct-mean-l6-strict": "smollm2-135m-instruct-mean-l6-chat"}
LAST_TOKEN = "last-token"  # shipped too: SolaConfig() itself, by name (`--config last-token`)


@dataclass(frozen=True)
class DefaultChoice:
    name: str  # a shipped configuration's name, or LAST_TOKEN
    config: SolaConfig


def shipped_config(name: str) -> SolaConfig:
    """A configuration shipped in `sola_vllm/maps/` (`<name>.json`)."""
    return SolaConfig.from_dict(json.loads((SHIPPED / f"{name}.json").read_text()))


def default_config(model: str | Path | None, store: EditStore | None = None,
                   edit: Edit | None = None) -> DefaultChoice:
    """The configuration for `model` (None: the default model) serving or training into `store`.

    Edits decide when there are any: the store's first readable edit, else `edit` (one about
    to be imported), by their key reading and the model they were trained on. Otherwise the
    model's weights do (their fingerprint against each recommended map's)."""
    stored = store.first_summary() if store is not None and store.exists() else None
    trained = stored or (edit.metadata() if edit is not None else None)
    if trained is not None:
        reading = _edit_reading(trained)
        for name in RECOMMENDED:
            config = shipped_config(name)
            fitted_on = _map_model(config)
            same_model = fitted_on is None or fitted_on == trained.get("model_fingerprint")
            if _reading(config) == reading and same_model:
                if trained.get("train_info", {}).get("chat_form") and name in CHAT_VARIANTS:
                    name = CHAT_VARIANTS[name]
                    return DefaultChoice(name, shipped_config(name))
                return DefaultChoice(name, config)
        return DefaultChoice(LAST_TOKEN, SolaConfig())
    from .models import model_fingerprint, resolve_model

    fingerprint = model_fingerprint(resolve_model(model))
    for name in RECOMMENDED:
        config = shipped_config(name)
        if _map_model(config) == fingerprint:
            return DefaultChoice(name, config)  # its map was fitted on these weights
    return DefaultChoice(LAST_TOKEN, SolaConfig())


def _reading(config: SolaConfig) -> tuple[str, int | None]:
    return config.edit.key_pool, config.edit.route_layer


def _edit_reading(meta: dict) -> tuple[str, int | None]:
    """(key_pool, route_layer) of an edit's metadata or store summary; route_layer None when it
    is the first edited layer (one spelling of the default)."""
    route_layer = meta.get("route_layer")
    if route_layer is not None and route_layer == min(meta["layers"]):
        route_layer = None
    return meta.get("key_pool", "last"), route_layer


def _map_model(config: SolaConfig) -> str | None:
    if config.router.key_map is None:
        return None
    return KeyMap.load(config.router.key_map).info.get("model_fingerprint")

