"""Training from a dump: resume equals uninterrupted, sparse directions are recovered, checkpoints
load, and bad configs get clear errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from shared.dump_writer import write_dump
from shared.errors import DumpError, UserError
from shared.sae import SparseAutoencoder
from train.cli import main as train_main
from train.config import LanguageModelSAERunnerConfig
from train.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_dump(folder: Path, n_rows=16384, d_in=32, n_features=48, per_row=3, seed=0):
    """Rows = sums of a few of `n_features` random unit directions with positive weights."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(n_features, d_in, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)
    idx = torch.stack([torch.randperm(n_features, generator=g)[:per_row] for _ in range(n_rows)])
    coef = torch.rand(n_rows, per_row, generator=g) + 0.5
    acts = torch.einsum("rk,rkd->rd", coef, dirs[idx])
    write_dump(folder, acts, context_size=64, shard_rows=5000)
    return dirs


def small_cfg(dump: Path, run: Path, **kw) -> LanguageModelSAERunnerConfig:
    base = dict(shards=str(dump), checkpoint_path=str(run), expansion_factor=2, train_batch_size=256,
                lr=3e-3, l1_coefficient=0.05, feature_sampling_window=40, dead_feature_window=20,
                resample_sample_rows=4096, wandb_log_frequency=10, device="cpu", seed=7,
                shuffle_buffer_rows=4096, eval_holdout_contexts=0)
    base.update(kw)
    return LanguageModelSAERunnerConfig(**base)


def test_recovers_known_sparse_directions(tmp_path):
    dirs = sparse_dump(tmp_path / "dump")
    cfg = small_cfg(tmp_path / "dump", tmp_path / "run", d_sae=96, total_training_tokens=16384 * 40,
                    feature_sampling_method="anthropic", feature_sampling_window=500,
                    dead_feature_window=250, l1_coefficient=0.1, lr=4e-3)
    result = train(cfg, progress=False)
    sae = SparseAutoencoder.load_from_pretrained(result.final)
    w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (dirs @ w.T).max(dim=1).values
    assert best.mean() >= 0.9, best
    # Decoder rows are held at unit norm throughout training.
    torch.testing.assert_close(result.sae.W_dec.norm(dim=1), torch.ones(96), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["anthropic", "l2"])
def test_resume_equals_uninterrupted(tmp_path, method):
    # Four true directions for 64 features: many die, so resampling runs before and after the resume.
    sparse_dump(tmp_path / "dump", n_rows=4096, n_features=4, per_row=1)
    common = dict(total_training_tokens=4096 * 6, n_checkpoints=2, feature_sampling_method=method,
                  l1_coefficient=0.5, dead_feature_threshold=1e-3,
                  lr_scheduler_name="cosineannealingwarmup", lr_warm_up_steps=10, l1_warm_up_steps=15)
    full = train(small_cfg(tmp_path / "dump", tmp_path / "full", **common), progress=False)
    saved = sorted((p for p in (tmp_path / "full").iterdir() if p.name.isdigit()), key=lambda p: int(p.name))
    assert [int(p.name) for p in saved] == [8192, 16384]  # 96 steps of 256 rows; checkpoints at 32, 64
    resumed = train(small_cfg(tmp_path / "dump", tmp_path / "resumed", **common), resume_from=saved[0],
                    progress=False)
    a = load_file(full.final / "trainer_state.safetensors")
    b = load_file(resumed.final / "trainer_state.safetensors")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (full.final / "sae_weights.safetensors").read_bytes() == (resumed.final / "sae_weights.safetensors").read_bytes()
    # Resampling happened in the resumed part too, so the check covers its state.
    logged = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert any(row.get("n_resampled", 0) > 0 for row in logged if row.get("step", 0) > 32)
    steps = [row["step"] for row in logged if "mse" in row]
    assert steps == sorted(steps) and steps[-1] == 96


def test_checkpoint_folder_layout_and_expected_norm_folding(tmp_path):
    sparse_dump(tmp_path / "dump", n_rows=2048)
    raw = load_file(tmp_path / "dump" / "shard_000000.safetensors")["activations"] * 3.0
    write_dump(tmp_path / "scaled", raw, context_size=64, shard_rows=1000)
    cfg = small_cfg(tmp_path / "scaled", tmp_path / "run", normalize_activations="expected_norm",
                    total_training_tokens=2048)
    result = train(cfg, progress=False)
    final = result.final
    assert {p.name for p in final.iterdir()} >= {"cfg.json", "sae_weights.safetensors", "sparsity.safetensors"}
    cfg_json = json.loads((final / "cfg.json").read_text())
    assert cfg_json["d_in"] == 32 and cfg_json["d_sae"] == 64 and cfg_json["hook_name"] == "synthetic"
    weights = load_file(final / "sae_weights.safetensors")
    assert weights["W_enc"].shape == (32, 64) and weights["W_dec"].shape == (64, 32)
    assert load_file(final / "sparsity.safetensors")["sparsity"].shape == (64,)
    # Saved weights work on raw activations: same features, reconstruction in raw units.
    scale = result.trainer.input_scale
    assert scale != 1.0
    x = raw[:100]
    saved = SparseAutoencoder.load_from_pretrained(final)
    torch.testing.assert_close(saved(x).feature_acts, result.sae(x * scale).feature_acts, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(saved(x).sae_out, result.sae(x * scale).sae_out / scale, rtol=1e-4, atol=1e-5)


def test_cli_config_file_and_flag_override(tmp_path):
    sparse_dump(tmp_path / "dump", n_rows=2048)
    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump({"expansion_factor": 2, "train_batch_size": 128, "l1_coefficient": 0.5,
                                    "total_training_tokens": 1024, "checkpoint_path": str(tmp_path / "r"),
                                    "device": "cpu"}))
    result = CliRunner().invoke(train_main, ["--shards", str(tmp_path / "dump"), "--config", str(conf),
                                             "--l1-coefficient", "0.25", "--quiet"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "r" / "final" / "cfg.json").read_text())
    assert saved["l1_coefficient"] == 0.25 and saved["train_batch_size"] == 128


@pytest.mark.parametrize("flags, needle", [
    (["--d-in", "33"], "d_in 33 does not match the dump's d_in 32"),
    (["--lr-scheduler-name", "warp"], "lr_scheduler_name must be one of"),
    (["--train-batch-size", "0"], "train_batch_size must be positive"),
    (["--expansion-factor", "-2"], "expansion_factor must be positive"),
    (["--feature-sampling-method", "magic"], "feature_sampling_method must be one of"),
    pytest.param(["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="machine has CUDA")),
])
def test_bad_configs_get_one_line_errors(tmp_path, flags, needle):
    sparse_dump(tmp_path / "dump", n_rows=1024)
    result = CliRunner().invoke(train_main, ["--shards", str(tmp_path / "dump"), "--quiet", *flags])
    assert result.exit_code == 2
    assert needle in result.output and "Traceback" not in result.output


def test_refuses_incomplete_corrupt_and_mismatched_dumps(tmp_path):
    sparse_dump(tmp_path / "dump", n_rows=1024)
    manifest = json.loads((tmp_path / "dump" / "manifest.json").read_text())
    shard = tmp_path / "dump" / "shard_000000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DumpError, match="fails its checksum"):
        train(small_cfg(tmp_path / "dump", tmp_path / "r"), progress=False)
    manifest["complete"] = False
    (tmp_path / "dump" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DumpError, match="incomplete"):
        train(small_cfg(tmp_path / "dump", tmp_path / "r"), progress=False)
    # Resuming on a dump of another width is refused.
    sparse_dump(tmp_path / "a", n_rows=1024)
    first = train(small_cfg(tmp_path / "a", tmp_path / "ra", total_training_tokens=512), progress=False)
    sparse_dump(tmp_path / "b", n_rows=1024, d_in=16)
    with pytest.raises(UserError, match="different d_in"):
        train(small_cfg(tmp_path / "b", tmp_path / "rb"), resume_from=first.final, progress=False)


def test_cli_resume_from_uses_the_checkpoint_config(tmp_path):
    sparse_dump(tmp_path / "dump", n_rows=2048)
    args = ["--shards", str(tmp_path / "dump"), "--expansion-factor", "2", "--train-batch-size", "128",
            "--total-training-tokens", "4096", "--n-checkpoints", "1", "--device", "cpu", "--quiet",
            "--eval-holdout-contexts", "0"]
    full = CliRunner().invoke(train_main, args + ["--checkpoint-path", str(tmp_path / "a")])
    assert full.exit_code == 0, full.output
    mid = tmp_path / "a" / "2048"
    # Only the checkpoint (and where to write) is given: everything else comes from the checkpoint.
    resumed = CliRunner().invoke(train_main, ["--resume-from", str(mid), "--checkpoint-path",
                                              str(tmp_path / "b"), "--quiet"])
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "a" / "final" / "sae_weights.safetensors").read_bytes() == \
        (tmp_path / "b" / "final" / "sae_weights.safetensors").read_bytes()


@pytest.mark.slow  # a real process and a real SIGINT; the in-process version below is the fast one
def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    sparse_dump(tmp_path / "dump", n_rows=4096)
    args = ["--shards", str(tmp_path / "dump"), "--expansion-factor", "4", "--train-batch-size", "64",
            "--total-training-tokens", str(4096 * 40), "--device", "cpu", "--eval-holdout-contexts", "0",
            "--wandb-log-frequency", "5", "--quiet", "--no-verify"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "train", *args, "--checkpoint-path", str(tmp_path / "a")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "a" / "metrics.jsonl"
    while proc.poll() is None:  # no deadline: the run ends by itself, however slow the machine
        if metrics.is_file() and metrics.read_text().count("\n") >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    assert proc.returncode == 130 and "--resume-from" in err, err
    saved = Path(err.strip().split("--resume-from ")[-1].strip())
    assert (saved / "trainer_state.json").is_file() and "Traceback" not in err
    resumed = CliRunner().invoke(train_main, ["--resume-from", str(saved), "--quiet", "--no-verify"])
    assert resumed.exit_code == 0, resumed.output
    straight = CliRunner().invoke(train_main, args + ["--checkpoint-path", str(tmp_path / "b")])
    assert straight.exit_code == 0, straight.output
    assert (tmp_path / "a" / "final" / "sae_weights.safetensors").read_bytes() == \
        (tmp_path / "b" / "final" / "sae_weights.safetensors").read_bytes()


def test_ctrl_c_in_this_process_saves_a_checkpoint_that_resumes_exactly(tmp_path, monkeypatch):
    """The Ctrl-C contract at tiny sizes, in this process: a SIGINT after step 13 stops the run at that
    step's end with a checkpoint and a one-line hint, and resuming gives the uninterrupted weights."""
    import os
    import signal

    import train.run as run_module

    sparse_dump(tmp_path / "dump", n_rows=2048)
    args = ["--shards", str(tmp_path / "dump"), "--expansion-factor", "2", "--train-batch-size", "64",
            "--total-training-tokens", str(64 * 30), "--device", "cpu", "--eval-holdout-contexts", "0",
            "--quiet", "--no-verify"]
    real_step = run_module._step_slot

    def step_then_ctrl_c(slot, *a, **kw):
        real_step(slot, *a, **kw)
        if slot.trainer.counters.step == 13:
            os.kill(os.getpid(), signal.SIGINT)

    unhandled = []  # a SIGINT that train does not catch lands here instead of stopping pytest
    previous = signal.signal(signal.SIGINT, lambda *_: unhandled.append(True))
    try:
        monkeypatch.setattr(run_module, "_step_slot", step_then_ctrl_c)
        stopped = CliRunner().invoke(train_main, args + ["--checkpoint-path", str(tmp_path / "a")])
        monkeypatch.setattr(run_module, "_step_slot", real_step)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert not unhandled, "train did not handle the SIGINT"
    assert stopped.exit_code == 130 and "Traceback" not in stopped.stderr, stopped.stderr
    last = stopped.stderr.strip().splitlines()[-1]  # after the run's one-line description
    saved = tmp_path / "a" / str(13 * 64)  # the step the signal came in, not a later one
    assert last.startswith("train: interrupted; state saved") and last.endswith(f"--resume-from {saved}"), last
    assert not (tmp_path / "a" / "final").exists()
    resumed = CliRunner().invoke(train_main, ["--resume-from", str(saved), "--quiet", "--no-verify"])
    assert resumed.exit_code == 0, resumed.output
    straight = CliRunner().invoke(train_main, args + ["--checkpoint-path", str(tmp_path / "b")])
    assert straight.exit_code == 0, straight.output
    assert (tmp_path / "a" / "final" / "sae_weights.safetensors").read_bytes() == \
        (tmp_path / "b" / "final" / "sae_weights.safetensors").read_bytes()


def test_config_file_values_are_typed(tmp_path):
    from train.cli import read_config_file

    conf = tmp_path / "c.yaml"
    conf.write_text("lr: 1e-4\nd_sae: 4096\nlog_to_wandb: false\n")  # YAML 1.1 reads 1e-4 as text
    cfg = LanguageModelSAERunnerConfig.from_dict(read_config_file(str(conf)))
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float) and cfg.d_sae == 4096
    for bad, needle in ((dict(lr="fast"), "lr must be a number"), (dict(train_batch_size=1.5), "whole number"),
                        (dict(log_to_wandb="yes"), "true or false"), (dict(colour="red"), "unknown key")):
        with pytest.raises(UserError, match=needle):
            LanguageModelSAERunnerConfig.from_dict(bad)
