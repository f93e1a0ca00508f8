"""Sweeps: one read of each batch feeds every SAE, and each ends as if trained alone."""
from __future__ import annotations

import csv
import json

import pytest
from click.testing import CliRunner

import train.sweep as sweep_mod
from test_train import small_cfg, sparse_dump
from train.cli import main as train_main
from train.loader import ActivationLoader
from train.run import train
from train.summary import pareto_front
from train.sweep import groups_that_fit, parse_sweep_flags, train_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

GRID = {"l1_coefficient": [0.05, 0.3], "expansion_factor": [2, 3]}


@pytest.fixture
def count_reads(monkeypatch):
    """Count rows read through ActivationLoader.gather (every disk read of training data)."""
    counter = {"rows": 0, "batches": 0}
    real_gather, real_batches = ActivationLoader.gather, ActivationLoader.batches

    def gather(self, rows):
        counter["rows"] += len(rows)
        return real_gather(self, rows)

    def batches(self, start_batch=0):
        for batch in real_batches(self, start_batch):
            counter["batches"] += 1
            yield batch

    monkeypatch.setattr(ActivationLoader, "gather", gather)
    monkeypatch.setattr(ActivationLoader, "batches", batches)
    return counter


def _base(tmp_path, run, **kw):
    settings = dict(total_training_tokens=4096 * 3, n_checkpoints=1, feature_sampling_method="anthropic")
    return small_cfg(tmp_path / "dump", tmp_path / run, **(settings | kw))


def test_sweep_reads_each_batch_once_and_matches_solo_runs(tmp_path, count_reads):
    sparse_dump(tmp_path / "dump", n_rows=4096, n_features=4, per_row=1)
    solo_reads = {}
    for l1 in GRID["l1_coefficient"]:
        for ef in GRID["expansion_factor"]:
            before = count_reads["rows"]
            train(_base(tmp_path, f"solo_{l1}_{ef}", l1_coefficient=l1, expansion_factor=ef), progress=False)
            solo_reads[(l1, ef)] = count_reads["rows"] - before
    before, batches_before = count_reads["rows"], count_reads["batches"]
    results = train_sweep(_base(tmp_path, "sweep"), GRID, progress=False)
    # One stream feeds the 4 SAEs: 48 batches served, not 4 x 48, and about one solo run's reads
    # (the background reader may prefetch a little further in one run than in another).
    assert count_reads["batches"] - batches_before == 48
    assert count_reads["rows"] - before < 1.5 * min(solo_reads.values())
    assert len(results) == 4
    for r in results:
        l1, ef = r.trainer.cfg.l1_coefficient, r.trainer.cfg.expansion_factor
        solo = tmp_path / f"solo_{l1}_{ef}" / "final" / "sae_weights.safetensors"
        assert (r.final / "sae_weights.safetensors").read_bytes() == solo.read_bytes(), (l1, ef)
        assert r.run_dir.name == f"l1_coefficient_{l1:g}__expansion_factor_{ef}"
        assert (r.run_dir / "metrics.jsonl").is_file()
        assert any(p.name.isdigit() for p in r.run_dir.iterdir())  # its own checkpoints

    root = tmp_path / "sweep"
    rows = list(csv.DictReader(open(root / "summary.csv")))
    assert sorted((float(r["l1_coefficient"]), int(r["expansion_factor"])) for r in rows) == \
        [(0.05, 2), (0.05, 3), (0.3, 2), (0.3, 3)]
    assert len(json.loads((root / "summary.json").read_text())) == 4
    drawn = json.loads((root / "plots.json").read_text())
    names = sorted(r.run_dir.name for r in results)
    for png in ("frontier_l0_ev.png", "feature_density.png", "loss_curves.png"):
        assert (root / png).stat().st_size > 5000
        assert sorted(drawn[png]) == names, png
    assert drawn["frontier_l0_ce.png"] == []  # no CE metrics without evaluation


def test_sweep_in_memory_groups_matches_one_group(tmp_path, monkeypatch):
    sparse_dump(tmp_path / "dump", n_rows=2048, n_features=4, per_row=1)
    one = train_sweep(_base(tmp_path, "one", total_training_tokens=2048), GRID, progress=False)
    logs = []
    # Room for about two of the four SAEs beside the loader's buffers.
    room = 2 * sweep_mod.sae_bytes(32, 96, 256) + 3 * 4096 * 32 * 4
    monkeypatch.setattr(sweep_mod, "free_bytes", lambda device: room / sweep_mod.MEMORY_HEADROOM)
    grouped = train_sweep(_base(tmp_path, "grouped", total_training_tokens=2048), GRID, progress=False,
                          log=logs.append)
    assert any("in 2 groups" in line or "in 3 groups" in line for line in logs), logs
    for a, b in zip(one, grouped):
        assert (a.final / "sae_weights.safetensors").read_bytes() == (b.final / "sae_weights.safetensors").read_bytes()


def test_sweep_logs_one_wandb_run_per_sae_plus_summary(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    sparse_dump(tmp_path / "dump", n_rows=1024)
    cfg = small_cfg(tmp_path / "dump", tmp_path / "sw", total_training_tokens=512, log_to_wandb=True)
    train_sweep(cfg, {"l1_coefficient": [0.1, 0.2]}, progress=False)
    assert len(list((tmp_path / "sw").glob("*/wandb/offline-run-*"))) == 2  # one per SAE
    assert len(list((tmp_path / "sw").glob("wandb/offline-run-*"))) == 1  # the summary run


def test_sweep_from_cli_and_config_file(tmp_path):
    sparse_dump(tmp_path / "dump", n_rows=1024)
    conf = tmp_path / "sweep.yaml"
    conf.write_text("train_batch_size: 128\ntotal_training_tokens: 512\ndevice: cpu\n"
                    f"checkpoint_path: {tmp_path / 'runs'}\nsweep:\n  l1_coefficient: [0.1, 0.2]\n")
    got = CliRunner().invoke(train_main, ["--shards", str(tmp_path / "dump"), "--config", str(conf),
                                          "--sweep", "expansion_factor=2,3", "--quiet"])
    assert got.exit_code == 0, got.output
    assert len(list(csv.DictReader(open(tmp_path / "runs" / "summary.csv")))) == 4
    bad = CliRunner().invoke(train_main, ["--shards", str(tmp_path / "dump"), "--sweep", "train_batch_size=64,128"])
    assert bad.exit_code == 2 and "share one data stream" in bad.output


def test_helpers():
    assert parse_sweep_flags(("l1_coefficient=1e-4,3e-4", "expansion_factor=16")) == \
        {"l1_coefficient": [1e-4, 3e-4], "expansion_factor": [16]}
    assert groups_that_fit([3, 3, 3, 5], budget=7) == [[0, 1], [2], [3]]
    assert pareto_front([1, 2, 3, 4], [0.5, 0.4, 0.7, 0.9]) == [0, 2, 3]


def test_sweep_evaluated_with_the_model(tiny_model, token_dataset, tmp_path):
    """Sweep on a harvested dump, evaluated at the end with the model spliced: every SAE gets CE
    metrics in the summary, the CE frontier plot is drawn, and `evaluate` on the folder redoes it."""
    from helpers import run_harvest

    from train.config import LanguageModelSAERunnerConfig
    from train.evaluation.cli import main as evaluate_main

    run_harvest("--model", str(tiny_model), "--dataset", str(token_dataset), "--out", str(tmp_path / "dump"),
                "--context-size", "32", "--tokens", "3200", "--shard-rows", "1000")
    cfg = LanguageModelSAERunnerConfig(shards=str(tmp_path / "dump"), checkpoint_path=str(tmp_path / "sw"),
                                       train_batch_size=128, total_training_tokens=2048, device="cpu",
                                       eval_holdout_contexts=10, evaluate_at_end=True, lr=1e-3)
    results = train_sweep(cfg, {"l1_coefficient": [0.01, 0.1], "expansion_factor": [1, 2]}, progress=False)
    rows = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert len(rows) == 4
    for row, r in zip(rows, results):
        assert r.evaluation["n_eval_contexts"] == 10
        assert row["ce_with_sae"] == pytest.approx(r.evaluation["ce_with_sae"])
        assert row["eval_l0"] is not None and row["ce_clean"] is not None
    assert (tmp_path / "sw" / "frontier_l0_ce.png").stat().st_size > 5000
    assert len(json.loads((tmp_path / "sw" / "plots.json").read_text())["frontier_l0_ce.png"]) == 4
    (tmp_path / "sw" / "summary.json").unlink()
    got = CliRunner().invoke(evaluate_main, [str(tmp_path / "sw"), "--max-eval-contexts", "4"])
    assert got.exit_code == 0, got.output
    again = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert len(again) == 4 and all(r["ce_with_sae"] is not None for r in again)
    shown = CliRunner().invoke(evaluate_main, [str(results[0].run_dir), "--top-examples", "2", "--features", "0,1"])
    assert shown.exit_code == 0 and shown.output.count("[[") >= 1, shown.output


def test_interrupted_sweep_resumes_to_the_same_weights(tmp_path):
    sparse_dump(tmp_path / "dump", n_rows=2048, n_features=4, per_row=1)
    results = train_sweep(_base(tmp_path, "sw", total_training_tokens=4096), GRID, progress=False)
    want = {r.run_dir.name: (r.final / "sae_weights.safetensors").read_bytes() for r in results}
    for r in results:  # as if the run died after the mid-run checkpoint
        import shutil

        shutil.rmtree(r.final)
    got = CliRunner().invoke(train_main, ["--resume-from", str(tmp_path / "sw"), "--quiet"])
    assert got.exit_code == 0, got.output
    for name, weights in want.items():
        assert (tmp_path / "sw" / name / "final" / "sae_weights.safetensors").read_bytes() == weights, name
    assert len(json.loads((tmp_path / "sw" / "summary.json").read_text())) == 4
