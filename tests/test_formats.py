"""Formats are contracts: dumps and run folders written by earlier versions still open, train,
resume and evaluate with this version.

`tests/fixtures/v<N>/` holds what version N wrote (`tests/fixtures/make_fixtures.py`): a pair of
dumps of one harvest pass (two hooks, widths 16 and 64), a zarr dump, a single run with a
mid-run checkpoint and its eval.json, and a two-SAE sweep. The recorded dump paths point at the
temporary folder they were written in, as after a move, so every command here is given the
dump's new place with --shards.

Resuming a fixture's mid-run checkpoint must give its recorded final weights bit for bit: the
training math is unchanged since. A release that changes the math on purpose relaxes that to
"resumes and finishes" for the older fixtures, and says so here.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from shared.reader import open_dump
from train.cli import main as train_main
from train.evaluation.cli import main as evaluate_main

FIXTURES = Path(__file__).parent / "fixtures"
VERSIONS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir() and p.name.startswith("v"))
HOOK = "blocks.0.hook_mlp_out"
WIDE = "blocks.0.mlp.hook_post"


@pytest.fixture(params=VERSIONS)
def fixture(request, tmp_path) -> Path:
    """A writable copy of one version's fixture folder."""
    shutil.copytree(FIXTURES / request.param, tmp_path / request.param)
    return tmp_path / request.param


def invoke(main, *args: str):
    result = CliRunner().invoke(main, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    return result


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "sae_weights.safetensors"))


def test_there_is_a_fixture_per_version():
    assert VERSIONS and VERSIONS[0] == "v1"


def test_dumps_open_verified_and_agree(fixture):
    dump = open_dump(fixture / "dumps" / HOOK, verify=True)
    wide = open_dump(fixture / "dumps" / WIDE, verify=True)
    zarr = open_dump(fixture / "dump_zarr", verify=True)
    assert (dump.d_in, wide.d_in) == (16, 64)
    assert dump.n_rows == wide.n_rows == zarr.n_rows > 0
    # One harvest pass: the same tokens at the same rows; the zarr dump has the same numbers.
    for column in ("tokens", "context", "position"):
        assert (dump.column(column, 0, dump.n_rows) == wide.column(column, 0, wide.n_rows)).all()
    assert (dump.activations(0, dump.n_rows) == zarr.activations(0, zarr.n_rows)).all()


@pytest.mark.parametrize("source", ["dumps/" + HOOK, "dump_zarr"])
def test_a_new_run_trains_from_an_old_dump(fixture, tmp_path, source):
    invoke(train_main, "--shards", str(fixture / source), "--checkpoint-path", str(tmp_path / "new"),
           "--d-sae", "32", "--train-batch-size", "32", "--device", "cpu")
    assert (tmp_path / "new" / "final" / "sae_weights.safetensors").is_file()


def test_an_old_run_resumes_to_its_recorded_final(fixture):
    run = fixture / "run"
    recorded = weights(run / "final")
    shutil.rmtree(run / "final")
    [mid] = [p for p in run.iterdir() if p.is_dir() and p.name.isdigit()]
    invoke(train_main, "--resume-from", str(mid), "--shards", str(fixture / "dumps" / HOOK))
    resumed = weights(run / "final")
    assert recorded.keys() == resumed.keys()
    for name in recorded:
        assert torch.equal(recorded[name], resumed[name]), name


def test_an_old_sweep_resumes_to_its_recorded_finals(fixture):
    sweep = fixture / "sweep"
    names = [e["name"] for e in json.loads((sweep / "sweep.json").read_text())["runs"]]
    recorded = {n: weights(sweep / n / "final") for n in names}
    for n in names:
        shutil.rmtree(sweep / n / "final")
    invoke(train_main, "--resume-from", str(sweep), "--shards", str(fixture / "dumps" / HOOK))
    for n in names:
        resumed = weights(sweep / n / "final")
        for name in recorded[n]:
            assert torch.equal(recorded[n][name], resumed[name]), (n, name)


@pytest.mark.parametrize("folder", ["run", "sweep"])
def test_old_runs_evaluate_to_their_recorded_metrics(fixture, folder):
    root = fixture / folder
    evals = sorted(root.rglob("eval.json"))
    assert evals
    recorded = {p: json.loads(p.read_text()) for p in evals}
    invoke(evaluate_main, str(root), "--no-model", "--device", "cpu", "--shards", str(fixture / "dumps" / HOOK))
    for path, old in recorded.items():
        new = json.loads(path.read_text())
        for key in ("explained_variance", "l0", "mse", "frac_dead"):
            assert new[key] == pytest.approx(old[key], rel=1e-6, abs=1e-9), (path, key)
