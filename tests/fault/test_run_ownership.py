"""Run-folder ownership at every level: `--overwrite` removes only what a run wrote, and a folder
inside a run or sweep folder (a sweep's SAE folder, a checkpoint's run while its sweep runs) has
the enclosing run as its one owner. Each case is refused in one line, and every file under the
test's folder is left byte for byte as it was (nothing removed, nothing written)."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from fault._support import error_line, invoke, ok
from shared.dump_writer import write_dump

# Slow tier: the fault suite (tests/README.md); the fast tier keeps a sample of its checks.
pytestmark = pytest.mark.slow

SAES = ["l1_coefficient_0.05", "l1_coefficient_0.2"]
TINY = ["--expansion-factor", "2", "--train-batch-size", "64", "--total-training-tokens", "512",
        "--n-checkpoints", "1", "--device", "cpu", "--eval-holdout-contexts", "8", "--quiet"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A dump, a finished single run and a finished two-SAE sweep on it, each with one checkpoint
    before final/."""
    root = tmp_path_factory.mktemp("run_ownership")
    g = torch.Generator().manual_seed(3)
    write_dump(root / "dump", torch.randn(2048, 16, generator=g), context_size=16, shard_rows=512)
    ok("train", ["--shards", root / "dump", "--checkpoint-path", root / "run", *TINY])
    ok("train", ["--shards", root / "dump", "--checkpoint-path", root / "sweep", *TINY,
                 "--sweep", "l1_coefficient=0.05,0.2"])
    return root


def checkpoint(run: Path) -> Path:
    """The run's checkpoint before final/."""
    [entry] = [e for e in json.loads((run / "checkpoints.json").read_text()) if e["folder"] != "final"]
    return run / entry["folder"]


@contextmanager
def live_lock(folder: Path) -> Iterator[None]:
    """`folder` held by a `train` that is running (a live process's pid in its lock), as while a
    sweep or a run trains there."""
    owner = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])
    try:
        (folder / "train.lock").write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname(),
                                                       "token": "0"}))
        yield
    finally:
        owner.kill()
        owner.wait()


def snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every file and link under `folder`: a file by its bytes, a link by its target."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_symlink():
            out[str(p)] = "-> " + str(p.readlink())
        elif p.is_file():
            out[str(p)] = p.read_bytes()
    return out


# Each case: (tmp folder holding copies of the built run, sweep and dump) -> the train arguments.
def overwrite_run_holding(extra: Callable[[Path], None], dump_inside: bool = False) -> Callable[[Path], list]:
    def case(tmp: Path) -> list:
        extra(tmp / "run")
        shards = tmp / "run" / "dump" if dump_inside else tmp / "dump"
        return ["--shards", shards, "--checkpoint-path", tmp / "run", *TINY, "--total-training-tokens", "1024",
                "--overwrite"]
    return case


def move_dump_inside(run: Path) -> None:
    shutil.move(run.parent / "dump", run / "dump")


def notes(where: Callable[[Path], Path]) -> Callable[[Path], None]:
    return lambda run: where(run).joinpath("notes.txt").write_text("my notes\n")


def shards_without_manifest(run: Path) -> None:
    shutil.copytree(run.parent / "dump", run / "acts")
    (run / "acts" / "manifest.json").unlink()


def loose_shard(run: Path) -> None:
    shutil.copy(next((run.parent / "dump").glob("shard_*")), run)


def overwrite_sweep_holding(extra: Callable[[Path], None]) -> Callable[[Path], list]:
    def case(tmp: Path) -> list:
        extra(tmp / "sweep")
        return ["--shards", tmp / "dump", "--checkpoint-path", tmp / "sweep", *TINY, "--total-training-tokens",
                "1024", "--overwrite", "--sweep", "l1_coefficient=0.05,0.2"]
    return case


def in_sweep(args: Callable[[Path], list], running: bool = False) -> Callable[[Path], tuple[list, Path | None]]:
    return lambda tmp: (args(tmp), tmp / "sweep" if running else None)


def resume_sae_checkpoint(tmp: Path) -> list:
    return ["--resume-from", checkpoint(tmp / "sweep" / SAES[0]), "--quiet"]


def resume_sae_folder(tmp: Path) -> list:
    return ["--resume-from", tmp / "sweep" / SAES[0], "--quiet"]


def sae_folder_overwrite(tmp: Path) -> list:
    return ["--shards", tmp / "dump", "--checkpoint-path", tmp / "sweep" / SAES[0], *TINY, "--overwrite"]


def sae_folder_not_yet_written(tmp: Path) -> list:
    """The sweep's second SAE before its folder exists (as while the first memory group trains):
    the folder holds no run, so only its sweep owns it."""
    shutil.rmtree(tmp / "sweep" / SAES[1])
    return ["--shards", tmp / "dump", "--checkpoint-path", tmp / "sweep" / SAES[1], *TINY]


def new_sweep(tmp: Path) -> list:
    return ["--shards", tmp / "dump", "--checkpoint-path", tmp / "fresh", *TINY, "--sweep", "l1_coefficient=0.05,0.2"]


def fresh_sweep_with_held_sae(tmp: Path) -> list:
    (tmp / "fresh" / SAES[0]).mkdir(parents=True)
    return new_sweep(tmp)


# name -> (arguments, and the folder a running `train` holds meanwhile, if any)
CASES: dict[str, Callable[[Path], tuple[list, Path | None]]] = {
    "overwrite-run-holding-its-dump": in_sweep(overwrite_run_holding(move_dump_inside, dump_inside=True)),
    "overwrite-run-holding-notes": in_sweep(overwrite_run_holding(notes(lambda r: r))),
    "overwrite-run-holding-shards-without-manifest": in_sweep(overwrite_run_holding(shards_without_manifest)),
    "overwrite-run-holding-a-loose-shard": in_sweep(overwrite_run_holding(loose_shard)),
    "overwrite-run-notes-in-a-checkpoint": in_sweep(overwrite_run_holding(notes(lambda r: r / "final"))),
    "overwrite-run-holding-another-run": in_sweep(overwrite_run_holding(
        lambda run: shutil.copytree(run.parent / "sweep" / SAES[1], run / "older"))),
    "overwrite-sweep-notes-in-an-sae-folder": in_sweep(overwrite_sweep_holding(notes(lambda s: s / SAES[0]))),
    "overwrite-sweep-holding-an-unlisted-folder": in_sweep(overwrite_sweep_holding(
        lambda s: shutil.copytree(s / SAES[0], s / "not_in_sweep_json"))),
    "resume-an-sae-checkpoint-of-a-sweep": in_sweep(resume_sae_checkpoint),
    "resume-an-sae-checkpoint-while-the-sweep-runs": in_sweep(resume_sae_checkpoint, running=True),
    "resume-an-sae-folder-of-a-sweep": in_sweep(resume_sae_folder),
    "resume-an-sae-folder-while-the-sweep-runs": in_sweep(resume_sae_folder, running=True),
    "overwrite-an-sae-folder-of-a-sweep": in_sweep(sae_folder_overwrite),
    "overwrite-an-sae-folder-while-the-sweep-runs": in_sweep(sae_folder_overwrite, running=True),
    "train-into-an-unwritten-sae-folder-while-the-sweep-runs": in_sweep(sae_folder_not_yet_written, running=True),
    "train-into-a-folder-inside-a-run": lambda tmp: (["--shards", tmp / "dump", "--checkpoint-path",
                                                      tmp / "run" / "inner", *TINY], None),
    "sweep-starts-while-an-sae-folder-is-held": lambda tmp: (fresh_sweep_with_held_sae(tmp), tmp / "fresh" / SAES[0]),
    "overwrite-sweep-while-an-sae-folder-is-held": lambda tmp: (overwrite_sweep_holding(lambda s: None)(tmp),
                                                                tmp / "sweep" / SAES[0]),
    "checkpoint-path-s3-url": lambda tmp: (["--shards", tmp / "dump", "--checkpoint-path", "s3://bucket/runs/r1",
                                            *TINY], None),
    "sweep-checkpoint-path-s3-url": lambda tmp: (["--shards", tmp / "dump", "--checkpoint-path",
                                                  "s3://bucket/runs/r1", *TINY, "--sweep", "l1_coefficient=0.05,0.2"],
                                                 None),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_folder_has_one_owner_and_loses_nothing(built, tmp_path, monkeypatch, name):
    for part in ("dump", "run", "sweep"):
        shutil.copytree(built / part, tmp_path / part, symlinks=True)
    monkeypatch.chdir(tmp_path)  # a URL taken for a local path would appear here
    args, held = CASES[name](tmp_path)
    before = snapshot(tmp_path)
    if held is not None:
        held.mkdir(parents=True, exist_ok=True)
        with live_lock(held):
            before = snapshot(tmp_path)
            got = invoke("train", args)
            after = snapshot(tmp_path)
    else:
        got = invoke("train", args)
        after = snapshot(tmp_path)
    line = error_line(got, strict=False)
    assert line.startswith("train: error:") and "internal error" not in line, got.describe()
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"changed despite the refusal: {changed}\n" + got.describe()


def test_an_sae_folder_of_a_sweep_points_at_what_resumes(built, tmp_path):
    """`--resume-from SWEEP/SAE` is refused with the two ways that work, and each of them does: the
    whole sweep (--resume-from SWEEP), or that SAE's checkpoint alone in a new folder."""
    for part in ("dump", "sweep"):
        shutil.copytree(built / part, tmp_path / part, symlinks=True)
    line = error_line(invoke("train", resume_sae_folder(tmp_path)), strict=False)
    ways = [way.split() for way in line.split("--resume-from ")[1:]]
    assert [way[0].rstrip(",") for way in ways] == [str(tmp_path / "sweep"), str(tmp_path / "sweep" / SAES[0] / "final")], line
    ok("train", ["--resume-from", tmp_path / "sweep", "--quiet"])
    assert ways[1][1] == "--checkpoint-path", line
    ok("train", ["--resume-from", ways[1][0], "--checkpoint-path", tmp_path / "alone", "--quiet"])
    assert (tmp_path / "alone" / "final" / "cfg.json").is_file()
