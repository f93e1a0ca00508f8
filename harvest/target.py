"""Where a harvest writes, and what to do with what is already there (fresh, resume, refuse)."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from shared import atomic
from shared.errors import DumpError, UserError
from shared.manifest import MANIFEST_NAME, Manifest, read_manifest, shard_name
from shared.models import default_dump_folder, short_model_name
from shared.storage import Location, location


def out_folders(out: str | None, model: str, hooks: list[str]) -> dict[str, Location]:
    """One hook -> data/{model}_l{layer}; several -> data/{model}/{hook} (or under --out, which
    may be an object-storage prefix s3://bucket/prefix)."""
    short = short_model_name(model)
    if len(hooks) == 1:
        return {hooks[0]: location(out if out is not None else default_dump_folder(model, hooks[0]))}
    root = location(out if out is not None else Path("data") / short)
    return {h: root / h for h in hooks}


@dataclass
class Existing:
    """What a hook folder holds before this harvest: nothing, a dump to resume, or a finished one."""

    manifest: Manifest | None
    done: bool


_SHARD_TEMP = re.compile(r"\.shard_\d{6}\.(safetensors|zarr)\.tmp")


def _only_leftovers(folder: Path) -> bool:
    """Only the temp files of a harvest that stopped before its first manifest landed."""
    manifest_temp = atomic.temp_path(folder / MANIFEST_NAME).name
    return all(p.name == manifest_temp or _SHARD_TEMP.fullmatch(p.name) for p in folder.iterdir())


def _looks_like_dump(folder: Location) -> bool:
    """A manifest.json harvest could have written, valid or not: --overwrite may delete it."""
    try:
        raw = json.loads((folder / MANIFEST_NAME).get_bytes() or b"")
    except (OSError, ValueError):
        return False
    return isinstance(raw, dict) and "format_version" in raw and "shards" in raw


def _start_afresh(folder: Path, resume: bool, overwrite: bool) -> Existing:
    """A folder holding only crash leftovers: nothing to resume, so both flags start again."""
    if not (resume or overwrite):
        raise UserError(f"{folder} holds only the temp files of a harvest that stopped before "
                        "writing its manifest; pass --overwrite (or --resume) to start it again")
    for p in folder.iterdir():
        atomic.remove(p)
    return Existing(None, False)


_SHARD_OBJECT = re.compile(r"shard_\d{6}\.zarr/.+")
_ENTRY_OBJECT = re.compile(r"\.harvest-shards/\d{6}\.json")  # a harvest split over processes


def _shards_with_entries(folder: Location, names: list[str]) -> set[str]:
    """Shards that ranks of a harvest split over processes finished (each recorded by an entry
    object after its shard was written whole): a resume keeps them."""
    kept = set()
    for n in names:
        if _ENTRY_OBJECT.fullmatch(n):
            try:
                kept.add(json.loads((folder / n).get_bytes() or b"")["file"])
            except (ValueError, KeyError, TypeError):
                continue  # unreadable: the shard is done again
    return kept


def _existing_dump(folder: Location, config_fingerprint: str, resume: bool) -> Manifest:
    """The dump's manifest if it is this harvest's (complete, or interrupted and resumed); else a
    one-line error saying what to do."""
    try:
        old = read_manifest(folder)
    except DumpError as e:  # harvest's way to re-harvest is --overwrite: say so
        raise DumpError(f"{e} (harvest --overwrite replaces it)") from None
    if old.config_fingerprint != config_fingerprint:
        raise UserError(f"{folder} holds a different dump ({old.model}, {old.hook}, "
                        f"{old.n_contexts or 'unfinished'} contexts, other settings); "
                        "pass --overwrite to replace it, or another --out")
    if not (old.complete or resume):
        raise UserError(f"{folder} holds an interrupted harvest with these settings; "
                        "pass --resume to continue it, or --overwrite to start again")
    return old


def _inspect_prefix(folder: Location, config_fingerprint: str, resume: bool, overwrite: bool) -> Existing:
    """inspect_folder without folders (object storage): the same decisions, on the objects under
    the prefix.

    Shards are written in place there (no temp names), so what a crash leaves is shard objects
    that no manifest lists; they are deleted before the harvest writes anything.
    """
    names = folder.list_names()  # also where a missing bucket or bad keys show, in one line
    if not names:
        return Existing(None, False)
    dump_objects = [n for n in names if n == MANIFEST_NAME or _SHARD_OBJECT.fullmatch(n) or _ENTRY_OBJECT.fullmatch(n)]
    if MANIFEST_NAME not in names:
        if len(dump_objects) < len(names):
            raise UserError(f"{folder} holds objects that are not a dump; choose another --out "
                            "(harvest never deletes what it did not write)")
        if not (resume or overwrite):
            raise UserError(f"{folder} holds only the shard objects of a harvest that stopped before "
                            "writing its manifest; pass --overwrite (or --resume) to start it again")
        folder.delete_names(dump_objects)
        return Existing(None, False)
    if overwrite and _looks_like_dump(folder):
        folder.delete_names(dump_objects)  # only the dump's own objects
        return Existing(None, False)
    old = _existing_dump(folder, config_fingerprint, resume)
    if old.complete:
        return Existing(old, True)
    listed = {s.file for s in old.shards} | _shards_with_entries(folder, names)
    stray = [n for n in dump_objects if _SHARD_OBJECT.fullmatch(n) and n.split("/", 1)[0] not in listed]
    folder.delete_names(stray)  # shards written (whole or in part) after the last manifest
    return Existing(old, False)


def inspect_folder(folder: str | Path | Location, config_fingerprint: str, resume: bool,
                   overwrite: bool) -> Existing:
    """Decide fresh / resume / done, or refuse with a message saying what to do.

    What a crash leaves differs with how writes land: temp names in a folder, objects no manifest
    lists under a prefix.
    """
    folder = location(folder)
    if not folder.capabilities.folders:
        return _inspect_prefix(folder, config_fingerprint, resume, overwrite)
    return _inspect_local(folder, config_fingerprint, resume, overwrite)


def _inspect_local(folder: Path, config_fingerprint: str, resume: bool, overwrite: bool) -> Existing:
    """inspect_folder for a folder on disk."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder; choose another --out")
    if not folder.exists() or not any(folder.iterdir()):
        return Existing(None, False)
    if _only_leftovers(folder):
        return _start_afresh(folder, resume, overwrite)
    if not (folder / MANIFEST_NAME).is_file():
        raise UserError(f"{folder} holds files that are not a dump; choose another --out "
                        "(harvest never deletes what it did not write)")
    if overwrite and _looks_like_dump(folder):
        # Before validating: a damaged dump is exactly what --overwrite must be able to replace.
        shutil.rmtree(folder)
        return Existing(None, False)
    old = _existing_dump(folder, config_fingerprint, resume)
    if old.complete:
        return Existing(old, True)
    # A crash can leave the next shard half-written (temp) or written but not yet in the manifest.
    following = folder / shard_name(len(old.shards), old.format)
    atomic.remove(atomic.temp_path(following))
    atomic.remove(following)
    atomic.remove(atomic.temp_path(folder / MANIFEST_NAME))
    return Existing(old, False)


def human_bytes(n: float) -> str:
    """Sizes in the unit that shows them: a small dump is KB, not "0.00 GB"."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} bytes"


def check_disk(folders: list[Path | Location], bytes_needed: int, log: Callable[[str], None]) -> None:
    """Print the dump size and the free space; refuse when it will not fit."""
    spaces = [location(f).free_space() for f in folders]
    if None in spaces:  # nowhere to measure (a bucket)
        log(f"dump will take {human_bytes(bytes_needed)} in {', '.join(str(f) for f in folders)}")
        return
    free, at = spaces[0].bytes, spaces[0].at
    log(f"dump will take {human_bytes(bytes_needed)}; {human_bytes(free)} free at {at}")
    if bytes_needed > free:
        raise UserError(f"not enough disk space: need {human_bytes(bytes_needed)}, "
                        f"{human_bytes(free)} free; ask for fewer --tokens or another --out")
