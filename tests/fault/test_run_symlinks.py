"""Symlinks in run folders: a run folder holds only the files its run wrote, so a link anywhere in
it (a checkpoint folder, one of its files, config.json, metrics.jsonl, an SAE folder of a sweep),
or a --resume-from that is itself a link, is refused by name, never followed: a resume would
continue in, and --overwrite remove, the link's target outside the folder. Each case is refused
in one line, and nothing under the test's folder changes (the targets least of all)."""
from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from fault._support import error_line, invoke
from fault.test_run_ownership import SAES, TINY, built, checkpoint, snapshot  # noqa: F401 (the fixture)

# Slow tier: the fault suite (tests/README.md); the fast tier keeps a sample of its checks.
pytestmark = pytest.mark.slow


def link_to_outside(where: Callable[[Path], Path]) -> Callable[[Path], None]:
    """Replace the file or folder `where(tmp)` by a link to a copy of it outside the run folders."""
    def apply(tmp: Path) -> None:
        path = where(tmp)
        outside = tmp / "outside" / path.name
        outside.parent.mkdir(exist_ok=True)
        shutil.move(path, outside)
        path.symlink_to(outside, target_is_directory=outside.is_dir())
    return apply


def resume_run(tmp: Path) -> list:
    return ["--resume-from", checkpoint(tmp / "run"), "--quiet"]


def resume_sweep(tmp: Path) -> list:
    return ["--resume-from", tmp / "sweep", "--quiet"]


def resume_through_a_link(tmp: Path) -> list:
    (tmp / "elsewhere").mkdir()
    link = tmp / "elsewhere" / "ckpt"
    link.symlink_to(checkpoint(tmp / "run"), target_is_directory=True)
    return ["--resume-from", link, "--quiet"]


def overwrite_run(tmp: Path) -> list:
    return ["--shards", tmp / "dump", "--checkpoint-path", tmp / "run", *TINY, "--total-training-tokens", "1024",
            "--overwrite"]


def checkpoint_file(name: str) -> Callable[[Path], Path]:
    return lambda tmp: checkpoint(tmp / "run") / name


def linked_folder(tmp: Path) -> None:
    (tmp / "data").mkdir()
    (tmp / "data" / "keep.txt").write_text("keep\n")
    (tmp / "run" / "data").symlink_to(tmp / "data", target_is_directory=True)


# name -> (the damage, the train arguments)
CASES: dict[str, tuple[Callable[[Path], None], Callable[[Path], list]]] = {
    "resume-from-a-link-to-a-checkpoint": (lambda tmp: None, resume_through_a_link),
    "resume-a-checkpoint-folder-that-is-a-link": (link_to_outside(lambda tmp: checkpoint(tmp / "run")),
                                                  resume_run),
    "resume-trainer-state-json-a-link": (link_to_outside(checkpoint_file("trainer_state.json")), resume_run),
    "resume-trainer-state-tensors-a-link": (link_to_outside(checkpoint_file("trainer_state.safetensors")),
                                            resume_run),
    "resume-config-json-a-link": (link_to_outside(lambda tmp: tmp / "run" / "config.json"), resume_run),
    "resume-metrics-jsonl-a-link": (link_to_outside(lambda tmp: tmp / "run" / "metrics.jsonl"), resume_run),
    "resume-checkpoints-json-a-link": (link_to_outside(lambda tmp: tmp / "run" / "checkpoints.json"), resume_run),
    "resume-final-a-link": (link_to_outside(lambda tmp: tmp / "run" / "final"), resume_run),
    "resume-sweep-sae-folder-a-link": (link_to_outside(lambda tmp: tmp / "sweep" / SAES[0]), resume_sweep),
    "resume-sweep-sae-weights-a-link": (link_to_outside(
        lambda tmp: checkpoint(tmp / "sweep" / SAES[0]) / "sae_weights.safetensors"), resume_sweep),
    "overwrite-run-holding-a-linked-folder": (linked_folder, overwrite_run),
    "overwrite-run-whose-final-is-a-link": (link_to_outside(lambda tmp: tmp / "run" / "final"), overwrite_run),
}


@pytest.mark.parametrize("name", list(CASES))
def test_a_symlink_in_a_run_folder_is_refused_by_name(built, tmp_path, name):  # noqa: F811
    for part in ("dump", "run", "sweep"):
        shutil.copytree(built / part, tmp_path / part, symlinks=True)
    damage, args = CASES[name]
    damage(tmp_path)
    argv = args(tmp_path)
    before = snapshot(tmp_path)
    got = invoke("train", argv)
    line = error_line(got, strict=False)
    assert line.startswith("train: error:") and "internal error" not in line, got.describe()
    assert "symlink" in line, "not refused for the link\n" + got.describe()
    after = snapshot(tmp_path)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"changed despite the refusal: {changed}\n" + got.describe()


def outside_copy(tmp: Path, path: Path, make: Callable[[Path], None]) -> None:
    """`path` a link to `outside/<name>`: what `path` held moved there, or else made there by `make`."""
    outside = tmp / "outside" / path.name
    outside.parent.mkdir(exist_ok=True)
    if path.exists():
        shutil.move(path, outside)
    else:
        make(outside)
    path.symlink_to(outside, target_is_directory=outside.is_dir())


def a_dashboard(folder: Path) -> None:
    (folder / "data").mkdir(parents=True)
    (folder / "index.html").write_text("<p>mine</p>\n")
    (folder / "data" / "meta.js").write_text("DASH.meta = {};\n")


def a_page(folder: Path) -> None:
    folder.write_text("<p>mine</p>\n")


def eval_json(folder: Path) -> None:
    folder.write_text("{}\n")


# name -> (the link made in the copies of the built run and sweep, the evaluate arguments); each
# with --no-model, so that nothing would need the network had the link gone unnoticed.
EVALUATE: dict[str, tuple[Callable[[Path], None], Callable[[Path], list]]] = {
    "evaluate-eval-json-a-link": (lambda tmp: outside_copy(tmp, tmp / "run" / "eval.json", eval_json),
                                  lambda tmp: [tmp / "run", "--no-model", "--quiet"]),
    "evaluate-sweep-sae-eval-json-a-link": (
        lambda tmp: outside_copy(tmp, tmp / "sweep" / SAES[1] / "eval.json", eval_json),
        lambda tmp: [tmp / "sweep", "--no-model", "--quiet"]),
    "evaluate-sweep-summary-a-link": (lambda tmp: outside_copy(tmp, tmp / "sweep" / "summary.csv", eval_json),
                                      lambda tmp: [tmp / "sweep", "--no-model", "--quiet"]),
    "evaluate-dashboard-folder-a-link": (lambda tmp: outside_copy(tmp, tmp / "run" / "dashboard", a_dashboard),
                                         lambda tmp: [tmp / "run", "--no-model", "--no-metrics", "--dashboard",
                                                      "--quiet"]),
    "evaluate-dashboard-page-a-link": (
        lambda tmp: (a_dashboard(tmp / "run" / "dashboard"), (tmp / "run" / "dashboard" / "index.html").unlink(),
                     outside_copy(tmp, tmp / "run" / "dashboard" / "index.html", a_page)),
        lambda tmp: [tmp / "run", "--no-model", "--dashboard", "--quiet"]),
    "evaluate-dashboard-data-folder-a-link": (
        lambda tmp: ((tmp / "run" / "dashboard").mkdir(), outside_copy(tmp, tmp / "run" / "dashboard" / "data",
                                                                       lambda d: a_dashboard(d))),
        lambda tmp: [tmp / "run", "--no-model", "--no-metrics", "--dashboard", "--quiet"]),
}


@pytest.mark.parametrize("name", list(EVALUATE))
def test_evaluate_writes_nothing_through_a_symlink(built, tmp_path, name):  # noqa: F811
    """eval.json, the dashboard (the folder, a page, a folder in it) and a sweep's summary are
    written in the run or sweep folder itself: a link there is refused by name before any work."""
    for part in ("dump", "run", "sweep"):
        shutil.copytree(built / part, tmp_path / part, symlinks=True)
    damage, args = EVALUATE[name]
    damage(tmp_path)
    before = snapshot(tmp_path)
    got = invoke("evaluate", args(tmp_path))
    line = error_line(got, strict=False)
    assert line.startswith("evaluate: error:") and "internal error" not in line, got.describe()
    assert "symlink" in line, "not refused for the link\n" + got.describe()
    after = snapshot(tmp_path)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"changed despite the refusal: {changed}\n" + got.describe()
