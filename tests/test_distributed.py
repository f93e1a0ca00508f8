"""torchrun: 2 CPU processes (gloo) harvest and train exactly what one process does.

Each test launches `python -m torch.distributed.run --nproc-per-node 2 ...` as a subprocess, with
one intra-op thread per process (2 cores).
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import NARROW, WIDE, dump_files, pass_id, run_harvest

# Slow tier: every test starts torchrun (two interpreters importing torch, a gloo group).
pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="offline")
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def torchrun(target: list[str], n: int = 2, expect_ok: bool = True) -> subprocess.CompletedProcess:
    """`torchrun --nproc-per-node n <target>`; target is ['-m', 'harvest', ...] or [script, ...]."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *target]
    # A hang guard (a rank stuck in a collective), far above any loaded machine's run time.
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# ---- harvest -----------------------------------------------------------------------------------
def _harvest_args(model: Path, ds: Path, out: Path) -> list[str]:
    # 32 contexts of 32 tokens, batches of 4 contexts (128 rows): 4 shards of 2 batches each.
    return ["--quiet", "--model", str(model), "--dataset", str(ds), "--out", str(out), "--context-size",
            "32", "--batch-size", "4", "--tokens", "1000", "--shard-rows", "256", "--device", "cpu"]


def test_two_rank_harvest_equals_one_process(tiny_model, token_dataset, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_harvest(*_harvest_args(tiny_model, token_dataset, ref)[1:])
    got = torchrun(["-m", "harvest", *_harvest_args(tiny_model, token_dataset, out)])
    assert not (out / ".harvest-shards").exists()
    assert dump_files(out) == dump_files(ref)
    assert pass_id(out) != pass_id(ref)  # another pass over the same rows
    assert got.stdout.splitlines() == [f"blocks.0.hook_mlp_out: {out}"]  # rank 0 alone reports the dump


_DYING_RANK = """
import os, sys
sys.path.insert(0, {repo!r})
import harvest.writer as w
real = w.ShardWriter._write
def dying(self, buf):
    real(self, buf)  # the shard and its entry are durable
    if os.environ["RANK"] == "1":
        os._exit(9)  # rank 1 dies right after its first shard
w.ShardWriter._write = dying
from harvest.cli import main
main()
"""


def test_killed_rank_resumes_to_the_identical_dump(tiny_model, token_dataset, tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "out"
    run_harvest(*_harvest_args(tiny_model, token_dataset, ref)[1:])
    script = tmp_path / "dying_harvest.py"
    script.write_text(_DYING_RANK.format(repo=str(REPO)))
    died = torchrun([str(script), *_harvest_args(tiny_model, token_dataset, out)], expect_ok=False)
    assert died.returncode != 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"]
    assert (out / "shard_000001.safetensors").exists()  # rank 1's first shard, kept
    begun = manifest["pass_id"]
    # The same launch finishes it; so does one process (another N).
    alone = tmp_path / "alone"
    shutil.copytree(out, alone)
    torchrun(["-m", "harvest", *_harvest_args(tiny_model, token_dataset, out), "--resume"])
    assert dump_files(out) == dump_files(ref)
    run_harvest(*_harvest_args(tiny_model, token_dataset, alone)[1:], "--resume")
    assert dump_files(alone) == dump_files(ref)
    assert pass_id(out) == pass_id(alone) == begun  # both resumes continued rank 0's pass


# ---- training ----------------------------------------------------------------------------------
# Data-parallel training matches one process within this tolerance (float32 sums in another order:
# each rank's share of the loss, then the gradient all_reduce), relative to the largest weight.
DATA_PARALLEL_RTOL = 1e-5


def _dump(tmp_path: Path) -> Path:
    from test_train import sparse_dump

    sparse_dump(tmp_path / "dump", n_rows=2048, n_features=16, per_row=2)
    return tmp_path / "dump"


def _train_args(dump: Path, run: Path, *extra: str) -> list[str]:
    # 40 steps of 256 rows (5 epochs), resampling at steps 20 and 40, a checkpoint at step 20.
    return ["--quiet", "--shards", str(dump), "--checkpoint-path", str(run), "--device", "cpu",
            "--expansion-factor", "2", "--train-batch-size", "256", "--lr", "3e-3", "--l1-coefficient", "0.05",
            "--feature-sampling-method", "anthropic", "--feature-sampling-window", "20",
            "--dead-feature-window", "10", "--resample-sample-rows", "1024", "--wandb-log-frequency", "10",
            "--seed", "7", "--shuffle-buffer-rows", "1024", "--eval-holdout-contexts", "0",
            "--total-training-tokens", str(256 * 40), "--n-checkpoints", "1", "--no-evaluate-at-end", *extra]


def _train_in_process(args: list[str]) -> None:
    from click.testing import CliRunner

    from train.cli import main as train_main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = CliRunner().invoke(train_main, args, catch_exceptions=False)
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output


def _weights(final: Path) -> dict[str, torch.Tensor]:
    return load_file(str(final / "sae_weights.safetensors"))


def _assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for k in want:
        scale = want[k].abs().max().clamp_min(1e-12)
        rel = float((got[k] - want[k]).abs().max() / scale)
        assert rel < DATA_PARALLEL_RTOL, f"{k}: max abs diff {rel:.2e} of the largest weight"


# A strong L1 kills features: dozens are resampled at steps 20 and 40.
_RESAMPLING = ("--l1-coefficient", "1.0", "--expansion-factor", "4", "--dead-feature-window", "5")


def test_data_parallel_matches_one_process(tmp_path):
    dump = _dump(tmp_path)
    solo, dp = tmp_path / "solo", tmp_path / "dp"
    _train_in_process(_train_args(dump, solo, *_RESAMPLING))
    out = torchrun(["-m", "train", *_train_args(dump, dp, *_RESAMPLING)])
    assert out.stdout.split() == [str(dp / "final")]  # rank 0 alone writes (and prints) the run
    checkpoint = json.loads((dp / "checkpoints.json").read_text())[0]
    assert checkpoint["step"] == 20
    # The weights, the dead-feature state and the metrics are those of the whole batch.
    _assert_data_parallel_run_matches(solo, dp)
    # All ranks load a checkpoint and go on: the same final SAE.
    torchrun(["-m", "train", *_train_args(dump, dp, *_RESAMPLING), "--resume-from", str(dp / checkpoint["folder"])])
    _assert_close(_weights(dp / "final"), _weights(solo / "final"))


def test_data_parallel_clipped_matches_one_process(tmp_path):
    """clip_grad_norm clips the gradient summed over the ranks, so every rank scales it alike and the
    run equals one process; the clip is small enough to act (the weights differ unclipped)."""
    dump = _dump(tmp_path)
    clip = ("--clip-grad-norm", "0.05")
    _train_in_process(_train_args(dump, tmp_path / "solo", *clip))
    _train_in_process(_train_args(dump, tmp_path / "free"))
    torchrun(["-m", "train", *_train_args(dump, tmp_path / "dp", *clip)])
    _assert_data_parallel_run_matches(tmp_path / "solo", tmp_path / "dp", resampled=False)
    free, solo = _weights(tmp_path / "free" / "final"), _weights(tmp_path / "solo" / "final")
    assert any(float((free[k] - solo[k]).abs().max()) > 1e-3 for k in solo)


def test_sweep_parallel_gives_each_sae_its_solo_weights(tmp_path):
    dump = _dump(tmp_path)
    sweep = tmp_path / "sweep"
    grid = ["--sweep", "l1_coefficient=0.05,0.3", "--sweep", "expansion_factor=2,3"]
    out = torchrun(["-m", "train", *_train_args(dump, sweep), *grid])
    index = json.loads((sweep / "sweep.json").read_text())
    names = [r["name"] for r in index["runs"]]
    assert len(names) == 4 and (sweep / "summary.csv").is_file()
    assert sorted(out.stdout.split()) == sorted(str(sweep / n / "final") for n in names)
    for name, (l1, ef) in zip(names, [("0.05", "2"), ("0.05", "3"), ("0.3", "2"), ("0.3", "3")]):
        assert name == f"l1_coefficient_{l1}__expansion_factor_{ef}"
    # Each SAE exactly as trained alone (one process, no sweep): two of them, one per rank.
    for name, l1, ef in [(names[0], "0.05", "2"), (names[3], "0.3", "3")]:
        solo = tmp_path / f"solo_{name}"
        _train_in_process(_train_args(dump, solo, "--l1-coefficient", l1, "--expansion-factor", ef))
        assert (sweep / name / "final" / "sae_weights.safetensors").read_bytes() == \
            (solo / "final" / "sae_weights.safetensors").read_bytes()


# ---- transcoders and cross-layer transcoders -----------------------------------------------------
@pytest.fixture(scope="module")
def mlp_dumps(tiny_model, vocab_size, tmp_path_factory) -> dict[str, Path]:
    """One pass of the tiny model, hook -> dump: both layers' MLP inputs and outputs (32 wide
    each) and layer 0's MLP hidden activations (128 wide)."""
    from conftest import write_token_dataset
    from helpers import harvest_pass

    ds = write_token_dataset(tmp_path_factory.mktemp("ds") / "tokens", n_docs=100, doc_len=100, vocab=vocab_size)
    hooks = ("blocks.0.mlp.hook_in", "blocks.0.hook_mlp_out", "blocks.1.mlp.hook_in", "blocks.1.hook_mlp_out", WIDE)
    folders = harvest_pass(tiny_model, ds, tmp_path_factory.mktemp("mlp"), hooks=hooks)
    return dict(zip(hooks, map(Path, folders)))


def _transcoder_args(inputs: list[Path], targets: list[Path], run: Path, *extra: str) -> list[str]:
    """`_train_args` on other dumps: the inputs `--shards`, the targets `--target-shards`."""
    args = _train_args(inputs[0], run, "--target-shards", ",".join(map(str, targets)), *extra)
    args[args.index("--shards") + 1] = ",".join(map(str, inputs))
    return args


def _assert_data_parallel_run_matches(solo: Path, dp: Path, resampled: bool = True) -> None:
    """The final SAE, the mid checkpoint, the dead-feature state and the metrics of a data-parallel
    run are those of one process."""
    _assert_close(_weights(dp / "final"), _weights(solo / "final"))
    checkpoint = json.loads((dp / "checkpoints.json").read_text())[0]
    _assert_close(_weights(dp / checkpoint["folder"]), _weights(solo / checkpoint["folder"]))
    solo_state = load_file(str(solo / "final" / "trainer_state.safetensors"))
    dp_state = load_file(str(dp / "final" / "trainer_state.safetensors"))
    for k in ("fired_total", "tokens_since_fired"):
        assert torch.equal(dp_state[k], solo_state[k]), k
    rows = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (solo, dp)]
    assert [r["step"] for r in rows[0]] == [r["step"] for r in rows[1]]
    for a, b in zip(*rows):
        for k in ("mse", "l0", "explained_variance", "frac_dead", "n_resampled"):
            if k in a:
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
    if resampled:
        assert sum(r.get("n_resampled") or 0 for r in rows[1]) > 0  # resampling ran (and matched)


@pytest.mark.parametrize("method", ["anthropic", "l2"])
def test_data_parallel_skip_transcoder_matches_one_process(method, mlp_dumps, tmp_path):
    """blocks.0's MLP hidden activations (128 wide) -> its output (32) with a skip path (W_skip a
    parameter the ranks' gradients sum into), resampling with targets: anthropic's sample rows,
    or l2's whole current batch gathered from the ranks on both sides (128 and 32 wide)."""
    mlp_in, mlp_out = mlp_dumps[WIDE], mlp_dumps[NARROW]
    solo, dp = tmp_path / "solo", tmp_path / "dp"
    args = ("--skip-connection", *_RESAMPLING, "--feature-sampling-method", method)
    args += ("--dead-feature-threshold", "0.001") if method == "l2" else ()
    _train_in_process(_transcoder_args([mlp_in], [mlp_out], solo, *args))
    out = torchrun(["-m", "train", *_transcoder_args([mlp_in], [mlp_out], dp, *args)])
    assert out.stdout.split() == [str(dp / "final")]
    cfg = json.loads((dp / "final" / "cfg.json").read_text())
    assert cfg["architecture"] == "skip_transcoder" and (cfg["d_in"], cfg["d_out"]) == (128, 32)
    assert "W_skip" in _weights(dp / "final")
    _assert_data_parallel_run_matches(solo, dp)


def _without(args: list[str], *flags: str) -> list[str]:
    """args less each of `flags` and its value."""
    out = list(args)
    for flag in flags:
        i = out.index(flag)
        del out[i : i + 2]
    return out


# A cross-layer transcoder resamples nothing (JumpReLU's features have no dead-feature policy,
# TopK's AuxK reads the dead mask): the resampling flags are not its settings.
_NOT_CLT = ("--l1-coefficient", "--feature-sampling-method", "--dead-feature-window", "--resample-sample-rows",
            "--expansion-factor")
_CLT = {"jumprelu_clt": ("--l0-coefficient", "0.3"), "topk_clt": ("--k", "4", "--dead-feature-window", "5")}


@pytest.mark.parametrize("arch", list(_CLT))
def test_data_parallel_clt_matches_one_process(arch, mlp_dumps, tmp_path):
    """A CLT over both layers: four dumps, each side two of them concatenated per row, so each
    rank's rows of a batch are [rows, 2 * 32] on both sides and d_sae 2 * 64."""
    inputs = [mlp_dumps[f"blocks.{i}.mlp.hook_in"] for i in (0, 1)]
    targets = [mlp_dumps[f"blocks.{i}.hook_mlp_out"] for i in (0, 1)]
    solo, dp = tmp_path / "solo", tmp_path / "dp"

    def args(run: Path) -> list[str]:
        return [*_without(_transcoder_args(inputs, targets, run), *_NOT_CLT), "--architecture", arch,
                "--d-sae", "128", *_CLT[arch]]

    _train_in_process(args(solo))
    out = torchrun(["-m", "train", *args(dp)])
    assert out.stdout.split() == [str(dp / "final")]
    cfg = json.loads((dp / "final" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["n_hooks"], cfg["d_in"], cfg["d_sae"]) == (arch, 2, 64, 128)
    _assert_data_parallel_run_matches(solo, dp, resampled=False)


def test_sweep_parallel_transcoders_get_their_solo_weights(mlp_dumps, tmp_path):
    """A grid of transcoders and skip transcoders spread over two ranks: each SAE exactly as trained
    alone."""
    mlp_in, mlp_out = mlp_dumps[WIDE], mlp_dumps[NARROW]
    sweep = tmp_path / "sweep"
    grid = ["--sweep", "skip_connection=false,true", "--sweep", "l1_coefficient=0.05,0.3"]
    out = torchrun(["-m", "train", *_transcoder_args([mlp_in], [mlp_out], sweep), "--parallel", "sweep", *grid])
    names = [r["name"] for r in json.loads((sweep / "sweep.json").read_text())["runs"]]
    assert len(names) == 4 and (sweep / "summary.csv").is_file()
    assert sorted(out.stdout.split()) == sorted(str(sweep / n / "final") for n in names)
    # One from each rank (grid points 0 and 3 -> ranks 0 and 1).
    for name, skip, l1 in [(names[0], False, "0.05"), (names[3], True, "0.3")]:
        assert name == f"skip_connection_{skip}__l1_coefficient_{l1}", name
        solo = tmp_path / f"solo_{name}"
        flags = ["--l1-coefficient", l1] + (["--skip-connection"] if skip else [])
        _train_in_process(_transcoder_args([mlp_in], [mlp_out], solo, *flags))
        assert (sweep / name / "final" / "sae_weights.safetensors").read_bytes() == \
            (solo / "final" / "sae_weights.safetensors").read_bytes(), name
