"""Other data taken for the same data: each entry gives `train` or `evaluate` a dump that is not
the one the run was trained on, or whose index disagrees with itself, though every file is intact:

- a re-harvest of other data at the run's own dump path (same settings, so the same settings
  fingerprint), through `train --resume-from` and `evaluate`;
- manifest statistics (what `expected_norm` and b_dec's start use) edited away from the shards'
  own sums;
- a zarr chunk lost under `--no-verify` (zarr reads it as zeros), on disk and in a bucket.

Each must be refused in one line, with no traceback, no internal error and no result written."""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fault._support import error_line, invoke, ok
from shared.dump_writer import write_dump
from test_object_storage import moto_url, s3  # noqa: F401  (the moto server and a fresh bucket)

# Slow tier: the fault suite (tests/README.md); tests/test_dump_identity.py keeps fast checks.
pytestmark = pytest.mark.slow

N_ROWS, D_IN, CONTEXT, SHARD_ROWS = 1024, 16, 16, 256
TRAIN = ["--expansion-factor", "2", "--train-batch-size", "64", "--device", "cpu",
         "--eval-holdout-contexts", "8", "--quiet"]


def activations(seed: int) -> torch.Tensor:
    return torch.randn(N_ROWS, D_IN, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, Path]:
    """(a zarr dump, a finished run on it with one checkpoint before final/)."""
    root = tmp_path_factory.mktemp("data_identity")
    write_dump(root / "dump", activations(1), context_size=CONTEXT, shard_rows=SHARD_ROWS, fmt="zarr")
    ok("train", ["--shards", root / "dump", "--checkpoint-path", root / "run", "--n-checkpoints", "1",
                 "--total-training-tokens", "1024", *TRAIN])
    return root / "dump", root / "run"


def own_copy(trained: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the dump and of the run, the run's records pointing at the copied dump."""
    dump, run = shutil.copytree(trained[0], tmp_path / "dump"), shutil.copytree(trained[1], tmp_path / "run")
    for path in run.rglob("*.json"):
        text = path.read_text()
        if str(trained[0]) in text:
            path.write_text(text.replace(json.dumps(str(trained[0])), json.dumps(str(dump))))
    return dump, run


def unfinish(run: Path) -> None:
    """The run as an interruption leaves it: its checkpoint, no final/."""
    shutil.rmtree(run / "final")
    index = run / "checkpoints.json"
    index.write_text(json.dumps([e for e in json.loads(index.read_text()) if e["folder"] != "final"]))


def reharvest(dump: Path) -> None:
    """Other activations written at the same path with the same settings (an edited dataset)."""
    shutil.rmtree(dump)
    write_dump(dump, activations(2), context_size=CONTEXT, shard_rows=SHARD_ROWS, fmt="zarr")


def edit_stats(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(dump: Path) -> None:
        path = dump / "manifest.json"
        m = json.loads(path.read_text())
        change(m["stats"])
        path.write_text(json.dumps(m, indent=1))
    return apply


def lose_chunk(key: str) -> Callable[[Path], None]:
    return lambda dump: (dump / "shard_000001.zarr" / key).unlink()


def scaled(name: str, factor: float) -> Callable[[dict], None]:
    return lambda stats: stats.__setitem__(name, stats[name] * factor)


def shifted_mean(stats: dict) -> None:
    stats["mean"][3] += 0.5


LOST = "is missing: the zarr shard lost a chunk"

# name -> (what is done to the run's dump, options besides each command's own, what the line says)
DAMAGE: dict[str, tuple[Callable[[Path], None], list[str], str]] = {
    "reharvest-other-data-same-path": (reharvest, [], "shard checksums differ"),
    "stats-mean-edited": (edit_stats(shifted_mean), [], "'stats.mean[3]' is"),
    "stats-mean-norm-edited": (edit_stats(scaled("mean_norm", 2.0)), [], "'stats.mean_norm' is"),
    "stats-mean-sq-norm-edited": (edit_stats(scaled("mean_sq_norm", 0.5)), [], "'stats.mean_sq_norm' is"),
    "zarr-activations-chunk-lost-no-verify": (lose_chunk("activations/c/0/0"), ["--no-verify"],
                                              "shard_000001.zarr/activations/c/0/0 " + LOST),
    "zarr-tokens-chunk-lost-no-verify": (lose_chunk("tokens/c/0"), ["--no-verify"],
                                         "shard_000001.zarr/tokens/c/0 " + LOST),
}


def files_below(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def refused(got, strict: bool) -> str:
    line = error_line(got, strict=strict)  # a resume says where it resumes first
    assert "internal error" not in line, "damaged input reported as a bug\n" + got.describe()
    return line


@pytest.mark.parametrize("prog", ["resume", "evaluate"])
@pytest.mark.parametrize("name", list(DAMAGE))
def test_other_data_is_refused_in_one_line(trained, tmp_path, name, prog):
    dump, run = own_copy(trained, tmp_path)
    damage, options, needle = DAMAGE[name]
    if prog == "resume":
        unfinish(run)
    damage(dump)
    (run / "eval.json").unlink(missing_ok=True)
    before = files_below(run)
    if prog == "resume":
        [entry] = json.loads((run / "checkpoints.json").read_text())
        got = invoke("train", ["--resume-from", run / entry["folder"], "--quiet", *options])
    else:
        got = invoke("evaluate", [run, "--no-model", *options])
    line = refused(got, strict=prog == "evaluate")
    assert needle in line, got.describe()
    written = files_below(run) - before
    assert not written, f"written despite the refusal: {sorted(map(str, written))}\n" + got.describe()


@pytest.mark.parametrize("prog", ["train", "evaluate"])
def test_lost_chunk_in_a_bucket_is_refused_without_verification(trained, tmp_path, s3, prog):  # noqa: F811
    client, bucket = s3
    url = f"s3://{bucket}/d"
    write_dump(url, activations(1), context_size=CONTEXT, shard_rows=SHARD_ROWS, fmt="zarr")  # the same data
    key = "d/shard_000001.zarr/activations/c/0/0"
    client.delete_object(Bucket=bucket, Key=key)
    if prog == "train":
        got = invoke("train", ["--shards", url, "--checkpoint-path", tmp_path / "run", "--no-verify",
                               "--total-training-tokens", "512", *TRAIN])
        result = tmp_path / "run" / "final"
    else:
        run = shutil.copytree(trained[1], tmp_path / "run")
        (run / "eval.json").unlink(missing_ok=True)
        got = invoke("evaluate", [run, "--shards", url, "--no-model", "--no-verify"])
        result = run / "eval.json"
    line = refused(got, strict=True)
    assert f"{url}/shard_000001.zarr/activations/c/0/0 is missing" in line, got.describe()
    assert not result.exists(), f"{result} was written\n" + got.describe()
