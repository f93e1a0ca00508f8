"""What each name inside a local dump folder is, checked with `os.lstat` before anything opens it.

A dump is a folder of files harvest wrote: `manifest.json`, safetensors files or zarr folders.
Symlinks are followed only where they stay inside the dump: one that leads outside it (to another
dump's shard, to /dev/zero) would make a dump's contents depend on files it does not own. Special
files are refused by kind: opening a FIFO blocks until something writes to it, and a device or a
folder where a file belongs is no shard. Each refusal names what the entry is, never "missing".
Object storage has no symlinks or special files: nothing here applies to it.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path

from shared.errors import DumpError

_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a file"))
_FIX = "the dump is damaged, re-harvest it"


def kind_of(mode: int) -> str:
    """'a file', 'a folder', 'a FIFO', ... for an `st_mode`."""
    return next((name for test, name in _KINDS if test(mode)), "a special file")


def check_entry(dump: Path, path: Path, want: str, what: str) -> bool:
    """Whether `path` (inside the local dump folder `dump`) exists; a DumpError if it is a symlink
    leading outside the dump, or is not `want` ('a file' or 'a folder'). `what` names the
    expected thing in the message ("a safetensors file", "a zarr folder"). Never opens `path`."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode):
        target = Path(os.path.realpath(path))
        inside = Path(os.path.realpath(dump))
        if target != inside and inside not in target.parents:
            raise DumpError(f"{path} is a symlink to {target} outside the dump; {_FIX} "
                            "(or copy the file in)")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DumpError(f"{path} is a broken symlink (to {target}); {_FIX}") from None
    got = kind_of(st.st_mode)
    if got != want:
        raise DumpError(f"{path} is {got}, not {what}; {_FIX}")
    return True


def check_tree(dump: Path, folder: Path) -> None:
    """Every entry below `folder` (a zarr shard) is a file or folder inside the dump."""
    for root, dirs, files in os.walk(folder):  # does not descend into symlinked folders
        for name in dirs:
            check_entry(dump, Path(root) / name, "a folder", "a folder of the zarr shard")
        for name in files:
            check_entry(dump, Path(root) / name, "a file", "a file of the zarr shard")
