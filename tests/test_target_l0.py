"""target_l0: the sparsity coefficient of standard, gated and jumprelu steered toward a target L0
(`train.sparsity_control`): it lands there on held-out rows, resumes bit for bit, is logged and
saved, sweeps like any SAE setting, and bad values are refused in one line."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from test_architectures import cfg_for
from test_train import small_cfg, sparse_dump
from train.arch_settings import without_unused
from shared.errors import UserError
from train.cli import main as train_main
from train.config import LanguageModelSAERunnerConfig
from train.evaluate import EvalConfig, evaluate_checkpoint
from train.run import train
from train.sparsity_control import GLIDE_FRACTION, SparsityControl
from train.sweep import train_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

STEERED = ["standard", "gated", "jumprelu"]


@pytest.fixture
def dump(tmp_path):
    return sparse_dump(tmp_path / "dump", n_rows=2048, n_features=16, per_row=2)


def planted_cfg(tmp_path, run: str, steps: int, **kw) -> LanguageModelSAERunnerConfig:
    """64 planted directions in 32 dimensions (the dump in tmp_path / "planted"), 128 features; 32
    contexts (2,048 rows) held out for `evaluate`."""
    cfg = small_cfg(tmp_path / "planted", tmp_path / run, total_training_tokens=256 * steps, expansion_factor=4,
                    normalize_activations="expected_norm", eval_holdout_contexts=32, lr=3e-3, l1_coefficient=None,
                    feature_sampling_window=10_000, wandb_log_frequency=20, **kw)
    return LanguageModelSAERunnerConfig.from_dict(without_unused(cfg))


def test_each_architecture_lands_within_10_percent_of_two_targets(tmp_path):
    """400 steps of a lockstep sweep, each SAE starting from its architecture's default coefficient,
    6 planted directions per row (the natural L0 is 6), one target below it and one above (measured:
    held-out L0 within 1-6% of the target for each of the six). Far above a planted L0 (3 per row,
    targets 6 and 10) JumpReLU cannot be held there: extra firing only adds error, its thresholds
    rise whatever the coefficient, and it ended 12-20% low."""
    sparse_dump(tmp_path / "planted", n_rows=16384, d_in=32, n_features=64, per_row=6)
    targets = [4.0, 8.0]
    results = train_sweep(planted_cfg(tmp_path, "sweep", 400), {"architecture": STEERED, "target_l0": targets},
                          progress=False)
    got = {}
    for r in results:
        ev = evaluate_checkpoint(r.final, EvalConfig(holdout_contexts=32, with_model=False, device="cpu", verify=False))
        got[(r.trainer.cfg.architecture, r.trainer.cfg.target_l0)] = ev["l0"]
    assert sorted(got) == sorted((a, t) for a in STEERED for t in targets)
    for (arch, target), l0 in got.items():
        assert abs(l0 / target - 1) <= 0.10, (arch, target, l0, got)


@pytest.mark.parametrize("arch", STEERED)
def test_resume_equals_uninterrupted_and_the_coefficient_path_is_logged(tmp_path, dump, arch):
    full = train(cfg_for(tmp_path, arch, "full", target_l0=3.0), progress=False)
    index = json.loads((full.run_dir / "checkpoints.json").read_text())
    shutil.copytree(full.run_dir / index[0]["folder"], tmp_path / "mid")
    resumed = train(cfg_for(tmp_path, arch, "resumed", target_l0=3.0), resume_from=tmp_path / "mid", progress=False)
    for name in ("sae_weights.safetensors", "trainer_state.safetensors"):
        assert (resumed.final / name).read_bytes() == (full.final / name).read_bytes(), (arch, name)
    state = load_file(str(full.final / "trainer_state.safetensors"))
    assert {"sparsity_control.log_multiplier", "sparsity_control.integral", "sparsity_control.l0_ema",
            "sparsity_control.log_l0_start"} <= set(state)
    assert float(state["sparsity_control.log_multiplier"]) != 0.0  # it steered
    rows = [json.loads(line) for line in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    path = [row["sparsity_coefficient"] for row in rows if "l0" in row]
    assert len(path) >= 2 and len(set(path)) == len(path), path  # one value per logged step, moving
    cfg = json.loads((full.final / "cfg.json").read_text())
    assert cfg["target_l0"] == 3.0 and cfg["sparsity_coefficient_reached"] == pytest.approx(path[-1])
    resumed_rows = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["sparsity_coefficient"] for r in resumed_rows if "l0" in r] == path[-len(
        [r for r in resumed_rows if "l0" in r]):]


def test_without_a_target_nothing_is_steered_or_logged(tmp_path, dump):
    run = train(cfg_for(tmp_path, "jumprelu", "plain", n_checkpoints=0), progress=False)
    rows = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not any("sparsity_coefficient" in row for row in rows)
    assert not any(k.startswith("sparsity_control.") for k in load_file(str(run.final / "trainer_state.safetensors")))


def test_a_sweep_over_target_l0_equals_separate_runs(tmp_path, dump):
    base = cfg_for(tmp_path, "jumprelu", "sweep", n_checkpoints=0, total_training_tokens=256 * 12)
    results = train_sweep(base, {"target_l0": [2.0, 4.0]}, progress=False)
    assert [r.run_dir.name for r in results] == ["target_l0_2", "target_l0_4"]
    for target, r in zip([2.0, 4.0], results):
        solo = train(cfg_for(tmp_path, "jumprelu", f"solo_{target:g}", n_checkpoints=0, total_training_tokens=256 * 12,
                             target_l0=target), progress=False)
        for name in ("sae_weights.safetensors", "trainer_state.safetensors"):
            assert (r.final / name).read_bytes() == (solo.final / name).read_bytes(), (target, name)


@pytest.mark.parametrize("args, says", [
    (["--target-l0", "-5"], "target_l0 must be a positive finite number, got -5"),
    (["--target-l0", "0"], "target_l0 must be a positive finite number, got 0"),
    (["--target-l0", "64"], "target_l0 must be below d_sae (64"),
    (["--architecture", "topk", "--target-l0", "20"], "topk fixes L0 by k"),
    (["--architecture", "batchtopk", "--sweep", "target_l0=20,50"], "batchtopk fixes L0 by k"),
])
def test_bad_values_are_refused_in_one_line(tmp_path, dump, args, says):
    got = CliRunner().invoke(train_main, ["--shards", str(tmp_path / "dump"), "--quiet", "--expansion-factor", "2",
                                          "--checkpoint-path", str(tmp_path / "run"), *args])
    message = got.output.strip()
    assert got.exit_code == 2 and "\n" not in message and says in message, message
    assert not (tmp_path / "run").exists()


def test_a_resume_may_not_switch_the_controller_on_or_off(tmp_path, dump):
    full = train(cfg_for(tmp_path, "standard", "full", target_l0=3.0), progress=False)
    index = json.loads((full.run_dir / "checkpoints.json").read_text())
    with pytest.raises(Exception, match="was trained with a target_l0, this run asks for none"):
        train(cfg_for(tmp_path, "standard", "off"), resume_from=full.run_dir / index[0]["folder"], progress=False)


def test_the_goal_glides_from_the_first_l0_down_to_the_target():
    """The goal starts at the first controlled step's L0 and reaches the target after GLIDE_FRACTION
    of the controlled steps (log-linearly), then stays; a start below the target has no glide."""
    control = SparsityControl(10.0, start_step=5, device=torch.device("cpu"), total_steps=45)
    assert control.glide_steps == round(GLIDE_FRACTION * 40)
    control.update_(torch.tensor(1000.0), step=5)
    goal = [float(control.log_goal(s).exp()) for s in range(5, 5 + control.glide_steps + 3)]
    assert goal[0] == pytest.approx(1000.0, rel=1e-5) and goal[control.glide_steps] == pytest.approx(10.0, rel=1e-5)
    half = control.glide_steps // 2
    assert goal[half] == pytest.approx(10.0 * 100.0 ** (1 - half / control.glide_steps), rel=1e-4)
    assert all(a > b for a, b in zip(goal[:control.glide_steps], goal[1:control.glide_steps + 1]))
    assert goal[-1] == pytest.approx(10.0, rel=1e-5)
    below = SparsityControl(10.0, start_step=0, device=torch.device("cpu"), total_steps=40)
    below.update_(torch.tensor(4.0), step=0)
    assert float(below.log_goal(0).exp()) == pytest.approx(10.0, rel=1e-5)


def test_the_glide_eases_the_first_steps(tmp_path):
    """Right after the first controlled step the error is measured against the goal, not the far
    target: an L0 100 times the target moves the coefficient little (a plain PI would at once
    multiply it by e, the clamped error's P term)."""
    control = SparsityControl(10.0, start_step=0, device=torch.device("cpu"), total_steps=400)
    control.update_(torch.tensor(1000.0), step=0)
    assert float(control.multiplier()) == pytest.approx(1.0, abs=1e-6)


def test_a_checkpoint_from_before_the_glide_resumes_with_its_goal_at_the_target(tmp_path, dump):
    """A checkpoint written before the glide (no sparsity_control.log_l0_start) still resumes; any
    other missing controller tensor is damage, refused in one line."""
    full = train(cfg_for(tmp_path, "standard", "full", target_l0=3.0), progress=False)
    index = json.loads((full.run_dir / "checkpoints.json").read_text())
    for missing, ok in (("sparsity_control.log_l0_start", True), ("sparsity_control.integral", False)):
        mid = tmp_path / f"mid_{ok}"
        shutil.copytree(full.run_dir / index[0]["folder"], mid)
        tensors = load_file(str(mid / "trainer_state.safetensors"))
        del tensors[missing]
        save_file(tensors, str(mid / "trainer_state.safetensors"))
        if ok:
            resumed = train(cfg_for(tmp_path, "standard", f"resumed_{ok}", target_l0=3.0), resume_from=mid,
                            progress=False)
            state = load_file(str(resumed.final / "trainer_state.safetensors"))
            assert float(state["sparsity_control.log_l0_start"]) == pytest.approx(math.log(3.0))
        else:
            with pytest.raises(UserError, match="damaged"):
                train(cfg_for(tmp_path, "standard", f"resumed_{ok}", target_l0=3.0), resume_from=mid, progress=False)
