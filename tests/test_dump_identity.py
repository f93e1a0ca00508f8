"""A run knows its data, and a dump never reaches outside its folder (fast checks; the fault
suite runs the same cases through the command lines: tests/fault/test_data_identity.py and
test_dump_symlinks.py).

- other data harvested at the same path (same settings, so the same fingerprint) is refused by
  resume and evaluate through the digest of the shard checksums; older records lack it and pass;
- manifest statistics must equal what the shard sums give;
- a zarr shard's missing chunk is refused without verification;
- a symlink out of the dump, a FIFO, a device or a folder where a file belongs is named as such.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

from shared.dump_writer import write_dump
from shared.errors import DumpError, UserError
from shared.reader import open_dump
from train.data_digest import DIGEST_KEY
from train.evaluation.run_eval import check_dump_fits
from train.run import check_resume, dump_identity

ROWS, D_IN, CONTEXT, SHARD_ROWS = 64, 4, 8, 32


def _dump(folder: Path, seed: int = 0, fmt: str = "safetensors") -> Path:
    g = torch.Generator().manual_seed(seed)
    write_dump(folder, torch.randn(ROWS, D_IN, generator=g), context_size=CONTEXT, shard_rows=SHARD_ROWS, fmt=fmt)
    return folder


def _ident(folder: Path) -> dict:
    return dump_identity(open_dump(folder), (0, ROWS - CONTEXT))


# ---- other data at the same path -------------------------------------------------------------

def test_resume_refuses_other_data_at_the_same_path(tmp_path):
    folder = _dump(tmp_path / "d")
    state = {"dump": _ident(folder)}
    check_resume(state, _ident(folder), tmp_path / "run")  # the same data: accepted
    shutil.rmtree(folder)
    _dump(folder, seed=1)  # a re-harvest of other data: same settings, same fingerprint
    now = _ident(folder)
    assert now["dump_fingerprint"] == state["dump"]["dump_fingerprint"]
    with pytest.raises(UserError, match=r"now holds other data than the run in .* \(shard checksums differ\)"):
        check_resume(state, now, tmp_path / "run")
    # A checkpoint written before the digest existed keeps the older comparison.
    old = {k: v for k, v in state["dump"].items() if k != DIGEST_KEY}
    check_resume({"dump": old}, now, tmp_path / "run")


def test_resume_refuses_other_data_in_the_target_dump(tmp_path):
    source, target = _dump(tmp_path / "in"), _dump(tmp_path / "out", seed=2)
    ident = dump_identity(open_dump(source), (0, ROWS), open_dump(target))
    assert ident["target"][DIGEST_KEY] == open_dump(target).manifest.data_digest() != ident[DIGEST_KEY]
    shutil.rmtree(target)
    _dump(target, seed=3)
    with pytest.raises(UserError, match="the target dump at .* now holds other data"):
        check_resume({"dump": ident}, dump_identity(open_dump(source), (0, ROWS), open_dump(target)), tmp_path)


def test_evaluate_refuses_other_data_at_the_same_path(tmp_path):
    folder = _dump(tmp_path / "d")
    cfg = {"d_in": D_IN, "hook_name": "synthetic", **_ident(folder)}
    check_dump_fits(tmp_path / "sae", cfg, open_dump(folder))
    shutil.rmtree(folder)
    _dump(folder, seed=1)
    with pytest.raises(UserError, match=r"now holds other data than the SAE in .*--shards"):
        check_dump_fits(tmp_path / "sae", cfg, open_dump(folder))
    check_dump_fits(tmp_path / "sae", {k: v for k, v in cfg.items() if k != DIGEST_KEY}, open_dump(folder))


# ---- manifest statistics -----------------------------------------------------------------------

@pytest.mark.parametrize("field, index", [("mean", 2), ("mean_sq_norm", None), ("mean_norm", None)])
def test_manifest_statistics_must_match_the_shard_sums(tmp_path, field, index):
    folder = _dump(tmp_path / "d")
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    if index is None:
        raw["stats"][field] *= 1.01
    else:
        raw["stats"][field][index] += 0.01
    path.write_text(json.dumps(raw))
    where = f"'stats.{field}" + (f"[{index}]'" if index is not None else "'")
    with pytest.raises(DumpError, match=re.escape(where) + ".*the shards' sums give"):
        open_dump(folder)


# ---- zarr chunks ---------------------------------------------------------------------------------

@pytest.mark.parametrize("chunk", ["activations/c/0/0", "tokens/c/0", "position/c/0"])
def test_a_missing_zarr_chunk_is_refused_without_verification(tmp_path, chunk):
    folder = _dump(tmp_path / "d", fmt="zarr")
    (folder / "shard_000001.zarr" / chunk).unlink()
    with pytest.raises(DumpError, match=f"shard_000001.zarr/{chunk} is missing.*zeros"):
        open_dump(folder, verify=False)


def test_chunks_of_zeros_are_stored_and_older_shards_without_them_still_open(tmp_path):
    """All-zero tokens: zarr skips such chunks unless told not to; shards written before every
    chunk was stored lack them, and only their activations are held to being stored."""
    folder = tmp_path / "d"
    write_dump(folder, torch.randn(ROWS, D_IN), context_size=CONTEXT, shard_rows=SHARD_ROWS, fmt="zarr")
    shard = folder / "shard_000000.zarr"
    assert (shard / "tokens" / "c" / "0").is_file()
    (shard / "tokens" / "c" / "0").unlink()  # as an older harvest left it
    meta = json.loads((shard / "zarr.json").read_text())
    meta["attributes"].pop("every_chunk_stored")
    (shard / "zarr.json").write_text(json.dumps(meta))
    assert int(open_dump(folder, verify=True).column("tokens", 0, SHARD_ROWS).sum()) == 0
    (shard / "activations" / "c" / "0" / "0").unlink()
    with pytest.raises(DumpError, match="activations/c/0/0 is missing"):
        open_dump(folder)


# ---- what the names inside a dump are ------------------------------------------------------------

def _replace(path: Path, make) -> None:
    shutil.move(path, path.with_name("moved")) if path.is_file() else shutil.rmtree(path)
    make(path)


@pytest.mark.parametrize("name, make, message", [
    ("shard_000000.safetensors", lambda p: os.symlink("/dev/zero", p), "is a symlink to /dev/zero outside the dump"),
    ("shard_000000.safetensors", os.mkfifo, "is a FIFO, not a safetensors file"),
    ("shard_000000.safetensors", os.mkdir, "is a folder, not a safetensors file"),
    ("shard_000000.safetensors", lambda p: os.symlink(p.parent.parent / "elsewhere", p), "outside the dump"),
    ("manifest.json", lambda p: os.symlink(p.parent.parent / "elsewhere", p), "outside the dump"),
    ("manifest.json", os.mkfifo, "is a FIFO, not a JSON file"),
])
def test_special_entries_are_named_for_what_they_are(tmp_path, name, make, message):
    folder = _dump(tmp_path / "d")
    shutil.copy(folder / name, tmp_path / "elsewhere")  # an intact copy outside the dump
    _replace(folder / name, make)
    with pytest.raises(DumpError, match=message) as info:
        open_dump(folder)
    assert "missing" not in str(info.value)


def test_zarr_entries_are_checked_below_the_shard(tmp_path):
    folder = _dump(tmp_path / "d", fmt="zarr")
    chunk = folder / "shard_000000.zarr" / "context" / "c" / "0"
    shutil.move(chunk, tmp_path / "chunk")
    os.symlink(tmp_path / "chunk", chunk)
    with pytest.raises(DumpError, match="context/c/0 is a symlink to .* outside the dump"):
        open_dump(folder)
    chunk.unlink()
    os.mkfifo(chunk)
    with pytest.raises(DumpError, match="context/c/0 is a FIFO, not a file of the zarr shard"):
        open_dump(folder)


def test_a_symlink_inside_the_dump_is_followed(tmp_path):
    folder = _dump(tmp_path / "d")
    shard = folder / "shard_000001.safetensors"
    shard.rename(folder / "kept.safetensors")
    os.symlink("kept.safetensors", shard)
    assert open_dump(folder, verify=True).n_rows == ROWS
