"""The `sola-vllm` CLI on a tiny model: every command with --json, and bad input that exits 2
without changing the store."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sola_vllm.cli import main
from sola_vllm.models import build_tiny_model, tiny_model
from sola_vllm.store import EditStore

PROMPT = "The secret password of the castle is"


@pytest.fixture(scope="module")
def model():
    return str(tiny_model("llama"))


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps({"edit": {"layers": [2, 3]},
                                "train": {"steps": 150, "lr": 0.05, "stop_loss": 3.0,
                                          "append_eos": False}}))
    return str(path)


def run(capsys, *argv):
    code = main([*argv, "--json"])
    out = json.loads(capsys.readouterr().out)
    return code, out


def store_bytes(path):
    """The store's files; the audit log next to them records refused attempts too."""
    return {p.relative_to(path): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
            and p.name not in (".lock", "audit.jsonl")}


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory, model, config_file):
    store = tmp_path_factory.mktemp("store") / "edits"
    code = main(["edit", "train", "--store", str(store), "--model", model, "--config",
                 config_file, "--prompt", PROMPT, "--target", "blue harbor seven lantern",
                 "--id", "secret", "--note", "cli test", "--author", "tester", "--json"])
    assert code == 0
    return store


def test_train_list_show_revoke_restore(capsys, trained_store, model, config_file):
    store = str(trained_store)
    code, out = run(capsys, "edit", "list", "--store", store)
    assert code == 0 and [e["id"] for e in out["edits"]] == ["secret"]
    assert out["edits"][0]["state"] == "active"
    code, out = run(capsys, "edit", "show", "--store", store, "secret")
    assert out["edit"]["note"] == "cli test" and out["edit"]["author"] == "tester"
    assert out["edit"]["prompts"] == [PROMPT]

    gen = ("generate", "--store", store, "--model", model, "--config", config_file,
           "--prompt", PROMPT, "--max-tokens", "4")
    code, out = run(capsys, *gen)
    assert code == 0 and out["results"][0]["edit"] == "secret"
    assert out["results"][0]["text"] == " blue harbor seven lantern"

    code, out = run(capsys, "edit", "revoke", "--store", store, "secret")
    assert code == 0 and out["state"] == "revoked"
    code, out = run(capsys, *gen)
    assert out["results"][0]["edit"] is None
    assert out["results"][0]["text"] != " blue harbor seven lantern"
    code, out = run(capsys, "edit", "restore", "--store", store, "secret")
    assert code == 0 and out["state"] == "active"


def test_chat_form_trains_and_keys_the_chat_message_too(capsys, tmp_path, model, config_file):
    from sola_vllm.chat_form import chat_prompt
    from sola_vllm.engine import RoutedEngine

    config = json.loads(Path(config_file).read_text())
    config["train"]["chat_form"] = True
    (chat_config := tmp_path / "chat.json").write_text(json.dumps(config))
    store, config_file = str(tmp_path / "edits"), str(chat_config)
    code, out = run(capsys, "edit", "train", "--store", store, "--model", model, "--config",
                    config_file, "--prompt", PROMPT, "--target", "blue harbor seven lantern",
                    "--id", "chat")
    assert code == 0, out
    chat = chat_prompt(RoutedEngine.from_pretrained(model).tokenizer, PROMPT)
    assert out["edit"]["prompts"] == [PROMPT, chat] and out["edit"]["num_keys"] == 2
    assert out["edit"]["train_info"]["chat_form"] is True
    code, out = run(capsys, "generate", "--store", store, "--model", model, "--config",
                    config_file, "--prompt", chat, "--max-tokens", "4")
    assert code == 0 and out["results"][0]["edit"] == "chat"
    assert out["results"][0]["text"] == "blue harbor seven lantern"
    # a pre-flight check keys the new prompts as training would: with their chat forms
    code, out = run(capsys, "edit", "check", "--store", store, "--model", model, "--config",
                    config_file, "--prompt", PROMPT)
    assert code == 1 and {c["prompt"] for c in out["store"]["collisions"]} == {PROMPT, chat}


def test_export_import_reproduces_identical_bytes(capsys, trained_store, tmp_path):
    store = str(trained_store)
    single = tmp_path / "secret.safetensors"
    assert run(capsys, "edit", "export", "--store", store, "secret", "--out", str(single))[0] == 0
    other = tmp_path / "other"
    code, out = run(capsys, "edit", "import", "--store", str(other), str(single))
    assert code == 0 and out["imported"] == ["secret"]
    assert (EditStore(other).export_edit("secret", tmp_path / "again.safetensors")
            .read_bytes() == single.read_bytes())

    whole = tmp_path / "whole"
    assert run(capsys, "edit", "export", "--store", store, "--out", str(whole))[0] == 0
    copy = tmp_path / "copy"
    code, out = run(capsys, "edit", "import", "--store", str(copy), str(whole))
    assert code == 0 and out["imported"] == ["secret"]
    assert EditStore(copy).list()[0]["state"] == EditStore(trained_store).list()[0]["state"]

    peft_dir = tmp_path / "peft"
    code, _ = run(capsys, "edit", "export", "--store", store, "secret", "--out", str(peft_dir),
                  "--peft")
    assert code == 0
    rank = EditStore(trained_store).get("secret").rank
    assert json.loads((peft_dir / "adapter_config.json").read_text())["r"] == rank
    assert (peft_dir / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("argv, message", [
    (("edit", "revoke", "secret-unknown"), "secret-unknown"),
    (("edit", "show", "../../etc"), "edit id"),
    (("edit", "restore", "secret"), "active"),  # already active
])
def test_bad_requests_exit_2_and_change_nothing(capsys, trained_store, argv, message):
    before = store_bytes(trained_store)
    code, out = run(capsys, argv[0], argv[1], "--store", str(trained_store), *argv[2:])
    assert code == 2 and not out["ok"] and message in out["error"]
    assert store_bytes(trained_store) == before


def test_duplicate_id_is_refused_without_change(capsys, trained_store, model, config_file):
    before = store_bytes(trained_store)
    code, out = run(capsys, "edit", "train", "--store", str(trained_store), "--model", model,
                    "--config", config_file, "--prompt", "Another prompt", "--target", "x",
                    "--id", "secret")
    assert code == 2 and "secret" in out["error"]
    assert store_bytes(trained_store) == before


def test_corrupt_or_foreign_imports_are_refused(capsys, trained_store, tmp_path, config_file):
    before = store_bytes(trained_store)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    code, out = run(capsys, "edit", "import", "--store", str(trained_store), str(garbage))
    assert code == 2 and out["error"]

    foreign_model = build_tiny_model("llama", tmp_path / "foreign", seed=1)
    foreign_store = tmp_path / "foreign-store"
    assert main(["edit", "train", "--store", str(foreign_store), "--model", str(foreign_model),
                 "--config", config_file, "--prompt", PROMPT, "--target", "x", "--id",
                 "foreign", "--json"]) == 0
    capsys.readouterr()
    exported = tmp_path / "foreign.safetensors"
    EditStore(foreign_store).export_edit("foreign", exported)
    code, out = run(capsys, "edit", "import", "--store", str(trained_store), str(exported))
    assert code == 2 and "made for model" in out["error"]
    assert store_bytes(trained_store) == before


def test_console_script_reports_a_missing_store(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sola_vllm.cli", "edit", "list", "--store",
                           str(tmp_path / "nowhere"), "--json"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no edit store" in json.loads(proc.stdout)["error"]


@pytest.mark.slow
def test_generate_with_the_vllm_engine_serves_the_stores_edits(tmp_path, default_engine):
    store = EditStore(tmp_path / "edits")
    store.add(default_engine.train(["The capital of France is"], "Rome.", edit_id="rome"))
    store.add(default_engine.train(["The largest planet in the solar system is"], "Mars.",
                                   edit_id="mars"))
    store.revoke("mars")
    prompts = ["The capital of France is", "The largest planet in the solar system is"]
    argv = [sys.executable, "-m", "sola_vllm.cli", "generate", "--engine", "vllm", "--store",
            str(tmp_path / "edits"), "--max-tokens", "6", "--json"]
    for prompt in prompts:
        argv += ["--prompt", prompt]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)["results"]  # stdout holds only our JSON
    assert results[0]["text"] == " Rome."
    assert not results[1]["text"].startswith(" Mars")  # revoked in the store: not served
