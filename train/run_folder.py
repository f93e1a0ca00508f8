"""Who may write into a run folder: one `train` at a time, and only into its own run.

    <run>/train.lock    {"pid", "host", "token"} of the process training into the folder
                        (the name is `train.run_layout`'s)

A lock whose process is gone (killed, machine rebooted) is stale: it is reported and taken over.
Before training, the folder must be local (not s3://...), not a dump or a file, not inside another
run or sweep folder (a sweep's SAE folders are the sweep's), hold no folder that another `train`
holds, and hold no symlinks (they are refused by name, never followed). A
folder already holding another run (a different config, or a sweep where a single run is asked, or
the reverse) is refused unless `--overwrite`, which removes the run's files, and only when the
folder holds nothing else (`run_layout.foreign_entries`). Resuming a folder's own checkpoint is
always allowed.

The checks that involve another folder run twice: before the folder is created, and again once
its lock is held. A run and a sweep around it each take their lock before looking for the other's,
so whichever comes second sees the first.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
from contextlib import ExitStack, contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterator

from shared.errors import UserError
from shared.manifest import MANIFEST_NAME
from train import distributed
from train.config import LanguageModelSAERunnerConfig
from train.run_layout import (LOCK, RESOLVED_NAME, SINGLE, foreign_entries, is_run_folder, is_sweep,
                              lock_path, recorded_configs)

_NOT_COMPARED = {f.name for f in fields(LanguageModelSAERunnerConfig)
                 if f.metadata["group"] in ("evaluation", "logging")} | {"checkpoint_path", RESOLVED_NAME}
"""Settings that do not change what is trained: a rerun may differ in them (and the folder itself)."""

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SHOWN = 3  # names a refusal lists


def check_local(path: str | Path, flag: str = "--checkpoint-path") -> None:
    """Run folders are local: a lock, renames and appends need a file system (dumps may be in a
    bucket). Checked on the text: `Path("s3://b/r")` would be the local folder `s3:/b/r`."""
    if _URL.match(str(path)):
        raise UserError(f"{flag} {path}: run folders are local folders (only dumps may be in object "
                        "storage): pass a local folder, e.g. data/runs/<name>")


def _shown(names: list[str]) -> str:
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _is_run_folder(folder: Path) -> bool:
    try:
        return is_run_folder(folder)
    except OSError:  # an unreadable folder above: nothing of ours
        return False


def check_enclosing(folder: Path) -> None:
    """One owner at every level: a folder inside a run or sweep folder belongs to that run, whose
    lock does not cover it. `folder` is absolute."""
    for above in folder.parents:
        if not _is_run_folder(above):
            continue
        if is_sweep(above):
            raise UserError(f"{folder} is inside the sweep {above}, whose SAE folders belong to it: continue "
                            f"the whole sweep with --resume-from {above}, or train into a folder outside it "
                            "(--checkpoint-path NEW_FOLDER)")
        raise UserError(f"{folder} is inside the run folder {above}: pass a --checkpoint-path outside it")


def _held_below(folder: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(folder, holder) of every live lock below `folder` (its own lock not included)."""
    out = []
    for root, _dirs, files in os.walk(folder):
        if Path(root) != folder and LOCK in files:
            text = _read(Path(root) / LOCK)
            holder = _parse(text) if text is not None else {}
            if text is not None and _alive(holder):
                out.append((Path(root), holder))
    return out


def check_nothing_held_below(folder: Path) -> None:
    """A folder inside this one held by another `train` (an SAE folder trained alone while the
    sweep starts) must not be written into, or removed, by this run."""
    held = _held_below(folder)
    if held:
        below, holder = held[0]
        raise UserError(f"{below} is in use by another train (pid {holder.get('pid')} on {holder.get('host')}): "
                        f"wait for it to finish before training into {folder}; if no such process runs, "
                        f"delete {below / LOCK}")


def _symlinks(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        out += sorted((Path(root) / n).relative_to(folder).as_posix() for n in dirs + files
                      if (Path(root) / n).is_symlink())
    return out


def check_no_symlinks(folder: Path) -> None:
    """A run folder holds only what its run wrote: a link would make a resume, or --overwrite,
    read or remove files outside it."""
    links = _symlinks(folder)
    if links:
        raise UserError(f"{folder} holds symlinks ({_shown(links)}): a run folder holds only the files its "
                        "run wrote; replace each link with what it points to, or pass another --checkpoint-path")


def check_checkpoint_not_linked(checkpoint: Path) -> None:
    """--resume-from continues in the checkpoint's own run folder: through a link that would be
    the target's folder, named by another."""
    if Path(checkpoint).is_symlink():
        raise UserError(f"--resume-from {checkpoint} is a symlink (to {os.readlink(checkpoint)}): resume "
                        "from the checkpoint in its own run folder")


def check_target(folder: Path) -> None:
    """A run folder may not be a file or a dump: training there would mix a run into them."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--checkpoint-path {folder} is a file: pass a folder for the run")
    if (folder / MANIFEST_NAME).exists():
        raise UserError(f"--checkpoint-path {folder} holds a dump ({MANIFEST_NAME}): pass another folder "
                        "for the run, e.g. data/runs/<name>")


class RunLock:
    """Exclusive ownership of a folder by this process, as a lock file created atomically."""

    def __init__(self, folder: Path, log: Callable[[str], None]):
        self.path = lock_path(folder)
        self.log = log
        self.mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "token": secrets.token_hex(8)})

    def __enter__(self) -> "RunLock":
        for _ in range(5):  # each round either creates the lock, fails, or removes a stale one
            if self._create():
                return self
            text = _read(self.path)
            if text is None:  # released between our try and our read
                continue
            holder = _parse(text)
            if _alive(holder):
                raise UserError(f"{self.path.parent} is in use by another train (pid {holder.get('pid')} on "
                                f"{holder.get('host')}): wait for it to finish or pass another --checkpoint-path; "
                                f"if no such process runs, delete {self.path}")
            self.log(f"train: taking over the stale lock {self.path} of pid {holder.get('pid')}, which no "
                     "longer runs")
            self._remove_if_unchanged(text)
        raise UserError(f"could not lock {self.path.parent}: other processes keep taking it; try again")

    def __exit__(self, *exc: Any) -> None:
        if _read(self.path) == self.mine:
            self.path.unlink(missing_ok=True)

    def _create(self) -> bool:
        """Write our lock beside, then hard-link it into place: link never replaces an existing
        file, and the lock appears with its content (no half-written lock to misread)."""
        tmp = self.path.with_name(f".{LOCK}.{os.getpid()}.{secrets.token_hex(4)}")
        tmp.write_text(self.mine)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _remove_if_unchanged(self, stale: str) -> None:
        """Move the stale lock aside (atomic: one process wins); if what was moved is not the
        stale lock (a racer took it over first), put it back."""
        aside = self.path.with_name(f".{LOCK}.stale.{os.getpid()}.{secrets.token_hex(4)}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read(aside) != stale:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _parse(text: str) -> dict[str, Any]:
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the lock's process may still run; one on another host cannot be checked, so it is."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False  # unreadable: no process can be holding it
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in cfg.items() if k not in _NOT_COMPARED}


def check_same_run(folder: Path, wanted: dict[str, dict[str, Any]], overwrite: bool,
                   log: Callable[[str], None]) -> None:
    """Refuse a folder holding another run, or (with overwrite) empty it for this one."""
    recorded = recorded_configs(folder)
    if recorded is None:
        return
    same = set(recorded) == set(wanted) and all(
        recorded[k] is not None and comparable(recorded[k]) == comparable(wanted[k]) for k in wanted)
    if same:
        return
    if not overwrite:
        what = "a sweep" if SINGLE not in recorded else "another run"
        raise UserError(f"{folder} holds {what} with other settings: pass another --checkpoint-path, "
                        "--resume-from one of its checkpoints, or --overwrite to replace it")
    found = foreign_entries(folder)
    if found:
        raise UserError(f"--overwrite: {folder} holds what no run of this tool writes ({_shown(found)}); "
                        "nothing was removed: move those out of it, or pass another --checkpoint-path")
    log(f"--overwrite: removing the run in {folder}")
    for entry in sorted(folder.iterdir()):
        if entry.name != LOCK:
            _remove(entry)


def _remove(entry: Path) -> None:
    """A run's file or folder (checked by `foreign_entries`: no links among them)."""
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry)
    else:
        entry.unlink(missing_ok=True)


@contextmanager
def own_run_folder(folder: Path, wanted: dict[str, dict[str, Any]] | None, overwrite: bool,
                   log: Callable[[str], None]) -> Iterator[None]:
    """Hold `folder` for one run while the body trains; `wanted` (the run's configs, as in
    `recorded_configs`) is checked against what the folder holds, None when resuming the folder."""
    folder = Path(folder).resolve()
    check_target(folder)
    check_enclosing(folder)  # before anything is created for a folder that is refused
    folder.mkdir(parents=True, exist_ok=True)
    with RunLock(folder, log):
        check_enclosing(folder)  # again, now that our lock is there for an enclosing sweep to see
        check_nothing_held_below(folder)
        check_no_symlinks(folder)
        if wanted is not None:
            check_same_run(folder, wanted, overwrite, log)
        yield


@contextmanager
def hold_run_folder(folder: Path, wanted: dict[str, dict[str, Any]] | None, overwrite: bool,
                    log: Callable[[str], None]) -> Iterator[None]:
    """`own_run_folder` for every process of the training: under torchrun rank 0 holds the folder
    (only it writes the run's own files), and the other ranks start once it does (or stop, with
    one line, if it cannot) instead of waiting for it at the first collective."""
    parallel = distributed.current()
    with ExitStack() as stack:
        distributed.agree(parallel.ranks, lambda: stack.enter_context(own_run_folder(folder, wanted, overwrite, log))
                          if parallel.lead else None)
        yield
