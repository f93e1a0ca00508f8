"""The disk fills up during a harvest (simulated: a write raises ENOSPC after leaving a partial
temp file, as a real full disk does): one line saying so, exit 1, and `--resume` once there is
room again finishes a dump identical to an uninterrupted harvest."""
from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest

import harvest.writer
import shared.atomic
from conftest import write_token_dataset
from fault._support import error_line, invoke, ok
from helpers import dump_files, pass_id
from shared.manifest import shard_name

# Slow tier: the fault suite (tests/README.md); the fast tier keeps a sample of its checks.
pytestmark = pytest.mark.slow


def args(model: Path, ds: Path, out: Path) -> list:
    return ["--model", model, "--dataset", ds, "--out", out, "--context-size", "16", "--batch-size", "4",
            "--tokens", "2048", "--shard-rows", "256", "--quiet"]


@pytest.fixture(scope="module")
def setup(tiny_model, vocab_size, tmp_path_factory) -> tuple[Path, Path, dict[str, bytes]]:
    root = tmp_path_factory.mktemp("disk_full")
    ds = write_token_dataset(root / "ds", n_docs=40, doc_len=100, vocab=vocab_size)
    ok("harvest", args(tiny_model, ds, root / "ref"))
    return tiny_model, ds, dump_files(root / "ref")


def full_disk(at_call: int, real, target_of):
    """`real`, except that its `at_call`-th call leaves half a temp file of its target (the file
    `target_of(*args)`) and raises ENOSPC, as a write onto a full disk does."""
    calls = {"n": 0}

    def write(*a, **kw):
        calls["n"] += 1
        if calls["n"] == at_call:
            partial = shared.atomic.temp_path(Path(target_of(*a)))
            partial.write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(partial))
        return real(*a, **kw)
    return write


# (what is patched, which call fails)
CASES = [
    pytest.param("shard", 3, id="while-writing-shard-3"),
    pytest.param("shard", 1, id="while-writing-the-first-shard"),
    pytest.param("manifest", 4, id="while-rewriting-the-manifest-after-shard-3"),
    pytest.param("manifest", 1, id="while-writing-the-first-manifest"),
]


@pytest.mark.parametrize("what, at_call", CASES)
def test_full_disk_is_one_line_then_resume_is_identical(setup, tmp_path, monkeypatch, what, at_call):
    model, ds, reference = setup
    out = tmp_path / "out"
    if what == "shard":  # write_shard(folder, manifest, index, ...)
        monkeypatch.setattr(harvest.writer, "write_shard", full_disk(
            at_call, harvest.writer.write_shard, lambda folder, m, index, *_: folder / shard_name(index, m.format)))
    else:  # write_json(path, obj), the manifest's rewrite after each shard
        monkeypatch.setattr(shared.atomic, "write_json", full_disk(at_call, shared.atomic.write_json,
                                                                   lambda path, *_: path))
    got = invoke("harvest", args(model, ds, out))
    monkeypatch.undo()

    line = error_line(got, strict=False)
    assert got.code == 1, got.describe()
    assert "disk is full" in line and "--resume" in line, got.describe()
    manifest = out / "manifest.json"
    assert not manifest.is_file() or not json.loads(manifest.read_text())["complete"]

    begun = pass_id(out) if manifest.is_file() else None
    ok("harvest", [*args(model, ds, out), "--resume"])
    assert dump_files(out) == reference
    if begun is not None:  # a resume continues the pass its first manifest named
        assert pass_id(out) == begun
