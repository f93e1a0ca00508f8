"""Symlinks and special files in dumps: a dump is read only from inside its own folder, and a name
that is not what its format needs is named for what it is. Each entry replaces one name of an
intact dump (a shard, the manifest, a file inside a zarr shard) by a symlink leading outside the
dump (to an intact copy of the same file, or to /dev/zero), a FIFO (which would block a reader
that opens it) or a folder, and runs `train` and `evaluate` (a run trained on the intact dump,
pointed at the damaged one with --shards, --no-model). Each must refuse in one line saying what
the entry is, never that it is missing, without hanging and without writing a result."""
from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fault._support import error_line, invoke, ok
from shared.dump_writer import write_dump

# Slow tier: the fault suite (tests/README.md); tests/test_dump_identity.py keeps fast checks.
pytestmark = pytest.mark.slow

N_ROWS, D_IN, CONTEXT, SHARD_ROWS = 1024, 16, 16, 256
TRAIN = ["--expansion-factor", "2", "--train-batch-size", "64", "--total-training-tokens", "512",
         "--device", "cpu", "--eval-holdout-contexts", "8", "--quiet"]
FORMATS = ("safetensors", "zarr")


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Per format: (an intact dump, a run trained on it)."""
    root = tmp_path_factory.mktemp("dump_symlinks")
    out = {}
    for fmt in FORMATS:
        g = torch.Generator().manual_seed(3)
        write_dump(root / fmt, torch.randn(N_ROWS, D_IN, generator=g), context_size=CONTEXT,
                   shard_rows=SHARD_ROWS, fmt=fmt)
        ok("train", ["--shards", root / fmt, "--checkpoint-path", root / f"run_{fmt}", *TRAIN])
        out[fmt] = (root / fmt, root / f"run_{fmt}")
    return out


def link_outside(dump: Path, name: str) -> None:
    """`name` moved out of the dump (intact) and a symlink to it left in its place."""
    outside = dump.parent / "outside" / Path(name).name
    outside.parent.mkdir(exist_ok=True)
    shutil.move(dump / name, outside)
    os.symlink(outside, dump / name)


def replaced(name: str, make: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(dump: Path) -> None:
        path = dump / name
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        make(path)
    return apply


def outside(name: str) -> Callable[[Path], None]:
    return lambda dump: link_outside(dump, name)


SHARD = "shard_000001.safetensors"
ZARR = "shard_000001.zarr"
CHUNK = f"{ZARR}/activations/c/0/0"

# name -> (format, damage, what the error line says)
DAMAGE: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "shard-symlink-outside": ("safetensors", outside(SHARD), f"{SHARD} is a symlink to "),
    "shard-symlink-dev-zero": ("safetensors", replaced(SHARD, lambda p: os.symlink("/dev/zero", p)),
                               f"{SHARD} is a symlink to /dev/zero outside the dump"),
    "shard-fifo": ("safetensors", replaced(SHARD, os.mkfifo), f"{SHARD} is a FIFO, not a safetensors file"),
    "shard-folder": ("safetensors", replaced(SHARD, os.mkdir), f"{SHARD} is a folder, not a safetensors file"),
    "manifest-symlink-outside": ("safetensors", outside("manifest.json"), "manifest.json is a symlink to "),
    "manifest-fifo": ("safetensors", replaced("manifest.json", os.mkfifo), "manifest.json is a FIFO"),
    "zarr-shard-symlink-outside": ("zarr", outside(ZARR), f"{ZARR} is a symlink to "),
    "zarr-chunk-symlink-outside": ("zarr", outside(CHUNK), f"{CHUNK} is a symlink to "),
    "zarr-chunk-symlink-dev-zero": ("zarr", replaced(CHUNK, lambda p: os.symlink("/dev/zero", p)),
                                    f"{CHUNK} is a symlink to /dev/zero outside the dump"),
    "zarr-chunk-fifo": ("zarr", replaced(CHUNK, os.mkfifo), f"{CHUNK} is a FIFO"),
    "zarr-metadata-fifo": ("zarr", replaced(f"{ZARR}/zarr.json", os.mkfifo), f"{ZARR}/zarr.json is a FIFO"),
}


@pytest.mark.parametrize("prog", ["train", "evaluate"])
@pytest.mark.parametrize("name", list(DAMAGE))
def test_symlink_or_special_file_is_refused_by_name(clean, tmp_path, name, prog):
    fmt, damage, needle = DAMAGE[name]
    clean_dump, clean_run = clean[fmt]
    dump = shutil.copytree(clean_dump, tmp_path / "dump")
    damage(dump)
    if prog == "train":
        got = invoke("train", ["--shards", dump, "--checkpoint-path", tmp_path / "run", *TRAIN])
        result = tmp_path / "run" / "final"
    else:
        run = shutil.copytree(clean_run, tmp_path / "run")
        (run / "eval.json").unlink(missing_ok=True)
        got = invoke("evaluate", [run, "--shards", dump, "--no-model"])
        result = run / "eval.json"
    line = error_line(got)
    assert line.startswith(f"{prog}: error:") and "internal error" not in line, got.describe()
    assert needle in line and "missing" not in line, got.describe()
    assert not result.exists(), f"{result} was written\n" + got.describe()
