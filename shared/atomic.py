"""Writes that appear all at once or not at all: on disk a temp file + fsync + rename (the
primitives here, which the local-disk location uses); in object storage a single PUT, which S3
makes visible whole or not at all (`Location.put_bytes` does the right one)."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from shared.file_mode import apply_default_mode, default_file_mode


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (POSIX needs the directory itself synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path, mode: int | None = None) -> None:
    """fsync `path`; with `mode`, also give it those permission bits (see `commit`)."""
    with open(path, "rb+") as f:
        if mode is not None:
            apply_default_mode(f.fileno(), mode)
        os.fsync(f.fileno())


def fsync_tree(path: Path, mode: int | None = None) -> None:
    """fsync every file below `path` (zarr shards are folders), giving each `mode` when given."""
    for root, _dirs, files in os.walk(path):
        for name in files:
            fsync_file(Path(root) / name, mode)
        fsync_dir(Path(root))


def temp_path(final: Path) -> Path:
    """Hidden sibling name for a file being written; never listed in a manifest."""
    return final.with_name(f".{final.name}.tmp")


def commit(tmp: Path, final: Path) -> None:
    """Rename a fully written temp file or folder into place, durably. Every file gets the mode
    `open()` would have given it (0o666 less the umask): safetensors writes its files 0600."""
    mode = default_file_mode()
    if tmp.is_dir():
        fsync_tree(tmp, mode)
        if final.exists():
            shutil.rmtree(final)
    else:
        fsync_file(tmp, mode)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def write_json(path: Any, obj: Any) -> None:
    """Atomically replace `path` (a path or a location) with `obj` as indented JSON."""
    from shared.storage import location  # imported when called: the storage package builds on this module

    location(path).put_bytes((json.dumps(obj, indent=1) + "\n").encode())


def remove(path: Any) -> None:
    """Remove a file or folder (a shard), or an object and the objects below it; nothing is fine."""
    from shared.storage import location

    location(path).delete()


_OS_CODE = re.compile(r"code: (\d+)")


def save_tensors(tensors: dict[str, Any], path: Path) -> None:
    """`safetensors.torch.save_file`, with its I/O failures as the OSError they are.

    Why: safetensors reports a full disk as `SafetensorError: ... IoError(Os { code: 28, ...
    "No space left on device" })`, which the commands would call an internal error; as an
    OSError (and with the half-written file removed) it gets the documented one line."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path))
    except SafetensorError as e:
        Path(path).unlink(missing_ok=True)
        code = _OS_CODE.search(str(e))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number) if number in errno.errorcode else str(e), str(path)) from None
