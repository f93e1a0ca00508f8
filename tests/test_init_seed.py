"""`init_seed`: the SAE's initialisation seed apart from the data order (`seed`), sweepable, and
the sweep summary's mean and spread across seeds."""
from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from test_train import small_cfg, sparse_dump
from train.evaluation.cli import main as evaluate_main
from train.run import train
from train.summary import _frontier_plot, _seed_points, add_seed_stats, seed_groups
from train.sweep import grid, train_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

WEIGHTS = "sae_weights.safetensors"


def _cfg(tmp_path, run, **kw):
    return small_cfg(tmp_path / "dump", tmp_path / run, **({"total_training_tokens": 1024} | kw))


def _weights(result) -> bytes:
    return (result.final / WEIGHTS).read_bytes()


def test_init_seed_changes_the_init_only_and_defaults_to_seed(tmp_path):
    sparse_dump(tmp_path / "dump", n_rows=1024, n_features=4, per_row=1)
    default = train(_cfg(tmp_path, "default"), progress=False)  # small_cfg's seed is 7
    same = train(_cfg(tmp_path, "same", init_seed=7), progress=False)
    other = train(_cfg(tmp_path, "other", init_seed=8), progress=False)
    assert _weights(same) == _weights(default)  # bit for bit: None means `seed`
    assert _weights(other) != _weights(default)
    # The init is init_seed's alone: another `seed` (data order, resampling) leaves it as it was.
    import torch

    from train.sae_trainer import SAETrainer

    def init(**kw):
        t = SAETrainer(_cfg(tmp_path, "unused", **kw), 32, 1.0, 4, torch.device("cpu"))
        return {k: v.clone() for k, v in t.sae.state_dict().items()}

    held = init(seed=7, init_seed=3)
    for k, v in init(seed=8, init_seed=3).items():
        assert torch.equal(v, held[k]), k
    assert all(torch.equal(v, init(seed=7)[k]) for k, v in init(seed=1, init_seed=7).items())
    assert not torch.equal(init(seed=7, init_seed=4)["W_enc"], held["W_enc"])


def test_sweep_over_init_seed_equals_separate_runs_and_names_it_only_where_swept(tmp_path):
    sparse_dump(tmp_path / "dump", n_rows=1024, n_features=4, per_row=1)
    results = train_sweep(_cfg(tmp_path, "sweep"), {"init_seed": [0, 1]}, progress=False)
    assert [r.run_dir.name for r in results] == ["init_seed_0", "init_seed_1"]
    for r, seed in zip(results, (0, 1)):
        solo = train(_cfg(tmp_path, f"solo{seed}", init_seed=seed), progress=False)
        assert _weights(r) == _weights(solo), seed
    assert _weights(results[0]) != _weights(results[1])
    names = [name for name, _ in grid(_cfg(tmp_path, "x", init_seed=3), {"l1_coefficient": [0.1, 0.2]})]
    assert names == ["l1_coefficient_0.1", "l1_coefficient_0.2"]


def test_sweep_summary_has_mean_and_spread_across_seeds(tmp_path):
    sparse_dump(tmp_path / "dump", n_rows=1024, n_features=4, per_row=1)
    cfg = _cfg(tmp_path, "sw", eval_holdout_contexts=2)
    train_sweep(cfg, {"l1_coefficient": [0.05, 0.3], "init_seed": [0, 1, 2]}, progress=False)
    got = CliRunner().invoke(evaluate_main, [str(tmp_path / "sw"), "--no-model", "--device", "cpu", "--quiet"])
    assert got.exit_code == 0, got.output
    rows = json.loads((tmp_path / "sw" / "summary.json").read_text())
    assert len(rows) == 6 and all(r["n_seeds"] == 3 for r in rows)
    for l1 in (0.05, 0.3):
        group = [r for r in rows if r["l1_coefficient"] == l1]
        ev = np.array([r["eval_explained_variance"] for r in group])
        for r in group:
            assert r["eval_explained_variance_mean"] == pytest.approx(ev.mean())
            assert r["eval_explained_variance_std"] == pytest.approx(ev.std(ddof=1))
            assert (r["eval_l0_min"], r["eval_l0_max"]) == (min(g["eval_l0"] for g in group),
                                                            max(g["eval_l0"] for g in group))
    header = (tmp_path / "sw" / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"n_seeds", "eval_explained_variance_mean", "eval_explained_variance_std"} <= set(header)
    drawn = json.loads((tmp_path / "sw" / "plots.json").read_text())
    assert len(drawn["frontier_l0_ev.png"]) == 6  # every SAE, drawn as 2 points with error bars
    assert len(drawn["feature_density.png"]) == 6


def test_seed_aggregation_on_a_hand_made_table(tmp_path):
    rows = [
        {"name": "a0", "architecture": "topk", "k": 8, "init_seed": 0, "eval_l0": 8.0, "eval_explained_variance": 0.5},
        {"name": "a1", "architecture": "topk", "k": 8, "init_seed": 1, "eval_l0": 8.0, "eval_explained_variance": 0.7},
        {"name": "a2", "architecture": "topk", "k": 8, "init_seed": 2, "eval_l0": 8.0, "eval_explained_variance": 0.9},
        {"name": "b0", "architecture": "topk", "k": 16, "init_seed": 0, "eval_l0": 16.0, "eval_explained_variance": 0.8},
        {"name": "b1", "architecture": "topk", "k": 16, "init_seed": 1, "eval_l0": 15.0},  # no EV for this one
        {"name": "c0", "architecture": "standard", "k": None, "init_seed": 0, "eval_l0": 30.0,
         "eval_explained_variance": 0.6},
    ]
    swept = ["architecture", "k", "init_seed"]
    assert seed_groups(rows, swept) == [[0, 1, 2], [3, 4], [5]]
    assert seed_groups(rows, ["architecture", "k"]) is None
    added = add_seed_stats(rows, swept)
    assert added[0] == "n_seeds" and "eval_explained_variance_mean" in added
    assert [r["n_seeds"] for r in rows] == [3, 3, 3, 2, 2, 1]
    for r in rows[:3]:
        assert r["eval_explained_variance_mean"] == pytest.approx(0.7)
        assert r["eval_explained_variance_std"] == pytest.approx(0.2)  # sample std of .5, .7, .9
        assert (r["eval_explained_variance_min"], r["eval_explained_variance_max"]) == (0.5, 0.9)
    assert "eval_explained_variance_mean" not in rows[3]  # a member lacks it: no aggregate
    assert rows[3]["eval_l0_mean"] == 15.5 and rows[3]["eval_l0_std"] == pytest.approx(np.std([16, 15], ddof=1))
    assert rows[5]["eval_explained_variance_mean"] == 0.6 and rows[5]["eval_explained_variance_std"] is None
    points = _seed_points(rows, swept, "eval_l0", "eval_explained_variance")
    assert [p["members"] for p in points] == [["a0", "a1", "a2"], ["c0"]]
    assert points[0]["eval_explained_variance"] == pytest.approx(0.7)
    assert points[0]["yerr"] == pytest.approx([0.2, 0.2]) and points[0]["xerr"] == [0.0, 0.0]
    assert add_seed_stats([dict(r) for r in rows], ["architecture", "k"]) == []  # init_seed not swept

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = _frontier_plot(rows, "eval_explained_variance", "explained variance", tmp_path / "f.png", plt, swept)
    assert drawn == ["a0", "a1", "a2", "c0"] and (tmp_path / "f.png").stat().st_size > 5000
