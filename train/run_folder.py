"""Who may write into a run folder: one `train` at a time, and only into its own run.

    <run>/train.lock    {"pid", "host", "token"} of the process training into the folder
                        (the name is `train.run_layout`'s)

A lock whose process is gone (killed, machine rebooted) is stale: it is reported and taken over.
Before training, the folder must not be a dump or a file, and a folder already holding another
run (a different config, or a sweep where a single run is asked, or the reverse) is refused unless
`--overwrite`, which empties it first. Resuming a folder's own checkpoint is always allowed.
"""
from __future__ import annotations

import json
import os
import secrets
import socket
from contextlib import ExitStack, contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterator

from shared import atomic
from shared.errors import UserError
from shared.manifest import MANIFEST_NAME
from train import distributed
from train.config import LanguageModelSAERunnerConfig
from train.run_layout import LOCK, RESOLVED_NAME, SINGLE, lock_path, recorded_configs

_NOT_COMPARED = {f.name for f in fields(LanguageModelSAERunnerConfig)
                 if f.metadata["group"] in ("evaluation", "logging")} | {"checkpoint_path", RESOLVED_NAME}
"""Settings that do not change what is trained: a rerun may differ in them (and the folder itself)."""


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
    log(f"--overwrite: removing the run in {folder}")
    for entry in folder.iterdir():
        if entry.name != LOCK:
            atomic.remove(entry)


@contextmanager
def own_run_folder(folder: Path, wanted: dict[str, dict[str, Any]] | None, overwrite: bool,
                   log: Callable[[str], None]) -> Iterator[None]:
    """Hold `folder` for one run while the body trains; `wanted` (the run's configs, as in
    `recorded_configs`) is checked against what the folder holds, None when resuming the folder."""
    check_target(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with RunLock(folder, log):
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
