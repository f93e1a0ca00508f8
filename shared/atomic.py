"""Writes that appear all at once or not at all (temp file + fsync + rename; in object storage a
single PUT, which S3 makes visible whole or not at all)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from shared.storage import is_remote


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def fsync_tree(path: Path) -> None:
    """fsync every file below `path` (zarr shards are folders)."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_file(Path(root) / name)
        fsync_dir(Path(root))


def temp_path(final: Path) -> Path:
    """Hidden sibling name for a file being written; never listed in a manifest."""
    return final.with_name(f".{final.name}.tmp")


def commit(tmp: Path, final: Path) -> None:
    """Rename a fully written temp file or folder into place, durably."""
    if tmp.is_dir():
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
    else:
        fsync_file(tmp)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_json(path: Path, obj: Any) -> None:
    """Atomically replace `path` with `obj` as indented JSON."""
    if is_remote(path):
        from shared.storage import put_bytes

        put_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())
        return
    tmp = temp_path(path)
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    commit(tmp, path)


def remove(path: Path) -> None:
    if is_remote(path):
        from shared.storage import delete_prefix, delete_names

        delete_prefix(path)  # a zarr shard's objects
        delete_names(path.parent, [path.name])  # or a single object (deleting a missing one is fine)
        return
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()
