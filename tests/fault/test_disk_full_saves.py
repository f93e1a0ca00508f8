"""The disk fills up while `train` saves a checkpoint or its final SAE, or while `evaluate`
writes eval.json or a dashboard (simulated as a real full disk behaves: the write leaves part of
its file, then fails with ENOSPC; safetensors reports it as a SafetensorError): one line saying
the disk is full and how to go on, exit 1, and no temporary file or folder left in the run."""
from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest

import shared.atomic
from conftest import write_token_dataset
from fault._support import error_line, invoke, ok
from helpers import run_harvest

pytestmark = pytest.mark.slow  # the fault suite is the slow tier (tests/README.md)

TRAIN = ["--train-batch-size", "64", "--d-sae", "64", "--total-training-tokens", "1024", "--device", "cpu",
         "--quiet", "--eval-holdout-contexts", "4"]
ENOSPC_FROM_SAFETENSORS = ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                           'message: "No space left on device" })')


@pytest.fixture(scope="module")
def dump(tiny_model, vocab_size, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("disk_full_saves")
    ds = write_token_dataset(root / "ds", n_docs=20, doc_len=100, vocab=vocab_size)
    run_harvest("--model", str(tiny_model), "--dataset", str(ds), "--out", str(root / "dump"),
                "--context-size", "16", "--tokens", "1600")
    return root / "dump"


@pytest.fixture(scope="module")
def trained(dump, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    ok("train", ["--shards", dump, "--checkpoint-path", run, *TRAIN])
    return run


def fail_safetensors(monkeypatch, name: str) -> None:
    """safetensors' save_file, except for files called `name`: half written, then ENOSPC."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def save_file(tensors, path, *args, **kwargs):
        if Path(path).name == name:
            Path(path).write_bytes(b"\0" * 64)
            raise SafetensorError(ENOSPC_FROM_SAFETENSORS)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


def fail_commit(monkeypatch, suffix: str) -> None:
    """atomic.commit of a temp file whose final name ends with `suffix`: ENOSPC, as a full disk
    gives when the last bytes are flushed (the temp file is there)."""
    real = shared.atomic.commit

    def commit(tmp, final):
        if str(final).endswith(suffix):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        return real(tmp, final)

    monkeypatch.setattr(shared.atomic, "commit", commit)


def fail_dashboard_file(monkeypatch, name: str) -> None:
    """Writing the dashboard's data file `name`: half written, then ENOSPC."""
    import train.evaluation.dashboard as dashboard

    real = dashboard._write_js

    def write_js(path, *args, **kwargs):
        if Path(path).name == name:
            Path(path).write_text("window.DASH")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(dashboard, "_write_js", write_js)


def fail_asset_copy(monkeypatch) -> None:
    """Copying the dashboard's page files: ENOSPC naming the package's own asset (as copyfile does)."""
    real = shutil.copyfile

    def copyfile(src, dst, *args, **kwargs):
        if Path(src).name == "app.js":
            raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copyfile", copyfile)


def hidden_leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if p.name != ".train.lock")


CASES = [
    pytest.param("train", lambda mp: fail_safetensors(mp, "trainer_state.safetensors"), id="checkpoint-trainer-state"),
    pytest.param("train", lambda mp: fail_safetensors(mp, "sparsity.safetensors"), id="checkpoint-sparsity"),
    pytest.param("train", lambda mp: fail_safetensors(mp, ".sae_weights.safetensors.tmp"), id="checkpoint-weights"),
    pytest.param("final", lambda mp: fail_safetensors(mp, ".sae_weights.safetensors.tmp"), id="final-weights"),
    pytest.param("evaluate", lambda mp: fail_commit(mp, "eval.json"), id="eval-json"),
    pytest.param("dashboard", lambda mp: fail_dashboard_file(mp, "index.js"), id="dashboard-data-file"),
    pytest.param("dashboard", fail_asset_copy, id="dashboard-page-files"),
]


@pytest.mark.parametrize("when, fail", CASES)
def test_a_full_disk_while_saving_is_one_line_and_leaves_nothing_half_written(dump, trained, tmp_path,
                                                                             monkeypatch, when, fail):
    if when in ("train", "final"):
        run = tmp_path / "run"
        checkpoints = ["--n-checkpoints", "1"] if when == "train" else []
        if when == "final":  # only the final save fails: the checkpoint's files are written alike
            fail(monkeypatch)
            got = invoke("train", ["--shards", dump, "--checkpoint-path", run, *TRAIN])
        else:
            fail(monkeypatch)
            got = invoke("train", ["--shards", dump, "--checkpoint-path", run, *TRAIN, *checkpoints])
        monkeypatch.undo()
        line = error_line(got, strict=False)
        assert got.code == 1 and "the disk is full" in line and "--resume-from" in line, got.describe()
        assert not (run / "final").exists()
    else:
        run = tmp_path / "copy"
        shutil.copytree(trained, run)
        fail(monkeypatch)
        extra = ["--dashboard", "--no-metrics"] if when == "dashboard" else []
        got = invoke("evaluate", [run, "--no-model", "--quiet", *extra])
        monkeypatch.undo()
        line = error_line(got, strict=False)
        assert got.code == 1 and "the disk is full" in line and "rerun" in line, got.describe()
        assert "--resume" not in line and "assets" not in line, line
    assert "internal error" not in got.stderr
    assert hidden_leftovers(run) == [], hidden_leftovers(run)
