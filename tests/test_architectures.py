"""Every architecture through the generic machinery: config, sweeps, checkpoints, exact resume."""
from __future__ import annotations

import json
import shutil
from dataclasses import fields, replace

import pytest
import torch
from click.testing import CliRunner

from shared.saes import ARCHITECTURES, SAE, SAEConfig, load_sae
from test_train import small_cfg, sparse_dump
from train.arch_settings import specific_settings, used_settings, without_unused
from train.cli import main as train_main
from train.config import LanguageModelSAERunnerConfig
from train.run import train
from train.sweep import grid, train_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

# Small settings each architecture can train with on a 32-wide toy dump. Its keys, not the registry,
# name the architectures the tests run: one missing from the registry fails them instead of
# silently dropping out of the parametrisations.
SETTINGS = {"standard": dict(l1_coefficient=0.05), "gated": dict(l1_coefficient=0.05),
            "topk": dict(k=4, aux_k=8), "batchtopk": dict(k=4, aux_k=8),
            "matryoshka_batchtopk": dict(k=4, aux_k=8, matryoshka_widths=[16, 64]),
            "jumprelu": dict(l0_coefficient=0.01, jumprelu_init_threshold=0.05),
            "crosscoder": dict(l1_coefficient=0.05)}
ALL = sorted(SETTINGS)
LAYERED = ["jumprelu_clt", "topk_clt"]
"""Cross-layer transcoders read one dump per layer and write another: tests/test_clt_crosscoder.py."""


def cfg_for(tmp_path, arch: str, run: str, **kw) -> LanguageModelSAERunnerConfig:
    settings = dict(architecture=arch, total_training_tokens=256 * 24, n_checkpoints=2, feature_sampling_window=8,
                    dead_feature_window=4, normalize_activations="expected_norm") | SETTINGS[arch] | kw
    # small_cfg sets resampling settings; an architecture that does not resample must not get them.
    return LanguageModelSAERunnerConfig.from_dict(without_unused(small_cfg(tmp_path / "dump", tmp_path / run, **settings)))


@pytest.fixture
def dump(tmp_path):
    return sparse_dump(tmp_path / "dump", n_rows=2048, n_features=16, per_row=2)


def test_the_registry_holds_exactly_the_tested_architectures():
    """A new architecture needs its test settings here; a lost or miswired entry fails."""
    assert sorted(ARCHITECTURES) == sorted(ALL + LAYERED)
    for name in ALL + LAYERED:
        cls = ARCHITECTURES[name]
        assert isinstance(cls, type) and issubclass(cls, SAE) and cls.architecture == name, (name, cls)


def test_every_architecture_setting_is_a_config_key_owned_by_the_sae():
    group = {f.name: f.metadata["group"] for f in fields(LanguageModelSAERunnerConfig)}
    defaults = {f.name: f.default for f in fields(LanguageModelSAERunnerConfig)}
    for name, cls in ARCHITECTURES.items():
        for f in fields(cls.Settings):
            assert group.get(f.name) == "sae", (name, f.name)
    for name in specific_settings():
        assert defaults[name] is None, name  # so a given value can be told from a default
    assert "k" in used_settings(ARCHITECTURES["topk"])
    assert "feature_sampling_method" in used_settings(ARCHITECTURES["standard"])


def test_a_setting_no_sae_uses_is_refused(tmp_path, dump):
    got = CliRunner().invoke(train_main, ["--shards", str(tmp_path / "dump"), "--k", "32", "--quiet",
                                          "--checkpoint-path", str(tmp_path / "run")])
    assert got.exit_code == 2
    message = got.output.strip()
    assert "\n" not in message and "k is a setting of topk" in message and "standard" in message, message
    assert not (tmp_path / "run").exists()
    got = CliRunner().invoke(train_main, ["--shards", str(tmp_path / "dump"), "--architecture", "topk",
                                          "--l1-coefficient", "2", "--quiet"])
    assert got.exit_code == 2 and "l1_coefficient is a setting of" in got.output


def test_a_grid_across_architectures_keeps_only_the_settings_each_uses(tmp_path):
    base = LanguageModelSAERunnerConfig(shards=str(tmp_path))
    names = [name for name, _ in grid(base, {"architecture": ["topk", "jumprelu"], "k": [32, 64]})]
    assert names == ["architecture_topk__k_32", "architecture_topk__k_64", "architecture_jumprelu"]
    cfgs = dict(grid(base, {"architecture": ["topk", "jumprelu"], "k": [32, 64]}))
    assert cfgs["architecture_jumprelu"].k is None and cfgs["architecture_topk__k_64"].k == 64
    with pytest.raises(Exception, match="cannot sweep 'train_batch_size'.*data stream"):
        grid(base, {"train_batch_size": [1, 2]})
    with pytest.raises(Exception, match="k is a setting of"):
        grid(base, {"architecture": ["standard", "gated"], "k": [32, 64]})


@pytest.mark.parametrize("arch", ALL)
def test_every_architecture_takes_any_leading_dims(arch):
    """Evaluation splices the SAE into the model, where activations are [batch, pos, d_in]."""
    cls = ARCHITECTURES[arch]
    torch.manual_seed(0)
    sae = cls(SAEConfig(8, 64), cls.settings_from(SETTINGS[arch]))
    x = torch.randn(3, 5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = sae(x)
        flat = sae(x.reshape(15, 8))
    assert out.sae_out.shape == (3, 5, 8) and out.feature_acts.shape == (3, 5, 64)
    torch.testing.assert_close(out.sae_out.reshape(15, 8), flat.sae_out)
    torch.testing.assert_close(out.feature_acts.reshape(15, 64), flat.feature_acts)


def test_config_sections_partition_the_settings():
    cfg = LanguageModelSAERunnerConfig()
    sections = {g: cfg.section(g) for g in ("data", "sae", "optimizer", "dead_features", "evaluation", "run", "logging")}
    names = [n for s in sections.values() for n in s]
    assert sorted(names) == sorted(f.name for f in fields(cfg)) and len(names) == len(set(names))
    assert "train_batch_size" in sections["data"] and "k" in sections["sae"] and "lr" in sections["optimizer"]


@pytest.mark.parametrize("arch", ALL)
def test_resume_equals_uninterrupted_and_checkpoints_load(tmp_path, dump, arch):
    """Every parameter and buffer (thresholds, running estimates) with its Adam state survives."""
    full = train(cfg_for(tmp_path, arch, "full"), progress=False)
    index = json.loads((full.run_dir / "checkpoints.json").read_text())
    middle = full.run_dir / index[0]["folder"]
    shutil.copytree(middle, tmp_path / "mid")
    resumed = train(cfg_for(tmp_path, arch, "resumed"), resume_from=tmp_path / "mid", progress=False)
    for name in ("sae_weights.safetensors", "trainer_state.safetensors"):
        assert (resumed.final / name).read_bytes() == (full.final / name).read_bytes(), (arch, name)
    # The saved SAE works on raw activations and equals the trained one (trained on scaled inputs).
    loaded = load_sae(full.final)
    x = torch.randn(64, 32, generator=torch.Generator().manual_seed(3))
    scale = full.trainer.input_scale
    with torch.no_grad():
        trained = full.sae(x * scale)
        got = loaded(x)
    torch.testing.assert_close(got.feature_acts, trained.feature_acts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.sae_out, trained.sae_out / scale, rtol=1e-4, atol=1e-5)
    cfg = json.loads((full.final / "cfg.json").read_text())
    assert cfg["trained_architecture"] == arch and cfg["metadata"]["hook_name"]
    if arch in ("batchtopk", "matryoshka_batchtopk"):
        # The saved threshold is calibrated at every save, from rows seeded by the step (so the
        # resumed run's final weights above equal the uninterrupted run's), and differs from the
        # running one; the trained SAE uses it too once saved (the comparison above).
        n_train = full.trainer.row_sampler(10**9, 0).input.shape[0]
        for folder in (middle, full.final):
            saved = json.loads((folder / "cfg.json").read_text())
            assert saved["threshold_calibrated_rows"] == min(n_train, saved["threshold_sample_rows"]), folder
        assert loaded.threshold[0].item() != pytest.approx(cfg["threshold_running"], rel=1e-6)


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk"])
def test_threshold_calibration_changes_only_the_saved_threshold(tmp_path, dump, arch):
    """Calibrating before each save leaves training alone: the same trainer state as a run that
    saves the running threshold, and the same saved tensors but the threshold."""
    from safetensors.torch import load_file

    runs = {rows: train(cfg_for(tmp_path, arch, f"rows{rows}", threshold_sample_rows=rows), progress=False)
            for rows in (0, 512)}
    assert (runs[0].final / "trainer_state.safetensors").read_bytes() == \
        (runs[512].final / "trainer_state.safetensors").read_bytes()
    plain, calibrated = (load_file(str(runs[r].final / "sae_weights.safetensors")) for r in (0, 512))
    assert sorted(plain) == sorted(calibrated)
    for name in plain:
        assert torch.equal(plain[name], calibrated[name]) == (name != "threshold"), name
    cfgs = [json.loads((runs[r].final / "cfg.json").read_text()) for r in (0, 512)]
    assert [c["threshold_calibrated_rows"] for c in cfgs] == [0, 512]
    assert plain["threshold"][0].item() == pytest.approx(cfgs[0]["threshold_running"])
    assert cfgs[0]["threshold_running"] == cfgs[1]["threshold_running"]


def test_mixed_architecture_sweep_equals_solo_runs(tmp_path, dump):
    archs = ALL
    base = cfg_for(tmp_path, "standard", "sweep", n_checkpoints=0, total_training_tokens=256 * 8)
    base = LanguageModelSAERunnerConfig.from_dict(base.to_dict() | {"l1_coefficient": None})
    sweep = {"architecture": archs}
    results = train_sweep(base, sweep, progress=False)
    assert [r.run_dir.name for r in results] == [f"architecture_{a}" for a in archs]
    for arch, r in zip(archs, results):
        solo_cfg = LanguageModelSAERunnerConfig.from_dict(without_unused(replace(
            base, architecture=arch, checkpoint_path=str(tmp_path / f"solo_{arch}"))))
        solo = train(solo_cfg, progress=False)
        assert (r.final / "sae_weights.safetensors").read_bytes() == \
            (solo.final / "sae_weights.safetensors").read_bytes(), arch


def test_list_settings_and_run_names():
    cfg = LanguageModelSAERunnerConfig(architecture="matryoshka_batchtopk", matryoshka_widths="64,256,1024")
    assert cfg.matryoshka_widths == [64, 256, 1024]
    with pytest.raises(Exception, match="matryoshka_widths must be a list of whole numbers"):
        LanguageModelSAERunnerConfig(matryoshka_widths="a,b")
    # The seed's run name for standard SAEs; others say their architecture and sparsity setting.
    assert LanguageModelSAERunnerConfig().default_run_name(512, "d") == "32768-L1-1.2-LR-0.0001-d"
    assert LanguageModelSAERunnerConfig(architecture="topk", k=32).default_run_name(512, "d") == \
        "topk-32768-k-32-LR-0.0001-d"


def test_auxk_runs_only_once_some_feature_is_dead():
    """AuxK's top-k over the dead latents is skipped while none is dead (checked on log steps)."""
    from train.sae_trainer import SAETrainer

    cfg = LanguageModelSAERunnerConfig(architecture="topk", k=4, dead_feature_window=3, wandb_log_frequency=2,
                                       train_batch_size=8, device="cpu")
    trainer = SAETrainer(cfg, d_in=8, input_scale=1.0, total_steps=100, device=torch.device("cpu"))
    assert trainer.auxk_mask() is None  # step 0: nothing can have been silent for 3 steps
    trainer.counters.step = 4
    trainer.tokens_since_fired[5] = 3 * 8  # feature 5 silent for the whole window
    mask = trainer.auxk_mask()
    assert mask is not None and mask.tolist() == [i == 5 for i in range(trainer.sae.cfg.d_sae)]
    trainer.tokens_since_fired.zero_()
    trainer.counters.step = 5  # not a check step: the last check's answer holds
    assert trainer.auxk_mask() is not None and not trainer.auxk_mask().any()
    trainer.counters.step = 6
    assert trainer.auxk_mask() is None
