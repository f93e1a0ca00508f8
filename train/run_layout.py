"""The layout of run and sweep folders: every name they hold, and the read and write of their files.

A single run (`train`) keeps its files directly in its folder:

    <run>/
        config.json          the run's training config, plus `resolved_run_name`
        metrics.jsonl        one JSON line per log step and per density histogram (train.metrics_log)
        checkpoints.json     [{folder, step, tokens}] of its checkpoints, oldest first
        <tokens seen>/       a checkpoint (train.checkpoint), e.g. 1228800/
        final/               the last checkpoint
        eval.json            held-out metrics of final/ (`evaluate`, or `evaluate_at_end`)
        dashboard/           `evaluate --dashboard`'s pages (train.evaluation.dashboard)
        train.lock           the process training into the folder (train.run_folder)

A sweep keeps an index and one such run folder per SAE, without their own lock:

    <sweep>/
        sweep.json           {"keys": [...], "runs": [{"name", "folder", "settings", "config"}]}
        <SAE name>/          a run folder as above
        train.lock
        summary.csv, summary.json, plots.json and the PNG plots (train.summary)

Inside a checkpoint folder, cfg.json and sae_weights.safetensors are the SAE's own files
(`shared.saes.base`); sparsity.safetensors and the two trainer_state files are `train.checkpoint`'s.
Every name inside a run folder is recorded relative to it, so a moved folder still reads.

Nothing else belongs in a run folder: `foreign_entries` names what a run of this tool did not
write (a dump, a user's files, a symlink), which `--overwrite` refuses to remove. The names above
are the whole index, so it needs no file of its own that a crash could leave half-written, and
folders written by earlier versions (the same names) are recognised as they are.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared import atomic
from shared.errors import UserError
from shared.manifest import MANIFEST_NAME
from shared.run_paths import plain_name
from shared.saes.base import CFG_NAME, WEIGHTS_NAME

CONFIG = "config.json"
METRICS = "metrics.jsonl"
CHECKPOINT_INDEX = "checkpoints.json"
FINAL = "final"
EVAL = "eval.json"
DASHBOARD = "dashboard"
LOCK = "train.lock"
SWEEP_INDEX = "sweep.json"
"""The sweep's own index of its SAEs (folders are never listed): each SAE's folder is named by
`folder`, relative to the sweep folder (always its name), so a moved sweep still finds its SAEs;
`config` is the SAE's whole training config, so a sweep stopped before any SAE folder was written
still resumes."""

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
SPARSITY = "sparsity.safetensors"

SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
PLOTS_INDEX = "plots.json"  # which SAEs each plot shows
FRONTIER_EV = "frontier_l0_ev.png"
FRONTIER_CE = "frontier_l0_ce.png"
FRONTIER_KL = "frontier_l0_kl.png"
FRONTIER_ABSORPTION = "frontier_l0_absorption.png"  # with `evaluate --absorption`
DENSITY_PLOT = "feature_density.png"
CURVES_PLOT = "loss_curves.png"
PLOTS = (FRONTIER_EV, FRONTIER_CE, FRONTIER_KL, FRONTIER_ABSORPTION, DENSITY_PLOT, CURVES_PLOT)

RUN_FILES = (CONFIG, CHECKPOINT_INDEX, SWEEP_INDEX, METRICS)
"""Files whose presence means a folder already holds a run (or a sweep)."""
SINGLE = ""
"""The key of a single run's config in `recorded_configs`."""
RESOLVED_NAME = "resolved_run_name"  # what config.json adds to the training config


# ---- one run's folder ----------------------------------------------------------------------------

def default_folder(name: str) -> Path:
    """Where a run (or sweep) goes without --checkpoint-path: data/runs/<its name>, relative."""
    return Path("data") / "runs" / plain_name(name, "run_name")


def sae_folder(folder: Path, name: str, sweep: bool) -> Path:
    """Where one SAE's run files go: the folder itself for a single run, <sweep>/<name> in a sweep."""
    return Path(folder) / name if sweep else Path(folder)


def checkpoint_folder(run_dir: Path, tokens_seen: int) -> Path:
    """A checkpoint taken during training, named by the tokens seen so far."""
    return Path(run_dir) / str(tokens_seen)


def final_folder(run_dir: Path) -> Path:
    return Path(run_dir) / FINAL


def metrics_path(run_dir: Path) -> Path:
    return Path(run_dir) / METRICS


def lock_path(folder: Path) -> Path:
    return Path(folder) / LOCK


def dashboard_folder(run_dir: Path) -> Path:
    return Path(run_dir) / DASHBOARD


def write_run_config(run_dir: Path, config: dict[str, Any], name: str) -> None:
    """config.json: the training config and the run's resolved name."""
    atomic.write_json(Path(run_dir) / CONFIG, config | {RESOLVED_NAME: name})


def read_run_config(run_dir: Path) -> dict[str, Any] | None:
    """config.json as written (with `resolved_run_name`), or None if the run has none yet."""
    path = Path(run_dir) / CONFIG
    return json.loads(path.read_text()) if path.is_file() else None


def has_run_files(run_dir: Path) -> bool:
    """Whether training has started writing into `run_dir` (its config or its metrics)."""
    return (Path(run_dir) / CONFIG).is_file() or metrics_path(run_dir).is_file()


def write_eval(run_dir: Path, result: dict[str, Any]) -> None:
    atomic.write_json(Path(run_dir) / EVAL, result)


def read_eval(run_dir: Path) -> dict[str, Any] | None:
    """eval.json, or None if the run was never evaluated (a damaged file raises ValueError)."""
    path = Path(run_dir) / EVAL
    return json.loads(path.read_text()) if path.is_file() else None


# ---- checkpoints.json ----------------------------------------------------------------------------

def read_checkpoint_index(run_dir: Path) -> list[dict[str, Any]]:
    """[{folder, step, tokens}] of a run's checkpoints, oldest first ([] if none yet); each folder
    a plain name inside the run folder."""
    path = Path(run_dir) / CHECKPOINT_INDEX
    if not path.is_file():
        return []
    try:
        entries = json.loads(path.read_text())
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise TypeError("not a list of checkpoint entries")
        for e in entries:
            for key in ("step", "tokens"):  # a count: no bool (an int in Python), nothing negative
                value = e.get(key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise TypeError(f"entry {e} lacks a non-negative integer {key}")
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); restore it or start the run again") from None
    for e in entries:
        plain_name(e.get("folder"), str(path))
    return entries


def record_checkpoint(checkpoint: Path, step: int, tokens: int) -> None:
    """Add (or replace) `checkpoint` in its run's checkpoints.json, so resuming never lists folders."""
    run_dir = Path(checkpoint).parent
    entries = [e for e in read_checkpoint_index(run_dir) if e["folder"] != checkpoint.name]
    entries.append({"folder": checkpoint.name, "step": step, "tokens": tokens})
    atomic.write_json(run_dir / CHECKPOINT_INDEX, sorted(entries, key=lambda e: (e["step"], e["folder"])))


# ---- sweep.json ----------------------------------------------------------------------------------

@dataclass
class SweepEntry:
    """One SAE of a sweep: where it lives and its swept settings."""

    name: str
    run_dir: Path
    settings: dict[str, Any]

    @property
    def final(self) -> Path:
        return final_folder(self.run_dir)


def is_sweep(folder: Path) -> bool:
    return (Path(folder) / SWEEP_INDEX).is_file()


def sweep_index_path(folder: Path) -> Path:
    return Path(folder) / SWEEP_INDEX


def write_sweep_index(root: Path, entries: list[SweepEntry], keys: list[str],
                      configs: dict[str, dict[str, Any]] | None = None) -> None:
    runs = [{"name": e.name, "folder": e.run_dir.name, "settings": e.settings}
            | ({"config": configs[e.name]} if configs else {}) for e in entries]
    atomic.write_json(Path(root) / SWEEP_INDEX, {"keys": keys, "runs": runs})


def read_sweep_runs(root: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """sweep.json's run entries, each name checked to be a plain folder name, and its keys."""
    path = Path(root) / SWEEP_INDEX
    try:
        raw = json.loads(path.read_text())
        runs, keys = raw["runs"], raw["keys"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); restore it or start the sweep again") from None
    if not isinstance(runs, list) or not runs or not all(isinstance(r, dict) for r in runs):
        raise UserError(f"{path} lists no SAEs; restore it or start the sweep again")
    for r in runs:
        plain_name(r.get("name"), str(path))
    return runs, keys


def read_sweep_index(root: Path) -> tuple[list[SweepEntry], list[str]]:
    """The sweep's SAEs, each in <root>/<its name> wherever the sweep folder now is (sweeps written
    before recorded `folder` relative to the working directory of the run: not used)."""
    runs, keys = read_sweep_runs(root)
    return [SweepEntry(r["name"], Path(root) / r["name"], r["settings"]) for r in runs], keys


def read_sweep_configs(root: Path) -> dict[str, dict[str, Any] | None]:
    """Each SAE's training config: from sweep.json, else (sweeps written before it held them) from
    the SAE's config.json; None where neither exists yet."""
    runs, _ = read_sweep_runs(root)
    out: dict[str, dict[str, Any] | None] = {}
    for r in runs:
        raw = r.get("config") or read_run_config(Path(root) / r["name"])
        if raw is not None:
            raw = {k: v for k, v in raw.items() if k != RESOLVED_NAME}
        out[r["name"]] = raw
    return out


# ---- what a folder holds -------------------------------------------------------------------------

def recorded_configs(folder: Path) -> dict[str, dict[str, Any] | None] | None:
    """The configs a folder's run recorded: {SINGLE: cfg} for a single run, {name: cfg or None}
    for a sweep's SAEs; None if the folder holds no run."""
    folder = Path(folder)
    if is_sweep(folder):
        return read_sweep_configs(folder)
    config = read_run_config(folder)
    if config is not None:
        return {SINGLE: config}
    if any((folder / name).exists() for name in RUN_FILES):
        return {SINGLE: None}
    return None


def as_recorded(configs: dict[str, dict[str, Any]], sweep: bool) -> dict[str, dict[str, Any]]:
    """SAE configs by name in the form `recorded_configs` reads them back: a single run's under SINGLE."""
    if sweep:
        return dict(configs)
    [config] = configs.values()
    return {SINGLE: config}


# ---- what a run writes, and what else a folder holds ---------------------------------------------

CHECKPOINT_FILES = (CFG_NAME, WEIGHTS_NAME, SPARSITY, STATE_JSON, STATE_TENSORS)
"""Every file of a checkpoint folder (the first two are the SAE's own, `shared.saes.base`)."""
RUN_ENTRIES = (CONFIG, METRICS, CHECKPOINT_INDEX, EVAL, LOCK)
SWEEP_ENTRIES = (SWEEP_INDEX, LOCK, SUMMARY_CSV, SUMMARY_JSON, PLOTS_INDEX, *PLOTS)
_CHECKPOINT_NAME = re.compile(r"[0-9]+")  # <tokens seen>/


def _is_temp(name: str, finals: tuple[str, ...]) -> bool:
    """A file being written beside one of its final names: `.NAME.tmp` (`shared.atomic`), the
    lock's `.train.lock.<pid>.<random>`, the dashboard's `.dashboard.<random>` folder."""
    return name.startswith(".") and any(name[1:].startswith(final + ".") for final in finals)


def _is_checkpoint_name(name: str) -> bool:
    """`<tokens seen>`, `final`, or either being written (`.<name>.tmp`, `train.checkpoint`)."""
    if name.startswith(".") and name.endswith(".tmp"):
        name = name[1:-len(".tmp")]
    return name == FINAL or _CHECKPOINT_NAME.fullmatch(name) is not None


def _sorted_entries(folder: Path) -> list[os.DirEntry]:
    with os.scandir(folder) as it:
        return sorted(it, key=lambda e: e.name)


def _foreign_in_checkpoint(folder: Path, where: str) -> list[str]:
    return [f"{where}/{e.name}" for e in _sorted_entries(folder)
            if e.is_symlink() or not e.is_file()
            or not (e.name in CHECKPOINT_FILES or _is_temp(e.name, CHECKPOINT_FILES))]


def _foreign_in_tree(folder: Path, where: str) -> list[str]:
    """Symlinks, and a dump's manifest, anywhere below `folder`: the dashboard's own files are
    the dashboard's (`train.evaluation.dashboard`, which replaces the folder whole)."""
    out = []
    for root, dirs, files in os.walk(folder):
        for name in sorted(dirs + files):
            path = Path(root) / name
            if path.is_symlink() or name == MANIFEST_NAME:
                out.append(f"{where}/{path.relative_to(folder).as_posix()}")
    return out


def _foreign_in_run(folder: Path, prefix: str = "") -> list[str]:
    """What a single run's folder holds that a run does not write, named relative to the folder
    the check started from (`prefix`: the SAE folder's name in a sweep)."""
    out = []
    for e in _sorted_entries(folder):
        where = prefix + e.name
        if e.is_symlink():
            out.append(where)
        elif e.name in RUN_ENTRIES or _is_temp(e.name, RUN_ENTRIES):
            out += [] if e.is_file() else [where]
        elif e.name == DASHBOARD or _is_temp(e.name, (DASHBOARD,)):
            out += _foreign_in_tree(Path(e.path), where) if e.is_dir() else [where]
        elif _is_checkpoint_name(e.name):
            out += _foreign_in_checkpoint(Path(e.path), where) if e.is_dir() else [where]
        else:
            out.append(where)
    return out


def foreign_entries(folder: Path) -> list[str]:
    """Everything in a run or sweep folder that no run of this tool writes (names relative to
    `folder`, in order; [] when it holds only a run's files): another file or folder, a symlink
    (never followed), a dump's manifest, a folder of shards. In a sweep, only the SAE folders its
    sweep.json lists belong to it."""
    folder = Path(folder)
    if not is_sweep(folder):
        return _foreign_in_run(folder)
    saes = {r["name"] for r in read_sweep_runs(folder)[0]}
    out = []
    for e in _sorted_entries(folder):
        if e.is_symlink():
            out.append(e.name)
        elif e.name in saes and e.is_dir():
            out += _foreign_in_run(Path(e.path), e.name + "/")
        elif not ((e.name in SWEEP_ENTRIES or _is_temp(e.name, SWEEP_ENTRIES)) and e.is_file()):
            out.append(e.name)
    return out


def is_run_folder(folder: Path) -> bool:
    """Whether `folder` is (or was) a run or sweep folder of this tool: its sweep index, its lock,
    or a config.json this tool wrote (`resolved_run_name`); a user's own config.json is not."""
    folder = Path(folder)
    if is_sweep(folder) or lock_path(folder).is_file():
        return True
    try:
        config = read_run_config(folder)
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(config, dict) and RESOLVED_NAME in config
