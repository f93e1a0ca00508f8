"""Paths recorded in run folders, read back safely from any working directory.

A run folder records its dump as an absolute path (cfg.json's `shards`) and everything inside
itself by plain names relative to the folder (SAE folders of a sweep, checkpoint folders), so that
`evaluate` or `--resume-from` work from any directory and after the folder is moved. Folders
written before that recorded paths relative to the working directory of the training run; those
still resolve when read from that directory.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from shared.errors import UserError
from shared.storage import Location, location


def plain_name(name: Any, where: str) -> str:
    """`name` if it is a plain file name (no separator, not '.' or '..', not absolute); else a
    one-line error. Names read back from a run's files become paths inside the run's folder: a
    crafted one must not make a resume write, or an evaluation read, outside it."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name or Path(name).is_absolute():
        raise UserError(f"{where}: {name!r} is not a plain folder name (no '/', '..' or absolute path) "
                        "naming a folder inside the run folder; fix or restore it")
    return name


def dump_path_for(sae_folder: Path, cfg: dict[str, Any], flag: str = "--shards",
                  what: str = "dump") -> Location:
    """The dump an SAE folder was trained on, from its cfg.json (`cfg`; or a transcoder's target
    dump, from the record `cfg["target"]` with flag="--target-shards", what="target dump").

    Absolute paths are used as they are; a relative one is tried against the SAE folder, then
    against the working directory (folders written before paths were recorded absolute). A dump
    that is not found is a one-line error asking for `flag`.
    """
    recorded = cfg.get("shards")
    if not recorded:
        raise UserError(f"{sae_folder}/cfg.json names no {what}: pass {flag} DUMP_FOLDER")
    path = location(recorded)
    if not path.capabilities.folders:  # no folder to look for (a bucket prefix): used as recorded
        return path
    candidates = [path] if path.is_absolute() else [location(sae_folder) / path, path]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve() if not candidate.is_absolute() else candidate
    raise UserError(f"the {what} {recorded} that {sae_folder} was trained on was not found (moved or "
                    f"deleted?): pass {flag} DUMP_FOLDER")


def dump_list(value: str | None) -> list[str]:
    """The dumps a `shards` or `target_shards` value names: one path, or several separated by
    commas (the hooks a crosscoder or a cross-layer transcoder concatenates, in order)."""
    if not value:
        return []
    parts = [p.strip() for p in str(value).split(",")]
    if any(not p for p in parts):
        raise UserError(f"{value!r}: an empty dump path in the list; separate dump folders with single commas")
    return parts


def dump_list_for(sae_folder: Path, recorded: str, flag: str = "--shards", what: str = "dump") -> str:
    """`dump_path_for` for each dump of a recorded list, joined again by commas."""
    return ",".join(str(dump_path_for(sae_folder, {"shards": p}, flag, what)) for p in dump_list(recorded))
