"""Shared fixtures. TRITON_INTERPRET is set before anything imports triton, so Triton kernels run
in the interpreter on CPU and can be checked against their torch references."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def default_model_path():
    from sola_vllm.models import fetch_default_model

    return fetch_default_model(progress=False)


@pytest.fixture(scope="session")
def default_engine(default_model_path):
    """One engine on the real default model for the whole session; tests must leave it with
    no edits loaded (use `fresh_edits`)."""
    from sola_vllm.engine import RoutedEngine

    return RoutedEngine.from_pretrained(default_model_path)


def _remove_every_edit(engine):
    for edit_id in list(engine.edits):
        engine.remove(edit_id)


@pytest.fixture
def fresh_edits(default_engine):
    """Yields the shared engine and removes every edit a test added, even on failure."""
    yield default_engine
    _remove_every_edit(default_engine)


@pytest.fixture
def clean(engine):
    """Yields the test module's own `engine` fixture and removes every edit a test added, even
    on failure."""
    yield engine
    _remove_every_edit(engine)
