"""Interrupted harvests resume to a dump identical, byte for byte, to an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import harvest.writer
from conftest import write_token_dataset
from helpers import dump_files, pass_id, run_harvest
from shared.errors import DumpError
from shared.reader import open_dump

pytestmark = pytest.mark.usefixtures("one_thread")


def _args(model: Path, ds: Path, out: Path, tokens: int = 1000, shard_rows: int = 300) -> list[str]:
    return ["--model", str(model), "--dataset", str(ds), "--out", str(out), "--context-size", "32",
            "--batch-size", "5", "--tokens", str(tokens), "--shard-rows", str(shard_rows)]


@pytest.mark.parametrize("fmt", ["safetensors", "zarr"])
def test_crash_then_resume_is_byte_identical(tiny_model, token_dataset, tmp_path, monkeypatch, fmt):
    # For zarr the shards are folders: the manifest's checksums of their decoded arrays compare them.
    fmt_args = ["--format", fmt] + (["--compression", "zstd"] if fmt == "zarr" else [])
    ref = tmp_path / "ref"
    run_harvest(*_args(tiny_model, token_dataset, ref), *fmt_args)

    # Fail while writing the third shard, as a crash would.
    out = tmp_path / "out"
    real_write = harvest.writer.ShardWriter._write
    calls = {"n": 0}

    def failing_write(self, buf):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("simulated crash")
        real_write(self, buf)

    monkeypatch.setattr(harvest.writer.ShardWriter, "_write", failing_write)
    crashed = run_harvest(*_args(tiny_model, token_dataset, out), *fmt_args, expect_ok=False)
    assert crashed.exit_code == 1 and "simulated crash" in crashed.output  # one line, no traceback
    monkeypatch.setattr(harvest.writer.ShardWriter, "_write", real_write)
    partial = json.loads((out / "manifest.json").read_text())
    assert not partial["complete"] and len(partial["shards"]) == 2
    with pytest.raises(DumpError, match="incomplete"):
        open_dump(out)
    refused = run_harvest(*_args(tiny_model, token_dataset, out), *fmt_args, expect_ok=False)
    assert refused.exit_code == 2 and "--resume" in refused.output

    run_harvest(*_args(tiny_model, token_dataset, out), *fmt_args, "--resume")
    assert dump_files(out) == dump_files(ref)
    assert pass_id(out) == partial["pass_id"] != pass_id(ref)  # the same pass, continued
    open_dump(out, verify=True)


@pytest.mark.slow  # a real process, SIGKILLed; the crash test above is the fast tier's resume check
def test_sigkill_then_resume_is_byte_identical(tiny_model, vocab_size, tmp_path):
    ds = write_token_dataset(tmp_path / "big", n_docs=400, doc_len=200, vocab=vocab_size)
    args = _args(tiny_model, ds, tmp_path / "out", tokens=30_000, shard_rows=500)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "harvest", "--quiet", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    manifest = tmp_path / "out" / "manifest.json"
    while proc.poll() is None:  # no deadline: the harvest ends by itself, however slow the machine
        try:
            if len(json.loads(manifest.read_text())["shards"]) >= 3:
                break
        except (FileNotFoundError, json.JSONDecodeError):
            pass
        time.sleep(0.01)
    assert proc.poll() is None, "harvest finished before it could be killed: " + proc.stderr.read().decode()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = json.loads(manifest.read_text())
    assert not state["complete"] and 3 <= len(state["shards"]) < 60

    run_harvest(*args, "--resume")
    ref = tmp_path / "ref"
    run_harvest(*_args(tiny_model, ds, ref, tokens=30_000, shard_rows=500))
    assert dump_files(tmp_path / "out") == dump_files(ref)
    assert pass_id(tmp_path / "out") == state["pass_id"]


def test_rerun_of_a_complete_dump_does_nothing(tiny_model, token_dataset, tmp_path):
    out = tmp_path / "out"
    run_harvest(*_args(tiny_model, token_dataset, out))
    before = dump_files(out), pass_id(out)
    again = run_harvest(*_args(tiny_model, token_dataset, out))
    assert "nothing to do" in again.output and (dump_files(out), pass_id(out)) == before
