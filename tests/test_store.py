"""EditStore: journal replay, integrity checks, refusals that leave the store unchanged,
export / import round trips and concurrent writers."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import make_synthetic_edit

import sola_vllm.store as store_module
from sola_vllm.store import EditStore, StoreError, UnknownEditError

WRITER = Path(__file__).with_name("store_writer.py")


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file under `root` (except the lock file) -> its bytes; directories -> None."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*")) if p.name != ".lock"}


def make_store(path: Path, ids=("a", "b", "c")) -> EditStore:
    store = EditStore(path)
    for seed, edit_id in enumerate(ids):
        store.add(make_synthetic_edit(edit_id, seed=seed), author=f"author-{edit_id}")
    return store


def assert_same_edit(got, want) -> None:
    assert got.id == want.id and got.prompts == want.prompts and got.target == want.target
    assert torch.equal(got.keys, want.keys)
    assert set(got.lora) == set(want.lora)
    for name, (a, b) in want.lora.items():
        assert torch.equal(got.lora[name][0], a) and torch.equal(got.lora[name][1], b)


def store_history_author(store: EditStore, edit_id: str) -> str:
    return store.history(edit_id)[0]["author"]


def journal_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "journal.jsonl").read_text().splitlines()]


def test_add_get_revoke_restore_round_trip(tmp_path):
    path = tmp_path / "store"
    edits = {i: make_synthetic_edit(i, seed=s) for s, i in enumerate(["a", "b", "c"])}
    store = EditStore(path)
    for edit_id, edit in edits.items():
        store.add(edit, author="alice", note=f"adding {edit_id}")
    assert json.loads((path / "store.json").read_text())["format"] == "sola-vllm-store"
    assert [s["id"] for s in store.list()] == ["a", "b", "c"]
    for edit_id, edit in edits.items():
        got = store.get(edit_id)
        assert_same_edit(got, edit)
        assert got.state == "active" and got.author == "helpers"  # the artifact's own author
        assert got.to_bytes() == (path / "edits" / f"{edit_id}.safetensors").read_bytes()
        (added,) = store.history(edit_id)
        assert added["author"] == "alice" and added["note"] == f"adding {edit_id}"

    store.revoke("b", author="bob", note="wrong fact")
    assert store.get("b").state == "revoked"
    assert [e.id for e in store.active()] == ["a", "c"]
    assert {e.id: e.state for e in store.all()} == {"a": "active", "b": "revoked", "c": "active"}
    assert {s["id"]: s["state"] for s in store.list()}["b"] == "revoked"
    with pytest.raises(StoreError, match="already revoked"):
        store.revoke("b")
    store.restore("b")
    assert store.get("b").state == "active"
    with pytest.raises(StoreError, match="already active"):
        store.restore("b")
    assert [h["op"] for h in store.history("b")] == ["add", "revoke", "restore"]
    assert store.history("b")[1]["note"] == "wrong fact"
    assert [e["seq"] for e in journal_lines(path)] == list(range(5))
    assert store.problems() == []


def test_list_summaries_come_from_headers(tmp_path):
    store = make_store(tmp_path / "store", ids=("a",))
    (summary,) = store.list()
    edit = make_synthetic_edit("a", seed=0)
    assert summary["target"] == edit.target and summary["prompts"] == edit.prompts
    assert summary["created"] == edit.created and summary["layers"] == [2, 3]
    assert summary["num_keys"] == 1 and summary["key_dim"] == 64
    assert summary["author"] == "helpers" and summary["added_by"] == "author-a"
    assert summary["state"] == "active"
    artifact = tmp_path / "store" / "edits" / "a.safetensors"
    assert summary["sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()


def test_unknown_id_is_a_key_error_naming_the_id(tmp_path):
    store = make_store(tmp_path / "store", ids=("a",))
    for call in (store.get, store.revoke, store.restore, store.history):
        with pytest.raises(UnknownEditError, match="'nope'") as info:
            call("nope")
        assert isinstance(info.value, KeyError) and isinstance(info.value, StoreError)


def test_duplicate_id_refused_and_store_unchanged(tmp_path):
    path = tmp_path / "store"
    store = make_store(path)
    before = snapshot(path)
    with pytest.raises(StoreError, match="'b' already exists"):
        store.add(make_synthetic_edit("b", seed=99))
    assert snapshot(path) == before
    assert_same_edit(store.get("b"), make_synthetic_edit("b", seed=1))


@pytest.mark.parametrize("bad", ["../x", "a/b", "", ".hidden", "a..b", "/abs", "x" * 200])
def test_invalid_ids_refused(tmp_path, bad):
    path = tmp_path / "store"
    store = make_store(path, ids=("a",))
    before = snapshot(path)
    for call in (store.get, store.revoke, store.restore, store.history):
        with pytest.raises(StoreError, match="invalid"):
            call(bad)
    with pytest.raises(StoreError, match="invalid"):
        store.export_edit(bad, tmp_path / "out.safetensors")
    edit = make_synthetic_edit("ok")
    edit.id = bad  # bypass Edit's own validation: the store must check again
    with pytest.raises(StoreError, match="invalid"):
        store.add(edit)
    assert snapshot(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_foreign_fingerprints_refused(tmp_path):
    path = tmp_path / "store"
    store = make_store(path, ids=("a",))
    before = snapshot(path)
    foreign_model = make_synthetic_edit("f1", model_fingerprint="f" * 64)
    with pytest.raises(StoreError) as info:
        store.add(foreign_model)
    assert "f" * 64 in str(info.value) and "m" * 64 in str(info.value)
    foreign_shape = make_synthetic_edit("f2", layers=(1, 2))
    with pytest.raises(StoreError, match=foreign_shape.shape_fingerprint):
        store.add(foreign_shape)
    assert snapshot(path) == before
    info = store.info()
    assert info["model_fingerprint"] == "m" * 64
    assert info["shape_fingerprint"] == make_synthetic_edit("a").shape_fingerprint


def test_store_created_with_pins_refuses_other_models(tmp_path):
    store = EditStore.create(tmp_path / "store", model_fingerprint="p" * 64)
    with pytest.raises(StoreError, match="p" * 64):
        store.add(make_synthetic_edit("a"))
    store.add(make_synthetic_edit("a", model_fingerprint="p" * 64))
    with pytest.raises(StoreError, match="already exists"):
        EditStore.create(tmp_path / "store")


def test_first_summary_skips_artifacts_whose_header_does_not_read(tmp_path):
    path = tmp_path / "store"
    store = make_store(path)
    assert EditStore.create(tmp_path / "empty").first_summary() is None
    (path / "edits" / "a.safetensors").unlink()
    assert "problem" in store.list()[0]
    assert store.first_summary() == store.list()[1] and store.first_summary()["id"] == "b"


def test_corrupt_artifact_reported_others_load(tmp_path):
    path = tmp_path / "store"
    store = make_store(path)
    artifact = path / "edits" / "b.safetensors"
    blob = bytearray(artifact.read_bytes())
    blob[len(blob) - 10] ^= 0x01  # one bit of one tensor value
    artifact.write_bytes(bytes(blob))

    problems = store.problems()
    assert len(problems) == 1 and str(artifact) in problems[0] and "corrupt" in problems[0]
    assert [e.id for e in store.all()] == ["a", "c"]
    assert store.get("a").id == "a"
    with pytest.raises(StoreError, match=str(artifact)):
        store.get("b")
    assert [s["id"] for s in store.list()] == ["a", "b", "c"]
    with pytest.raises(StoreError, match="corrupt"):
        store.export_store(tmp_path / "export")
    with pytest.raises(StoreError, match="corrupt"):
        store.export_edit("b", tmp_path / "b.safetensors")


def test_missing_artifact_reported_others_load(tmp_path):
    path = tmp_path / "store"
    store = make_store(path)
    artifact = path / "edits" / "c.safetensors"
    artifact.unlink()
    problems = store.problems()
    assert len(problems) == 1 and "missing" in problems[0] and str(artifact) in problems[0]
    assert [e.id for e in store.all()] == ["a", "b"]
    with pytest.raises(StoreError, match="missing"):
        store.get("c")
    assert "problem" in store.list()[2] and "problem" not in store.list()[0]
    assert store.first_summary() == store.list()[0]
    store.revoke("a")  # the store stays writable
    assert [e.id for e in store.active()] == ["b"]


@pytest.mark.parametrize("tail", [
    b'{"seq":3,"time":1.0,"op":"revo',  # killed mid-write: no newline
    b"\x00\x00\x00",  # zero-filled block after a crash
])
def test_torn_journal_tail_ignored_then_truncated(tmp_path, tail):
    path = tmp_path / "store"
    store = make_store(path)
    journal = path / "journal.jsonl"
    good = journal.read_bytes()
    journal.write_bytes(good + tail)

    assert {e.id: e.state for e in store.all()} == dict.fromkeys("abc", "active")
    assert any("incomplete last line" in p for p in store.problems())
    store.revoke("a")  # the next writer removes the torn tail before appending
    data = journal.read_bytes()
    assert data.startswith(good) and data.endswith(b"\n") and tail not in data
    assert [e["seq"] for e in journal_lines(path)] == [0, 1, 2, 3]
    assert store.problems() == [] and store.get("a").state == "revoked"


def test_bad_crc_last_line_is_a_torn_write(tmp_path):
    path = tmp_path / "store"
    store = make_store(path)
    journal = path / "journal.jsonl"
    entry = {"seq": 3, "time": 1.0, "op": "revoke", "id": "a", "author": "", "note": "",
             "crc": "0" * 64}
    journal.write_bytes(journal.read_bytes() + json.dumps(entry).encode() + b"\n")
    assert store.get("a").state == "active"
    assert any("incomplete last line" in p for p in store.problems())
    store.add(make_synthetic_edit("d", seed=3))
    assert [(e["seq"], e["id"]) for e in journal_lines(path)][-1] == (3, "d")
    assert store.problems() == []


def test_corrupt_middle_line_reported_without_blocking_others(tmp_path):
    path = tmp_path / "store"
    store = make_store(path)
    journal = path / "journal.jsonl"
    lines = journal.read_bytes().split(b"\n")
    lines[0] = lines[0].replace(b'"author":"author-a"', b'"author":"mallory!"')
    journal.write_bytes(b"\n".join(lines))

    problems = store.problems()
    assert any("line 1 is corrupt" in p and "checksum" in p for p in problems)
    assert [e.id for e in store.all()] == ["b", "c"]
    store.add(make_synthetic_edit("d", seed=3))  # the corrupt line is kept, not truncated
    assert journal.read_bytes().split(b"\n")[0] == lines[0]
    assert [e.id for e in store.all()] == ["b", "c", "d"]


def test_orphan_artifact_invisible_and_repaired(tmp_path):
    path = tmp_path / "store"
    store = make_store(path, ids=("a",))
    ghost = make_synthetic_edit("ghost", seed=5)
    (path / "edits" / "ghost.safetensors").write_bytes(ghost.to_bytes())
    (path / "edits" / ".tmp-half-written").write_bytes(b"partial")

    assert [s["id"] for s in store.list()] == ["a"]
    assert [e.id for e in store.all()] == ["a"]
    with pytest.raises(UnknownEditError):
        store.get("ghost")
    problems = store.problems()
    assert any("orphan" in p and "ghost.safetensors" in p for p in problems)
    assert any(".tmp-half-written" in p for p in problems)
    assert len(store.fsck()) == 2
    report = store.fsck(repair=True)
    assert len(report) == 2 and all(r.endswith("removed") for r in report)
    assert sorted(p.name for p in (path / "edits").iterdir()) == ["a.safetensors"]
    assert store.problems() == []
    store.add(ghost)  # the id is free: it was never committed
    assert store.get("ghost").state == "active"


def test_missing_store_and_foreign_directory(tmp_path):
    store = EditStore(tmp_path / "nope")
    for call in (store.list, store.all, store.problems, lambda: store.get("a")):
        with pytest.raises(StoreError, match="does not exist"):
            call()
    with pytest.raises(StoreError, match="does not exist"):
        store.revoke("a")
    assert not (tmp_path / "nope").exists()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("hi")
    with pytest.raises(StoreError, match="not an edit store"):
        EditStore(tmp_path / "home").add(make_synthetic_edit("a"))
    assert sorted(p.name for p in (tmp_path / "home").iterdir()) == ["notes.txt"]


def test_writer_lock_timeout(tmp_path):
    path = tmp_path / "store"
    make_store(path, ids=("a",))
    fd = os.open(path / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        start = time.monotonic()
        with pytest.raises(StoreError, match="timed out .* writer lock"):
            EditStore(path, lock_timeout=0.2).revoke("a")
        assert 0.2 <= time.monotonic() - start < 5
    finally:
        os.close(fd)
    EditStore(path, lock_timeout=0.2).revoke("a")


def _run_as_nobody(fn) -> str:
    """Run `fn()` in a forked child that dropped root; returns what it reports."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            os.close(read)
            os.setgid(65534)
            os.setuid(65534)
            message = fn()
        except BaseException as exc:  # report anything, never return into pytest
            message = f"child crashed: {exc!r}"
        os.write(write, message.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message


def test_no_write_permission_changes_nothing():
    # pytest's tmp_path is private to root; a store other users can read must live elsewhere
    root = Path(tempfile.mkdtemp(prefix="sola-store-perm-"))
    try:
        os.chmod(root, 0o755)
        path = root / "store"
        store = make_store(path, ids=("a",))
        edit = make_synthetic_edit("b", seed=1)
        before = snapshot(path)

        def attempt() -> str:
            for action in (lambda: EditStore(path).add(edit), lambda: EditStore(path).revoke("a")):
                try:
                    action()
                    return "write succeeded"
                except StoreError as exc:
                    if str(path) not in str(exc):
                        return f"error does not name the store: {exc}"
            return "ok"

        if os.geteuid() == 0:  # root bypasses permissions: drop to nobody in a child
            message = _run_as_nobody(attempt)
        else:
            for p in [path, *path.rglob("*")]:
                p.chmod(p.stat().st_mode & ~0o222)
            if os.access(path, os.W_OK):
                pytest.skip("chmod did not make the store read-only")
            message = attempt()
            for p in [path, *path.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
        assert message == "ok"
        assert snapshot(path) == before
        assert [e.id for e in store.all()] == ["a"]
    finally:
        shutil.rmtree(root)


def test_failed_artifact_write_changes_nothing(tmp_path):
    path = tmp_path / "store"
    store = EditStore.create(path)
    shutil.rmtree(path / "edits")
    (path / "edits").write_bytes(b"")  # a file where the artifact directory should be
    before = snapshot(path)
    with pytest.raises(StoreError, match=str(path)):
        store.add(make_synthetic_edit("a"))
    assert snapshot(path) == before


def test_failed_journal_append_rolls_back(tmp_path, monkeypatch):
    path = tmp_path / "store"
    store = EditStore.create(path)
    before = snapshot(path)

    def disk_full(journal, data):  # fails after the artifact and the pin were written
        assert (path / "edits" / "a.safetensors").exists()
        assert "model_fingerprint" in json.loads((path / "store.json").read_text())
        raise OSError(28, "No space left on device", str(journal))

    monkeypatch.setattr(store_module, "_append", disk_full)
    with pytest.raises(StoreError, match="No space left"):
        store.add(make_synthetic_edit("a"))
    assert snapshot(path) == before  # artifact removed, store.json un-pinned
    monkeypatch.undo()
    store.add(make_synthetic_edit("a"))
    assert [e.id for e in store.all()] == ["a"]


def test_export_import_one_edit_byte_identical(tmp_path):
    source = make_store(tmp_path / "src", ids=("a", "b"))
    out = source.export_edit("b", tmp_path / "b-export.safetensors")
    stored = (tmp_path / "src" / "edits" / "b.safetensors").read_bytes()
    assert out.read_bytes() == stored
    assert source.export_edit("a", tmp_path).name == "a.safetensors"  # a directory target

    target = EditStore(tmp_path / "dst")
    edit = target.import_edit(out, author="carol", note="from src")
    assert edit.id == "b"
    assert (tmp_path / "dst" / "edits" / "b.safetensors").read_bytes() == stored
    got = target.get("b")
    assert_same_edit(got, source.get("b"))
    assert got.state == "active" and store_history_author(target, "b") == "carol"
    with pytest.raises(StoreError, match="already exists"):
        target.import_edit(out)


def test_import_invalid_artifact_refused(tmp_path):
    target = make_store(tmp_path / "dst", ids=("a",))
    before = snapshot(tmp_path / "dst")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors at all")
    with pytest.raises(StoreError, match="bad.safetensors"):
        target.import_edit(bad)
    with pytest.raises(StoreError, match="missing.safetensors"):
        target.import_edit(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    foreign.write_bytes(make_synthetic_edit("f", model_fingerprint="f" * 64).to_bytes())
    with pytest.raises(StoreError, match="f" * 64):
        target.import_edit(foreign)
    assert snapshot(tmp_path / "dst") == before


def test_export_import_store_reproduces_states_and_bytes(tmp_path):
    src = tmp_path / "src"
    source = make_store(src, ids=("a", "b", "c", "d"))
    source.revoke("b")
    source.revoke("d")
    source.restore("d")
    source.revoke("c")
    assert source.export_store(tmp_path / "export") == tmp_path / "export"
    manifest = json.loads((tmp_path / "export" / "manifest.json").read_text())
    assert [(e["id"], e["state"]) for e in manifest["edits"]] == [
        ("a", "active"), ("b", "revoked"), ("c", "revoked"), ("d", "active")]

    target = EditStore(tmp_path / "dst")
    assert target.import_store(tmp_path / "export") == ["a", "b", "c", "d"]

    def view(store):
        return [(s["id"], s["state"], s["sha256"], s["added_by"]) for s in store.list()]

    assert view(target) == view(source)
    for edit_id in "abcd":
        name = f"edits/{edit_id}.safetensors"
        assert (tmp_path / "dst" / name).read_bytes() == (src / name).read_bytes()
    assert target.info() == source.info()
    assert target.problems() == []


def test_import_store_never_half_applies(tmp_path):
    source = make_store(tmp_path / "src", ids=("a", "b", "c"))
    export = tmp_path / "export"
    source.export_store(export)
    with pytest.raises(StoreError, match="not an empty directory"):
        source.export_store(export)
    artifact = export / "c.safetensors"
    blob = bytearray(artifact.read_bytes())
    blob[-1] ^= 0xFF
    artifact.write_bytes(bytes(blob))

    target = make_store(tmp_path / "dst", ids=("z",))
    before = snapshot(tmp_path / "dst")
    with pytest.raises(StoreError, match="c.safetensors"):
        target.import_store(export)
    assert snapshot(tmp_path / "dst") == before

    artifact.write_bytes(source.get("c").to_bytes())  # repaired: now a clash is the problem
    clash = make_store(tmp_path / "clash", ids=("b",))
    before = snapshot(tmp_path / "clash")
    with pytest.raises(StoreError, match="'b' already exists"):
        clash.import_store(export)
    assert snapshot(tmp_path / "clash") == before


def test_concurrent_writers_all_land(tmp_path):
    path = tmp_path / "store"
    EditStore.create(path)
    go = tmp_path / "go"
    server = subprocess.Popen([sys.executable, str(WRITER), str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        pids = []
        for w in range(4):  # four writer processes, released together by the go file
            server.stdin.write(f"add {go} " + " ".join(f"w{w}-{k}" for k in range(5)) + "\n")
            server.stdin.flush()
            pids.append(int(server.stdout.readline()))
        go.write_text("go")
        for pid in pids:
            server.stdin.write(f"reap {pid}\n")
            server.stdin.flush()
            assert int(server.stdout.readline()) == 0  # exit status 0: every add succeeded
    finally:
        server.stdin.close()
        server.wait(timeout=30)

    lines = journal_lines(path)
    assert [e["seq"] for e in lines] == list(range(24))  # no seq handed out twice
    loaded = EditStore(path).load()
    assert loaded.problems == []
    expected = {f"w{w}-{k}": "revoked" if k == 0 else "active" for w in range(4) for k in range(5)}
    assert {e.id: e.state for e in loaded.edits} == expected
    assert len({e["author"] for e in lines if e["op"] == "add"}) == 4
