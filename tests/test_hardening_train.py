"""Training hardening: divergence stops the run, configs are checked up front, a run folder has one
owner, run folders work from any directory and after a move, names read back stay inside the
folder, resumes log what an uninterrupted run logs, and the CLI never shows a traceback."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import train.sweep as sweep_mod
from shared.dump_writer import write_dump
from shared.errors import UserError
from shared.run_paths import dump_path_for, plain_name
from test_train import small_cfg, sparse_dump
from train.cli import main as train_main
from train.config import LanguageModelSAERunnerConfig
from train.run import train
from train.sae_trainer import SAETrainer
from train.sweep import train_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--expansion-factor", "2", "--train-batch-size", "128", "--device", "cpu", "--quiet",
        "--eval-holdout-contexts", "0"]


@pytest.fixture
def dump(tmp_path) -> Path:
    sparse_dump(tmp_path / "dump", n_rows=1024)
    return tmp_path / "dump"


def invoke(*args: str, env: dict | None = None):
    return CliRunner().invoke(train_main, list(args), env=env)


def one_error_line(result) -> str:
    """The CLI's error: exactly one line, no traceback."""
    lines = [line for line in result.output.splitlines() if line.startswith("train: error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def sleeping_process() -> subprocess.Popen:
    """A live pid until the test kills it (not a timed sleep, which a slow machine can outlast)."""
    return subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"])


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---- 1. non-finite training -----------------------------------------------------------------

@pytest.fixture
def nan_dump(tmp_path) -> Path:
    """A dump whose first shard got NaN activations after it was written (its checksum no longer
    matches: read with --no-verify); its manifest's statistics are those of the clean rows."""
    from safetensors.torch import load_file

    from shared.shard_files import write_safetensors

    write_dump(tmp_path / "nan_dump", torch.randn(1024, 32), context_size=64, shard_rows=1000)
    shard = tmp_path / "nan_dump" / "shard_000000.safetensors"
    tensors = {k: v.clone() for k, v in load_file(shard).items()}  # not the mapped file we rewrite
    tensors["activations"][::7] = float("nan")  # in every batch
    write_safetensors(shard, tensors)
    return tmp_path / "nan_dump"


def test_nan_activations_stop_training_without_a_final_save(tmp_path, nan_dump):
    got = invoke("--shards", str(nan_dump), "--no-verify", "--checkpoint-path", str(tmp_path / "r"),
                 "--total-training-tokens", "2048", *TINY)
    assert got.exit_code != 0
    line = one_error_line(got)
    assert "non-finite" in line and "step 1" in line and "LR-" in line, line  # names the step and the SAE
    assert not (tmp_path / "r" / "final").exists()


def test_a_checkpoint_never_holds_non_finite_weights(tmp_path, nan_dump):
    # Logging only at the end: the checkpoint at step 8 is the first place the flag is read.
    got = invoke("--shards", str(nan_dump), "--no-verify", "--checkpoint-path", str(tmp_path / "r"),
                 "--total-training-tokens", "2048", "--n-checkpoints", "1", "--wandb-log-frequency", "1000", *TINY)
    assert got.exit_code != 0 and "step 1" in one_error_line(got)
    assert sorted(p.name for p in (tmp_path / "r").iterdir() if p.is_dir()) == []


def test_divergence_in_a_sweep_names_the_sae(tmp_path, dump):
    got = invoke("--shards", str(dump), "--checkpoint-path", str(tmp_path / "sw"), "--total-training-tokens",
                 "2048", "--sweep", "lr=1e-3,1e30", *TINY)
    line = one_error_line(got)
    assert got.exit_code != 0 and "lr_1e+30" in line and "step " in line, line
    assert not list((tmp_path / "sw").glob("*/final"))


def test_a_non_finite_parameter_after_the_last_step_is_not_saved(tmp_path, dump, monkeypatch):
    real = SAETrainer.update

    def update(self, x, rows=None):
        res = real(self, x, rows)
        if self.counters.step == self.total_steps:  # the loss was finite; a parameter is not
            with torch.no_grad():
                self.sae.W_dec[0, 0] = float("nan")
        return res

    monkeypatch.setattr(SAETrainer, "update", update)
    with pytest.raises(UserError, match="W_dec"):
        train(small_cfg(dump, tmp_path / "r", total_training_tokens=1024), progress=False)
    assert not (tmp_path / "r" / "final").exists()


# ---- 2. configs checked up front ------------------------------------------------------------

@pytest.mark.parametrize("bad, needle", [
    (dict(lr=float("inf")), "lr must be a positive finite number"),
    (dict(lr=float("nan")), "lr must be a positive finite number"),
    (dict(lr=0), "lr must be a positive finite number"),
    (dict(l1_coefficient=float("nan")), "l1_coefficient must be a finite number >= 0"),
    (dict(l1_coefficient=float("inf")), "l1_coefficient must be a finite number >= 0"),
    (dict(architecture="topk", aux_loss_coefficient=float("inf")), "aux_loss_coefficient must be a finite"),
    (dict(architecture="jumprelu", jumprelu_bandwidth=float("inf")), "jumprelu_bandwidth must be a positive finite"),
    (dict(architecture="jumprelu", l0_coefficient=float("nan")), "l0_coefficient must be a finite"),
    (dict(architecture="batchtopk", topk_threshold_lr=2.0), "topk_threshold_lr must be in (0, 1]"),
    (dict(d_sae=1), "d_sae must be at least 2"),
    (dict(decoder_init_norm=float("inf")), "decoder_init_norm must be a positive finite"),
    (dict(feature_reinit_scale=float("nan")), "feature_reinit_scale must be a finite number >= 0"),
    (dict(dead_feature_threshold=1.5), "dead_feature_threshold must be in [0, 1]"),
    (dict(seed=-1), "seed must not be negative"),
    (dict(context_size=0), "context_size must be positive"),
    (dict(store_batch_size=0), "store_batch_size must be positive"),
    (dict(train_batch_size=0), "train_batch_size must be positive"),
    (dict(shuffle_buffer_rows=0), "shuffle_buffer_rows must be positive"),
    (dict(n_checkpoints=-1), "n_checkpoints must not be negative"),
])
def test_bad_values_are_refused_in_one_line(bad, needle):
    with pytest.raises(UserError) as e:
        LanguageModelSAERunnerConfig(**bad)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_values_from_the_cli(tmp_path, dump):
    for flags, needle in ((["--lr", "inf"], "lr must be a positive finite number"),
                          (["--l1-coefficient", "nan"], "l1_coefficient must be a finite number"),
                          (["--d-sae", "1"], "d_sae must be at least 2")):
        got = invoke("--shards", str(dump), "--checkpoint-path", str(tmp_path / "r"), *TINY, *flags)
        assert got.exit_code == 2 and needle in one_error_line(got), got.output
        assert not (tmp_path / "r").exists()


def test_every_sae_of_a_sweep_is_checked_before_any_trains(tmp_path, dump, monkeypatch):
    # One SAE per memory group: the second group's k > d_sae must be refused before the first trains.
    monkeypatch.setattr(sweep_mod, "free_bytes", lambda device: 1)
    cfg = small_cfg(dump, tmp_path / "sw", architecture="topk", d_sae=16, l1_coefficient=None,
                    resample_sample_rows=None, total_training_tokens=1024)
    with pytest.raises(UserError, match=r"k_64.*k must be an integer in \[1, d_sae=16\]"):
        train_sweep(cfg, {"k": [4, 64]}, progress=False)
    assert not (tmp_path / "sw" / "k_4" / "metrics.jsonl").exists()


# ---- 3. one owner per run folder ------------------------------------------------------------

def test_a_running_owner_keeps_the_folder(tmp_path, dump):
    (tmp_path / "r").mkdir()
    owner = sleeping_process()
    try:
        import socket

        (tmp_path / "r" / "train.lock").write_text(json.dumps({"pid": owner.pid, "host": socket.gethostname()}))
        got = invoke("--shards", str(dump), "--checkpoint-path", str(tmp_path / "r"), *TINY)
        line = one_error_line(got)
        assert got.exit_code == 2 and f"pid {owner.pid}" in line and "in use" in line, line
        sweep = invoke("--shards", str(dump), "--checkpoint-path", str(tmp_path / "r"), "--sweep",
                       "l1_coefficient=0.1,0.2", *TINY)
        assert sweep.exit_code == 2 and "in use" in one_error_line(sweep)
    finally:
        owner.kill()
        owner.wait()
    assert not (tmp_path / "r" / "final").exists()


def test_a_stale_lock_is_reported_and_taken_over(tmp_path, dump):
    import socket

    (tmp_path / "r").mkdir()
    pid = dead_pid()
    (tmp_path / "r" / "train.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    seen = []

    def log(line):
        seen.append(line)
        if line.startswith("training"):  # the folder is held while training
            assert json.loads((tmp_path / "r" / "train.lock").read_text())["pid"] == os.getpid()

    train(small_cfg(dump, tmp_path / "r", total_training_tokens=512), progress=False, log=log)
    assert any(f"stale lock" in s and f"pid {pid}" in s for s in seen), seen
    assert any(s.startswith("training") for s in seen)
    assert not (tmp_path / "r" / "train.lock").exists()  # released at exit
    assert (tmp_path / "r" / "final").is_dir()


def test_the_lock_is_released_when_training_fails(tmp_path, nan_dump):
    with pytest.raises(UserError):
        train(small_cfg(nan_dump, tmp_path / "r", total_training_tokens=512), progress=False, verify=False)
    assert not (tmp_path / "r" / "train.lock").exists()


# ---- 4. which folders a run may write into ---------------------------------------------------

def test_checkpoint_path_must_not_be_a_dump_or_a_file(tmp_path, dump):
    got = invoke("--shards", str(dump), "--checkpoint-path", str(dump), *TINY)
    assert got.exit_code == 2 and "holds a dump" in one_error_line(got)
    (tmp_path / "file").write_text("x")
    got = invoke("--shards", str(dump), "--checkpoint-path", str(tmp_path / "file"), *TINY)
    assert got.exit_code == 2 and "is a file" in one_error_line(got)
    assert (tmp_path / "file").read_text() == "x"


def test_another_runs_folder_is_refused_unless_overwrite(tmp_path, dump):
    args = ["--shards", str(dump), "--checkpoint-path", str(tmp_path / "r"), "--total-training-tokens", "512",
            "--n-checkpoints", "1", *TINY]
    assert invoke(*args).exit_code == 0
    first = (tmp_path / "r" / "final" / "sae_weights.safetensors").read_bytes()
    other = invoke(*args, "--total-training-tokens", "1024", "--n-checkpoints", "0")
    assert other.exit_code == 2 and "--overwrite" in one_error_line(other)
    assert (tmp_path / "r" / "final" / "sae_weights.safetensors").read_bytes() == first
    again = invoke(*args, "--total-training-tokens", "1024", "--n-checkpoints", "0", "--overwrite")
    assert again.exit_code == 0, again.output
    index = json.loads((tmp_path / "r" / "checkpoints.json").read_text())
    assert [e["folder"] for e in index] == ["final"]  # the first run's checkpoint went with it
    # A sweep folder is another run's folder too.
    sw = invoke("--shards", str(dump), "--checkpoint-path", str(tmp_path / "sw"), "--sweep",
                "l1_coefficient=0.1,0.2", "--total-training-tokens", "512", *TINY)
    assert sw.exit_code == 0, sw.output
    single = invoke("--shards", str(dump), "--checkpoint-path", str(tmp_path / "sw"), *TINY)
    assert single.exit_code == 2 and "--overwrite" in one_error_line(single)


FIXTURES = Path(__file__).parent / "fixtures" / "v1"


@pytest.mark.parametrize("kind", ["run", "sweep"])
def test_overwrite_replaces_a_previous_versions_folder(tmp_path, dump, kind):
    """Folders written before (no index of their own) hold only a run's names: --overwrite
    replaces them, while one foreign file in them makes it refuse and remove nothing."""
    old = shutil.copytree(FIXTURES / kind, tmp_path / kind)
    args = ["--shards", str(dump), "--checkpoint-path", str(old), "--total-training-tokens", "512",
            "--n-checkpoints", "0", *TINY, "--overwrite"]
    inner = old if kind == "run" else old / "architecture_topk"
    (inner / "192" / "notes.txt").write_text("mine\n")
    refused = invoke(*args)
    line = one_error_line(refused)
    assert refused.exit_code == 2 and "192/notes.txt" in line and "nothing was removed" in line, line
    assert (inner / "192" / "notes.txt").read_text() == "mine\n" and (inner / "192" / "cfg.json").is_file()
    (inner / "192" / "notes.txt").unlink()
    got = invoke(*args)
    assert got.exit_code == 0, got.output
    assert sorted(p.name for p in old.iterdir()) == ["checkpoints.json", "config.json", "final", "metrics.jsonl"]


def test_foreign_entries_name_what_a_run_does_not_write(tmp_path):
    from train.run_layout import foreign_entries

    assert foreign_entries(FIXTURES / "run") == [] and foreign_entries(FIXTURES / "sweep") == []
    run = shutil.copytree(FIXTURES / "run", tmp_path / "run")
    (run / ".config.json.tmp").write_text("{")  # a write a crash interrupted: the run's own
    (run / ".final.tmp").mkdir()
    assert foreign_entries(run) == []
    shutil.copytree(FIXTURES / "dumps" / "blocks.0.hook_mlp_out", run / "dashboard" / "d")
    (run / "notes.txt").write_text("x")
    (run / "192" / "extra.bin").write_text("x")
    (run / "linked").symlink_to(tmp_path)
    (run / "1000").write_text("a file where a checkpoint folder goes")
    assert foreign_entries(run) == ["1000", "192/extra.bin", "dashboard/d/manifest.json", "linked", "notes.txt"]


def test_checkpoint_path_must_be_local(tmp_path, dump, monkeypatch):
    monkeypatch.chdir(tmp_path)
    got = invoke("--shards", str(dump), "--checkpoint-path", "s3://bucket/runs/r1", *TINY)
    assert got.exit_code == 2 and "run folders are local" in one_error_line(got)
    assert not (tmp_path / "s3:").exists()


def test_one_sae_of_a_sweep_continues_alone_only_in_a_new_folder(tmp_path, dump):
    got = invoke("--shards", str(dump), "--checkpoint-path", str(tmp_path / "sw"), "--sweep", "l1_coefficient=0.1,0.2",
                 "--total-training-tokens", "1024", "--n-checkpoints", "1", *TINY)
    assert got.exit_code == 0, got.output
    sae = tmp_path / "sw" / "l1_coefficient_0.1"
    before = (sae / "final" / "sae_weights.safetensors").read_bytes()
    inside = invoke("--resume-from", str(sae / "512"), "--quiet")
    line = one_error_line(inside)
    assert inside.exit_code == 2 and "inside the sweep" in line and f"--resume-from {tmp_path / 'sw'}" in line, line
    alone = invoke("--resume-from", str(sae / "512"), "--checkpoint-path", str(tmp_path / "alone"), "--quiet")
    assert alone.exit_code == 0, alone.output
    assert (tmp_path / "alone" / "final" / "sae_weights.safetensors").read_bytes() == before  # the same run's end
    assert (sae / "final" / "sae_weights.safetensors").read_bytes() == before


# ---- 4b. a damaged trainer state is named, never used ----------------------------------------

@pytest.fixture
def checkpointed(tmp_path, dump) -> Path:
    """A finished run's checkpoint at step 4 of 8 (its final/ removed, so resuming trains)."""
    got = invoke("--shards", str(dump), "--checkpoint-path", str(tmp_path / "r"), "--total-training-tokens",
                 "1024", "--n-checkpoints", "1", *TINY)
    assert got.exit_code == 0, got.output
    shutil.rmtree(tmp_path / "r" / "final")
    return tmp_path / "r" / "512"


def _edit_state_tensors(ckpt: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(ckpt / "trainer_state.safetensors"))
    change(tensors)
    save_file(tensors, str(ckpt / "trainer_state.safetensors"))


def test_a_broadcastable_adam_moment_is_refused_not_broadcast(checkpointed):
    _edit_state_tensors(checkpointed, lambda t: t.__setitem__("optim.W_enc.exp_avg", t["optim.W_enc.exp_avg"][:1]))
    line = one_error_line(invoke("--resume-from", str(checkpointed), "--quiet"))
    assert "exp_avg of W_enc" in line and "damaged" in line and not (checkpointed.parent / "final").exists()


def test_a_missing_adam_state_or_counter_is_named(checkpointed):
    _edit_state_tensors(checkpointed, lambda t: t.pop("optim.W_dec.exp_avg_sq"))
    assert "lacks the Adam state exp_avg_sq of W_dec" in one_error_line(invoke("--resume-from", str(checkpointed)))
    state_json = checkpointed / "trainer_state.json"
    state = json.loads(state_json.read_text())
    del state["counters"]["step"]
    state_json.write_text(json.dumps(state))
    assert "lacks counters.step" in one_error_line(invoke("--resume-from", str(checkpointed)))


def test_a_step_beyond_the_runs_total_is_refused_not_taken_as_done(checkpointed):
    state_json = checkpointed / "trainer_state.json"
    state = json.loads(state_json.read_text())
    state["counters"]["step"] = 10**6
    state_json.write_text(json.dumps(state))
    assert "beyond the run's total_steps" in one_error_line(invoke("--resume-from", str(checkpointed)))
    assert not (checkpointed.parent / "final").exists()


def test_a_resume_may_not_change_the_architecture(checkpointed):
    got = invoke("--resume-from", str(checkpointed), "--architecture", "topk", "--k", "4", "--quiet")
    line = one_error_line(got)
    assert "architecture topk (the checkpoint's: standard)" in line and "--checkpoint-path" in line
    resumed = invoke("--resume-from", str(checkpointed), "--lr", "1e-4", "--quiet")  # an optimizer setting may
    assert resumed.exit_code == 0, resumed.output


# ---- 5. paths that work from anywhere -------------------------------------------------------

def test_moved_run_resumes_and_finds_its_dump_from_another_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    sparse_dump(work / "dump", n_rows=1024)
    got = invoke("--shards", "dump", "--checkpoint-path", "r", "--total-training-tokens", "1024",
                 "--n-checkpoints", "1", *TINY)
    assert got.exit_code == 0, got.output
    cfg = json.loads((work / "r" / "final" / "cfg.json").read_text())
    assert cfg["shards"] == str((work / "dump").resolve())
    want = (work / "r" / "final" / "sae_weights.safetensors").read_bytes()
    shutil.move(work / "r", tmp_path / "moved")
    shutil.rmtree(tmp_path / "moved" / "final")
    monkeypatch.chdir(tmp_path)
    resumed = invoke("--resume-from", str(tmp_path / "moved" / "512"), "--quiet")
    assert resumed.exit_code == 0, resumed.output
    assert (tmp_path / "moved" / "final" / "sae_weights.safetensors").read_bytes() == want
    assert not (work / "r").exists()

    import train.api as api

    monkeypatch.setattr(api, "load_model", lambda name, device: name)
    _, _, loader = api.LMSparseAutoencoderSessionloader.load_session_from_pretrained(tmp_path / "moved" / "final")
    assert loader.dump.path.resolve() == (work / "dump").resolve()


def test_moved_sweep_resumes_from_another_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    sparse_dump(work / "dump", n_rows=1024)
    got = invoke("--shards", "dump", "--checkpoint-path", "sw", "--sweep", "l1_coefficient=0.1,0.2",
                 "--total-training-tokens", "1024", "--n-checkpoints", "1", *TINY)
    assert got.exit_code == 0, got.output
    runs = json.loads((work / "sw" / "sweep.json").read_text())["runs"]
    assert [r["folder"] for r in runs] == [r["name"] for r in runs]  # relative to the sweep folder
    want = {r["name"]: (work / "sw" / r["name"] / "final" / "sae_weights.safetensors").read_bytes() for r in runs}
    shutil.move(work / "sw", tmp_path / "moved")
    for name in want:
        shutil.rmtree(tmp_path / "moved" / name / "final")
    monkeypatch.chdir(tmp_path)
    resumed = invoke("--resume-from", str(tmp_path / "moved"), "--quiet")
    assert resumed.exit_code == 0, resumed.output
    for name, weights in want.items():
        assert (tmp_path / "moved" / name / "final" / "sae_weights.safetensors").read_bytes() == weights


def test_dump_path_for_absolute_relative_and_legacy_values(tmp_path, monkeypatch):
    (tmp_path / "run" / "final").mkdir(parents=True)
    (tmp_path / "dump").mkdir()
    sae = tmp_path / "run" / "final"
    assert dump_path_for(sae, {"shards": str(tmp_path / "dump")}) == tmp_path / "dump"
    assert dump_path_for(sae, {"shards": "../../dump"}).resolve() == (tmp_path / "dump").resolve()
    monkeypatch.chdir(tmp_path)  # folders written before: relative to the training run's directory
    assert dump_path_for(sae, {"shards": "dump"}).resolve() == (tmp_path / "dump").resolve()
    for cfg in ({"shards": str(tmp_path / "gone")}, {}):
        with pytest.raises(UserError, match="pass --shards"):
            dump_path_for(sae, cfg)


# ---- 6. names read back stay inside the folder ----------------------------------------------

@pytest.mark.parametrize("name", ["../escaped", "/tmp/escaped", "a/b", ".."])
def test_plain_name_refuses_paths(name):
    with pytest.raises(UserError, match="sweep.json"):
        plain_name(name, "sweep.json")


def test_crafted_names_in_run_files_are_refused(tmp_path, dump):
    got = invoke("--shards", str(dump), "--checkpoint-path", str(tmp_path / "sw"), "--sweep",
                 "l1_coefficient=0.1,0.2", "--total-training-tokens", "512", "--n-checkpoints", "1", *TINY)
    assert got.exit_code == 0, got.output
    index_path = tmp_path / "sw" / "sweep.json"
    index = json.loads(index_path.read_text())
    crafted = json.loads(json.dumps(index))
    crafted["runs"][0]["name"] = crafted["runs"][0]["folder"] = "../escaped"
    index_path.write_text(json.dumps(crafted))
    bad = invoke("--resume-from", str(tmp_path / "sw"), "--quiet")
    assert bad.exit_code == 2 and "not a plain folder name" in one_error_line(bad)
    assert not (tmp_path / "escaped").exists()
    index_path.write_text(json.dumps(index))
    run = tmp_path / "sw" / index["runs"][0]["name"]
    checkpoints = json.loads((run / "checkpoints.json").read_text())
    checkpoints[0]["folder"] = "../../escaped"
    (run / "checkpoints.json").write_text(json.dumps(checkpoints))
    bad = invoke("--resume-from", str(tmp_path / "sw"), "--quiet")
    assert bad.exit_code == 2 and "not a plain folder name" in one_error_line(bad)
    named = invoke("--shards", str(dump), "--run-name", "../escaped", *TINY)
    assert named.exit_code == 2 and "run_name" in one_error_line(named)


# ---- 7. a sweep killed before its first config ----------------------------------------------

def test_sweep_killed_before_its_first_config_resumes(tmp_path, dump, monkeypatch):
    import train.run as run_mod

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "make_slot", killed)
    cfg = small_cfg(dump, tmp_path / "sw", total_training_tokens=512)
    with pytest.raises(KeyboardInterrupt):
        train_sweep(cfg, {"l1_coefficient": [0.1, 0.2]}, progress=False)
    monkeypatch.undo()
    assert (tmp_path / "sw" / "sweep.json").is_file() and not list((tmp_path / "sw").glob("*/config.json"))
    got = invoke("--resume-from", str(tmp_path / "sw"), "--quiet")
    assert got.exit_code == 0, got.output
    straight = train_sweep(small_cfg(dump, tmp_path / "straight", total_training_tokens=512),
                           {"l1_coefficient": [0.1, 0.2]}, progress=False)
    for r in straight:
        assert (tmp_path / "sw" / r.run_dir.name / "final" / "sae_weights.safetensors").read_bytes() == \
            (r.final / "sae_weights.safetensors").read_bytes()


# ---- 8. a resume logs what the uninterrupted run logged -------------------------------------

def test_resumed_metrics_rows_equal_the_uninterrupted_runs(tmp_path):
    sparse_dump(tmp_path / "dump", n_rows=2048, n_features=4, per_row=1)
    # 24 steps; the checkpoint at step 12 falls between the log steps 10 and 15.
    cfg = small_cfg(tmp_path / "dump", tmp_path / "r", total_training_tokens=2048 * 3, n_checkpoints=1,
                    wandb_log_frequency=5, feature_sampling_window=8, dead_feature_window=4)
    train(cfg, progress=False)
    metrics = tmp_path / "r" / "metrics.jsonl"
    straight = [json.loads(line) for line in metrics.read_text().splitlines()]
    train(cfg, resume_from=tmp_path / "r" / "3072", progress=False)
    resumed = [json.loads(line) for line in metrics.read_text().splitlines()]
    wall_clock = {"tokens_per_s"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in wall_clock} for r in rows]  # noqa: E731
    assert [r["step"] for r in straight if "mse" in r] == [5, 10, 15, 20, 24]
    assert strip(resumed) == strip(straight)


# ---- 9. the CLI's errors ---------------------------------------------------------------------

def test_internal_errors_are_one_line_unless_debugging(tmp_path, dump, monkeypatch):
    import train.run as run_mod

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(run_mod, "train", broken)
    args = ["--shards", str(dump), "--checkpoint-path", str(tmp_path / "r"), *TINY]
    got = invoke(*args, env={"MATS_SAE_DEBUG": "0"})
    assert got.exit_code == 1 and "internal error (RuntimeError: boom)" in one_error_line(got)
    debug = invoke(*args, env={"MATS_SAE_DEBUG": "1"})
    assert debug.exit_code == 1 and "Traceback" in debug.output


def test_the_divergence_watch_adds_no_host_sync_to_a_step(tmp_path, monkeypatch):
    """Between log steps `update` never reads a tensor on the host (a sync per step stalls a GPU)."""
    cfg = small_cfg(tmp_path / "unused", tmp_path / "r", d_sae=16, wandb_log_frequency=10)
    trainer = SAETrainer(cfg, 32, 1.0, 100, torch.device("cpu"))
    reads = []
    for name in ("__bool__", "item", "tolist", "__int__", "__float__"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _n=name: reads.append(_n) or _real(self, *a))
    x = torch.randn(64, 32)
    trainer.update(x)  # the first step (the watch starts counting here)
    reads.clear()
    for _ in range(8):
        trainer.update(x)
    assert reads == [] and trainer.counters.step == 9
    monkeypatch.undo()
    assert trainer.first_non_finite_step() is None


@pytest.mark.parametrize("step", [True, -1, 1.5, "3"])
def test_a_checkpoint_index_with_an_impossible_step_is_damaged(tmp_path, step):
    from shared.errors import UserError
    from train.run_layout import CHECKPOINT_INDEX, read_checkpoint_index

    (tmp_path / CHECKPOINT_INDEX).write_text(json.dumps([{"folder": "512", "step": step, "tokens": 512}]))
    with pytest.raises(UserError, match="is damaged .*non-negative integer step"):
        read_checkpoint_index(tmp_path)
    (tmp_path / CHECKPOINT_INDEX).write_text(json.dumps([{"folder": "512", "step": 4, "tokens": 512}]))
    assert read_checkpoint_index(tmp_path)[0]["step"] == 4


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_leaves_no_temporary_folder(tmp_path, dump,
                                                                                        monkeypatch):
    """safetensors reports ENOSPC as a SafetensorError: it must read as the disk-full line, not an
    internal error, and the half-written checkpoint must not stay behind (as `.512.tmp/`)."""
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def full_disk(tensors, path, *args, **kwargs):
        if "trainer_state" in str(path):
            Path(path).write_bytes(b"half")
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                  'message: "No space left on device" })')
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    run = tmp_path / "r"
    got = invoke("--shards", str(dump), "--checkpoint-path", str(run), "--total-training-tokens", "1024",
                 "--n-checkpoints", "1", *TINY)
    line = one_error_line(got)
    assert got.exit_code == 1 and "the disk is full" in line and "--resume-from" in line, got.output
    assert "internal error" not in got.output
    assert [p.name for p in run.iterdir() if p.name.startswith(".") and p.name != ".train.lock"] == []
    assert not (run / "512").exists() and not (run / "final").exists()
