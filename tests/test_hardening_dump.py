"""Hardening of the dump and harvest side: every manifest field is checked before any row is read,
shards are read only from inside their dump and in the dtype they hold, swapped or altered shards
are refused, and harvest reports every failure in one line, leaving a dump it can resume."""
from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch

import shared.dump_writer
from helpers import dump_files, pass_id, run_harvest
from harvest.target import human_bytes
from shared import atomic
from shared.dump_writer import write_dump
from shared.errors import DumpError
from shared.manifest import Manifest, read_manifest
from shared.manifest_check import FIELDS
from shared.reader import open_dump
from train.config import LanguageModelSAERunnerConfig
from train.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- helpers ---------------------------------------------------------------------------------
def _dump(folder: Path, seed: int = 0, fmt: str = "safetensors", n_rows: int = 1024) -> Path:
    """4 shards of 256 rows (16 contexts of 64), d_in 8, random activations."""
    acts = torch.randn(n_rows, 8, generator=torch.Generator().manual_seed(seed))
    write_dump(folder, acts, context_size=64, shard_rows=256, fmt=fmt)
    return folder


def _edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Apply `edit` to the manifest in place; what it returns, if anything, replaces it."""
    path = folder / "manifest.json"
    raw = json.loads(path.read_text())
    out = edit(raw)
    path.write_text(json.dumps(raw if out is None else out))


def _stats_of(raw: dict[str, Any]) -> dict[str, Any]:
    """The statistics a manifest's shard sums give (what harvest writes)."""
    m = Manifest.from_dict(dict(raw, stats=None, complete=False))
    m.finalize_stats()
    return m.stats


def _refused(folder: Path, *needles: str, verify: bool = False) -> str:
    with pytest.raises(DumpError) as info:
        open_dump(folder, verify=verify)
    message = str(info.value)
    assert "\n" not in message and str(folder) in message, message
    for needle in needles:
        assert needle in message, message
    return message


def _train(dump: Path, run: Path, verify: bool = True):
    cfg = LanguageModelSAERunnerConfig(
        shards=str(dump), checkpoint_path=str(run), expansion_factor=2, train_batch_size=128,
        total_training_tokens=256, device="cpu", seed=0, eval_holdout_contexts=0,
        shuffle_buffer_rows=512, resample_sample_rows=256)
    return train(cfg, progress=False, verify=verify)


def _set(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda raw: raw.__setitem__(field, value)


def _drop(*keys: Any) -> Callable[[dict[str, Any]], None]:
    """Remove raw[k0][k1]...[kn]: a field missing from the manifest, a shard entry or the stats."""
    def edit(raw: dict[str, Any]) -> None:
        for key in keys[:-1]:
            raw = raw[key]
        del raw[keys[-1]]
    return edit


def _set_shard(index: int, field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda raw: raw["shards"][index].__setitem__(field, value)


# ---- 1. the manifest, field by field ---------------------------------------------------------
BAD_MANIFESTS = {
    "a JSON list": (lambda raw: [raw], "must be a JSON object"),
    "n_contexts too large for n_rows": (_set("n_contexts", 17), "'n_tokens'"),
    "n_contexts and n_tokens too large": (lambda raw: raw.update(n_contexts=17, n_tokens=17 * 64), "'n_rows'"),
    "rows_per_context 0": (_set("rows_per_context", 0), "'rows_per_context' must be an integer >= 1"),
    "rows_per_context not context_size": (_set("rows_per_context", 32), "'rows_per_context' is 32"),
    "float d_in": (_set("d_in", 8.0), "'d_in' must be an integer"),
    "negative d_in": (_set("d_in", -8), "'d_in' must be an integer >= 1"),
    "int8 dtype": (_set("dtype", "int8"), "'dtype' must be one of float32, bfloat16, float16"),
    "negative n_rows": (_set("n_rows", -1), "'n_rows'"),
    "string n_rows": (_set("n_rows", "1024"), "'n_rows'"),
    "boolean n_contexts": (_set("n_contexts", True), "'n_contexts'"),
    "shards not a list": (_set("shards", {"0": "shard_000000.safetensors"}), "'shards' must be a JSON list"),
    "shard entry not an object": (lambda raw: raw["shards"].__setitem__(0, "shard_000000.safetensors"),
                                  "'shards[0]' must be an object"),
    "shard rows a string": (_set_shard(1, "rows", "256"), "'shards[1].rows'"),
    "shard rows fractional": (_set_shard(3, "rows", 255.5), "'shards[3].rows'"),
    "shard without checksum": (_drop("shards", 0, "checksum"), "shards[0] lacks checksum"),
    "checksum not sha256": (_set_shard(0, "checksum", 12), "'shards[0].checksum'"),
    "shard sum of wrong length": (_set_shard(0, "sum", [0.0] * 7), "'shards[0].sum' must be a list of 8"),
    "shard first_row gap": (_set_shard(2, "first_row", 600), "'shards[2].first_row' is 600"),
    "short shard before the last": (lambda raw: raw["shards"][0].update(rows=200), "'shards[0].rows'"),
    "shard rows more than n_rows": (lambda raw: raw["shards"][3].update(rows=256) or raw["shards"].append(
        dict(raw["shards"][3], file="shard_000004.safetensors", first_row=1024)), "'shards' list 1280 rows"),
    "shard listed twice": (lambda raw: raw["shards"].__setitem__(1, dict(raw["shards"][0], first_row=256)),
                           "listed twice"),
    "stats mean of wrong length": (lambda raw: raw["stats"].update(mean=[0.0] * 9), "'stats.mean'"),
    "stats without mean_norm": (_drop("stats", "mean_norm"), "stats lacks mean_norm"),
    "stats rows not n_rows": (lambda raw: raw["stats"].update(rows=1000), "'stats.rows'"),
    "complete without stats": (_set("stats", None), "'stats' is missing"),
    "complete not a boolean": (_set("complete", "yes"), "'complete' must be a JSON boolean"),
    "unknown format": (_set("format", "hdf5"), "'format'"),
    "format_version true": (_set("format_version", True), "format_version"),
    "missing field": (_drop("hook"), "lacks hook"),
    "layer a string": (_set("layer", "0"), "'layer'"),
    "harvest_config a list": (_set("harvest_config", []), "'harvest_config'"),
    "NaN shard statistic": (_set_shard(0, "sum_norm", float("nan")), "'shards[0].sum_norm'"),
    "compression on safetensors": (_set("compression", "zstd"), "'compression'"),
    "prepend_bos without a BOS id": (_set("prepend_bos", True), "'bos_token_id' is null"),
    "skip_bos without prepend_bos": (lambda raw: raw.update(skip_bos=True, rows_per_context=63), "'skip_bos'"),
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_every_manifest_field_is_checked_before_rows_are_read(tmp_path, case):
    folder = _dump(tmp_path / "d")
    edit, needle = BAD_MANIFESTS[case]
    _edit_manifest(folder, edit)
    message = _refused(folder, needle)
    assert "re-harvest" in message


def test_validation_covers_every_manifest_field():
    assert set(FIELDS) == set(Manifest.__dataclass_fields__)


def test_int8_dtype_is_refused_by_train(tmp_path):
    """Once accepted by train (and a crash in evaluate)."""
    folder = _dump(tmp_path / "d")
    _edit_manifest(folder, _set("dtype", "int8"))
    with pytest.raises(DumpError, match="'dtype' must be one of"):
        _train(folder, tmp_path / "run")


@pytest.mark.parametrize("name", ["../outside/shard.safetensors", "sub/shard.safetensors", "..",
                                  "ABSOLUTE", "C:shard.safetensors", "a\\b.safetensors", ""])
def test_shard_files_must_be_plain_names_inside_the_dump(tmp_path, name):
    folder = _dump(tmp_path / "d")
    outside = tmp_path / "outside"
    outside.mkdir()
    # A valid shard outside the dump: reading it would succeed, which is the danger.
    shutil.copy(folder / "shard_000000.safetensors", outside / "shard.safetensors")
    name = str(outside / "shard.safetensors") if name == "ABSOLUTE" else name
    _edit_manifest(folder, _set_shard(0, "file", name))
    _refused(folder, "'shards[0].file'", "plain file name" if name else "")


@pytest.mark.parametrize("fmt", ["safetensors", "zarr"])
def test_manifest_dtype_must_match_the_shards(tmp_path, fmt):
    """float32 shards read as bfloat16 were reinterpreted bytes, unseen even by checksums."""
    folder = _dump(tmp_path / "d", fmt=fmt)
    _edit_manifest(folder, _set("dtype", "bfloat16"))
    _refused(folder, "stores float32", "dtype bfloat16", verify=True)
    with pytest.raises(DumpError, match="stores float32"):
        _train(folder, tmp_path / "run")


def test_manifest_rows_must_match_shard_shapes(tmp_path):
    folder = _dump(tmp_path / "d")
    # Totals that agree with each other (960 rows, statistics of those rows' sums), but the last
    # shard's file holds 256 rows.
    def shrink(raw: dict[str, Any]) -> None:
        raw.update(n_contexts=15, n_tokens=15 * 64, n_rows=960,
                   shards=raw["shards"][:3] + [dict(raw["shards"][3], rows=192)])
        raw["stats"] = _stats_of(raw)

    _edit_manifest(folder, shrink)
    _refused(folder, "shard_000003.safetensors holds activations of shape (256, 8)", "(192, 8)")


def test_shard_header_with_a_foreign_dtype_is_one_error(tmp_path):
    """A dtype code harvest never writes was a KeyError from deep inside the reader."""
    folder = _dump(tmp_path / "d")
    shard = folder / "shard_000001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data.replace(b'"dtype":"F32"', b'"dtype":"U32"', 1))
    with pytest.raises(DumpError, match="shard_000001.safetensors is corrupted .malformed safetensors header"):
        open_dump(folder)


def test_incomplete_manifest_is_validated_too(tmp_path):
    """harvest --resume reads incomplete manifests: their shard rows may not exceed the plan."""
    folder = _dump(tmp_path / "d")
    _edit_manifest(folder, lambda raw: raw.update(complete=False, n_rows=0, n_contexts=8, n_tokens=512))
    with pytest.raises(DumpError, match="'shards' list 1024 rows, more than"):
        read_manifest(folder)


# ---- 4. swapped or altered shards ------------------------------------------------------------
def test_swapped_shards_are_refused(tmp_path):
    folder = _dump(tmp_path / "d")
    a, b = folder / "shard_000000.safetensors", folder / "shard_000001.safetensors"
    dump = open_dump(folder)
    a.rename(tmp_path / "t")
    b.rename(a)
    (tmp_path / "t").rename(b)
    # The checksums tell, and so does the context column, even without verify.
    with pytest.raises(DumpError, match="shard_000000.safetensors fails its checksum"):
        dump.verify()
    _refused(folder, "shard_000000.safetensors holds contexts 4..7", "swapped")
    for verify in (True, False):
        with pytest.raises(DumpError, match="swapped"):
            _train(folder, tmp_path / f"run{verify}", verify=verify)


@pytest.mark.parametrize("fmt", ["safetensors", "zarr"])
def test_shard_from_another_dump_fails_its_checksum(tmp_path, fmt):
    """Same layout, other activations: only the checksum can tell."""
    ext = "safetensors" if fmt == "safetensors" else "zarr"
    folder, other = _dump(tmp_path / "d", fmt=fmt), _dump(tmp_path / "o", seed=1, fmt=fmt)
    atomic.remove(folder / f"shard_000002.{ext}")
    (shutil.copytree if fmt == "zarr" else shutil.copy)(other / f"shard_000002.{ext}", folder / f"shard_000002.{ext}")
    open_dump(folder)
    _refused(folder, f"shard_000002.{ext} fails its checksum", verify=True)
    with pytest.raises(DumpError, match="fails its checksum"):
        _train(folder, tmp_path / "run", verify=True)


@pytest.mark.parametrize("fmt", ["safetensors", "zarr"])
def test_nan_written_into_a_shard_fails_its_checksum(tmp_path, fmt):
    folder = _dump(tmp_path / "d", fmt=fmt)
    if fmt == "safetensors":
        shard = folder / "shard_000001.safetensors"
        data = bytearray(shard.read_bytes())
        offset = 8 + int.from_bytes(data[:8], "little")  # activations come first in harvest's files
        data[offset + 4 * 37 : offset + 4 * 38] = np.float32(np.nan).tobytes()
        shard.write_bytes(bytes(data))
    else:
        import zarr

        zarr.open_group(str(folder / "shard_000001.zarr"), mode="r+")["activations"][4, 5] = np.nan
    assert torch.isnan(open_dump(folder).activations(256, 512)).any()  # the NaN is really there
    _refused(folder, "shard_000001", "fails its checksum", verify=True)
    with pytest.raises(DumpError, match="fails its checksum"):
        _train(folder, tmp_path / "run", verify=True)


# ---- 2 and 3. harvest: one line per failure, resumable after a full disk ---------------------
def _args(model: Path, ds: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--dataset", str(ds), "--out", str(out), "--context-size", "32",
            "--batch-size", "4", "--tokens", "1000", "--shard-rows", "300", *extra]


def _one_line(result, code: int, *needles: str) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("harvest: error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_disk_full_mid_harvest_is_one_line_and_resumable(tiny_model, token_dataset, tmp_path, monkeypatch):
    ref, out = tmp_path / "ref", tmp_path / "out"
    first = run_harvest(*_args(tiny_model, token_dataset, ref))
    real = shared.dump_writer.write_safetensors
    calls = {"n": 0}

    def fills_the_disk(path, tensors):
        calls["n"] += 1
        if calls["n"] == 3:  # the third shard: half written, then no space left
            path.write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, tensors)

    monkeypatch.setattr(shared.dump_writer, "write_safetensors", fills_the_disk)
    _one_line(run_harvest(*_args(tiny_model, token_dataset, out), expect_ok=False), 1,
              "disk is full", "--resume")
    monkeypatch.setattr(shared.dump_writer, "write_safetensors", real)
    assert len(read_manifest(out).shards) == 2
    begun = pass_id(out)
    run_harvest(*_args(tiny_model, token_dataset, out), "--resume")
    assert dump_files(out) == dump_files(ref)
    assert pass_id(out) == begun
    open_dump(out, verify=True)
    # Small dumps are sized in units that show them.
    assert "KB;" in first.output and "0.00 GB" not in first.output


@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_crash_in_the_first_manifest_write_can_be_started_again(tiny_model, token_dataset, tmp_path,
                                                                monkeypatch, flag):
    out = tmp_path / "out"

    def no_space(tmp, final):
        raise OSError(errno.ENOSPC, "No space left on device", str(final))

    monkeypatch.setattr(atomic, "commit", no_space)
    _one_line(run_harvest(*_args(tiny_model, token_dataset, out), expect_ok=False), 1, "disk is full")
    monkeypatch.undo()
    assert [p.name for p in out.iterdir()] == []  # the failed write removed its temp file
    # A crash (power loss) in the same write leaves the temp manifest and no manifest.
    (out / ".manifest.json.tmp").write_text('{"format_version": 1')
    _one_line(run_harvest(*_args(tiny_model, token_dataset, out), expect_ok=False), 2, flag.lstrip("-"))
    run_harvest(*_args(tiny_model, token_dataset, out), flag)
    open_dump(out, verify=True)


def test_overwrite_replaces_a_damaged_dump(tiny_model, token_dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format_version": 1, "shards": "damaged"}))
    _one_line(run_harvest(*_args(tiny_model, token_dataset, out), "--resume", expect_ok=False), 2, "lacks", "--overwrite")
    run_harvest(*_args(tiny_model, token_dataset, out), "--overwrite")
    open_dump(out, verify=True)


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("case, data, extra, needles", [
    ("empty.jsonl", b"", [], ["no records"]),
    ("latin1.txt", "the cat sat on the mat, caf\xe9\n".encode("latin-1") * 40, [], ["not UTF-8", "convert"]),
    ("blank.txt", b"   \n\n \t \n" * 20, [], ["no tokens", "whitespace"]),
    ("ok.txt", b"the cat sat on the mat\n" * 200, ["--context-size", "1"], ["--context-size 1", "--no-prepend-bos"]),
])
def test_bad_datasets_and_options_get_one_line(tiny_model, tmp_path, case, data, extra, needles):
    ds = _write(tmp_path / case, data)
    line = _one_line(run_harvest(*_args(tiny_model, ds, tmp_path / "out"), *extra, expect_ok=False), 2, *needles)
    assert "--tokens 0" not in line


def test_unexpected_failure_is_one_line_not_a_traceback(tiny_model, token_dataset, tmp_path, monkeypatch):
    import harvest.run

    def bug(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(harvest.run, "probe_widths", bug)
    result = run_harvest(*_args(tiny_model, token_dataset, tmp_path / "out"), expect_ok=False)
    _one_line(result, 1, "internal error", "RuntimeError: boom", "MATS_SAE_DEBUG=1")


def test_human_bytes():
    assert [human_bytes(n) for n in (512, 15_000, 8_400_000, 3.2e9)] == \
        ["512 bytes", "15.00 KB", "8.40 MB", "3.20 GB"]
