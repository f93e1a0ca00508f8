"""benchmarks/target_l0.py, the README's target-L0 table: "off by" is the held-out L0 against the
L0 asked for (target_l0 or k), and the seed table gives each group's mean and min-max."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "target_l0.py"


@pytest.fixture
def report():
    spec = importlib.util.spec_from_file_location("target_l0_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sweep(tmp_path: Path, saes: list[tuple[str, dict, dict]]) -> Path:
    """A sweep folder as `evaluate SWEEP` leaves it: summary.json and each SAE's final/cfg.json."""
    rows = []
    for name, cfg, figures in saes:
        (tmp_path / name / "final").mkdir(parents=True)
        (tmp_path / name / "final" / "cfg.json").write_text(json.dumps(cfg))
        rows.append({"name": name, "architecture": cfg["architecture"], "folder": str(tmp_path / name)} | figures)
    (tmp_path / "summary.json").write_text(json.dumps(rows))
    return tmp_path


def test_off_by_is_the_held_out_l0_against_the_l0_asked_for(tmp_path, report):
    folder = sweep(tmp_path, [
        ("jr", {"architecture": "jumprelu", "target_l0": 50.0, "l0_coefficient": 1.0,
                "sparsity_coefficient_reached": 1.42}, {"eval_l0": 45.0, "eval_explained_variance": 0.7}),
        ("tk", {"architecture": "topk", "k": 20}, {"eval_l0": 21.0, "eval_explained_variance": 0.6}),
    ])
    rows = report.rows_of([folder])
    assert [r["architecture"] for r in rows] == ["jumprelu", "topk"]
    assert [round(100 * report.off_by(r), 6) for r in rows] == [-10.0, 5.0]
    lines = report.table(rows).splitlines()
    assert "| jumprelu | 50 | 45.0 | -10.0% | 0.700 | - | - | L0 1 -> 1.42 |" in lines
    assert "| topk | 20 | 21.0 | +5.0% | 0.600 | - | - | - (k) |" in lines


def test_the_seed_table_gives_each_groups_mean_and_range(tmp_path, report):
    folder = sweep(tmp_path, [
        (f"s{seed}", {"architecture": "standard", "target_l0": 50.0, "init_seed": seed, "l1_coefficient": 1.2},
         {"eval_l0": l0, "eval_explained_variance": ev})
        for seed, (l0, ev) in enumerate([(49.0, 0.30), (51.0, 0.36), (50.0, 0.33)])])
    lines = report.seed_table(report.rows_of([folder])).splitlines()
    assert lines[0] == "| architecture | L0 asked | seeds | held-out L0 | explained variance |"
    assert lines[2] == "| standard | 50 | 3 | 50.0 (49.0-51.0) | 0.330 (0.300-0.360) |"
