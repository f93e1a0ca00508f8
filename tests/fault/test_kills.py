"""SIGKILL at seeded random points of `harvest`, `train` and a sweep, then the documented resume:
the result must be byte-for-byte what an uninterrupted run writes.

Kill points are file events chosen at random from the suite's seed (the k-th shard in the
manifest, the k-th checkpoint in a run's index, the sweep index appearing, or a short delay after
the start), each followed by a random few milliseconds, so the kill also lands inside the writes
that follow the event. A kill may land before anything resumable exists: the tool must then say so
in one line with a non-zero exit, and starting again must give the same bytes ("told to restart");
where something resumable did exist, being told to restart is a failure. Some points are chains:
the resume is itself killed later, then resumed.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import write_token_dataset
from fault._support import (
    TALLY, Running, checkpoints_listed, error_line, invoke, kill_when, ok, read_json, rng,
    shards_listed, start_forked, start_module, warm_up,
)
from helpers import dump_files, pass_id
from shared.dump_writer import write_dump

# Slow tier: the fault suite (tests/README.md); the fast tier keeps a sample of its checks.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def _fork_server():
    warm_up()


Event = tuple[str, Callable[[Path], bool]]  # (description, predicate on the output folder)


def after(seconds: float) -> Event:
    import time

    start = time.monotonic()
    return f"{seconds * 1000:.0f} ms after start", lambda out: time.monotonic() - start >= seconds


def exists(name: str) -> Event:
    return f"{name} appears", lambda out: (out / name).exists()


def shard(k: int) -> Event:
    return f"shard {k} listed", lambda out: shards_listed(out) >= k


def checkpoint(k: int, sae: str = "") -> Event:
    where = f" of {sae}" if sae else ""
    return f"checkpoint {k}{where} indexed", lambda out: len(checkpoints_listed(out / sae)) >= k


def run_and_kill(start: Callable[[], Running], event: Callable[[], Event], out: Path, jitter: float) -> str:
    """Start a command, SIGKILL it at the event plus `jitter` s; returns the point's description.
    A point the command outran (it finished first) fails the test: the run must be made longer
    (a retry would need a fresh output folder, and would test another point than the one drawn)."""
    what, happened = event()
    run = start()
    if kill_when(run, lambda: happened(out), jitter):
        return f"{what} +{jitter * 1000:.0f} ms"
    assert run.wait() == 0, f"{run.what} failed before its kill point:\n{run.output()}"
    pytest.fail(f"{run.what} finished before '{what}' could be killed; make the run longer")


# ---- harvest -------------------------------------------------------------------------------------

HARVEST_SHARDS = 32


def harvest_args(model: Path, ds: Path, out: Path) -> list:
    return ["--model", model, "--dataset", ds, "--out", out, "--context-size", "16", "--batch-size", "4",
            "--tokens", str(256 * HARVEST_SHARDS), "--shard-rows", "256", "--quiet"]


@pytest.mark.parametrize("fmt", ["safetensors", "zarr"])
def test_harvest_killed_anywhere_resumes_to_identical_dump(tiny_model, vocab_size, tmp_path, fmt):
    # zarr shards are folders that appear by rename; the manifest's checksums of their decoded
    # arrays compare them (dump_files reads the top-level files).
    r = rng(f"harvest-{fmt}")
    fmt_args = ["--format", fmt] + (["--compression", "zstd"] if fmt == "zarr" else [])
    ds = write_token_dataset(tmp_path / "ds", n_docs=120, doc_len=100, vocab=vocab_size)
    ref = tmp_path / "ref"
    ok("harvest", [*harvest_args(tiny_model, ds, ref), *fmt_args])
    reference = dump_files(ref)
    assert json_shards(ref) == HARVEST_SHARDS

    shards = sorted(r.sample(range(1, HARVEST_SHARDS - 8), 6))
    plans: list[list[Callable[[], Event]]] = [
        [lambda: after(r.uniform(0.0, 0.6))],  # usually before the dump folder exists
        [lambda: exists("manifest.json")],  # the dump exists, no shard yet
        *([lambda k=k: shard(k)] for k in shards[:4]),
        [lambda: shard(shards[4]), lambda: shard(shards[5])],  # the resume is killed too
    ]
    if fmt == "zarr":  # the format's own writes only: three points
        plans = [[lambda k=k: shard(k)] for k in shards[1:4]]
    for i, plan in enumerate(plans):
        out = tmp_path / f"kill{i}"
        args = [*harvest_args(tiny_model, ds, out), *fmt_args]
        points = []
        for j, event in enumerate(plan):
            again = ["--resume"] if j else []
            # The first point runs the command exactly as a user does; the rest fork a warm one.
            if i == 0 and fmt == "safetensors":
                start = lambda: start_module("harvest", [*args, *again], tmp_path / f"log{i}_{j}")  # noqa: E731
            else:
                start = lambda: start_forked("harvest", [*args, *again], tmp_path / f"log{i}_{j}")  # noqa: E731
            points.append(run_and_kill(start, event, out, r.uniform(0.0, 0.02)))
        progress = shards_listed(out)
        begun = pass_id(out) if (out / "manifest.json").is_file() else None
        got = invoke("harvest", [*args, "--resume"])
        if got.code == 0:
            verdict, note = "identical", ""
            if begun is not None:  # the resume continued the pass the kill interrupted
                assert pass_id(out) == begun, f"harvest killed at {points}: the resume changed pass_id"
        else:
            note = error_line(got, strict=False)
            assert progress == 0, f"told to restart with {progress} shards done:\n" + got.describe()
            ok("harvest", [*args, "--overwrite"])
            verdict = "restart"
        assert dump_files(out) == reference, f"harvest killed at {points}: the resumed dump differs"
        for point in points:
            TALLY.kill("harvest" if fmt == "safetensors" else "harvest-zarr", point, verdict, note)


def json_shards(dump: Path) -> int:
    return len(read_json(dump / "manifest.json")["shards"])


# ---- train ---------------------------------------------------------------------------------------

TRAIN_CHECKPOINTS = 10


@pytest.fixture(scope="module")
def train_dump(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("train_dump") / "dump"
    g = torch.Generator().manual_seed(3)
    # Sparse rows: a few of 24 directions each, so features die and get resampled mid-run.
    dirs = torch.randn(24, 16, generator=g)
    idx = torch.randint(0, 24, (4096, 2), generator=g)
    acts = dirs[idx].sum(1) * (torch.rand(4096, 1, generator=g) + 0.5)
    write_dump(folder, acts, context_size=16, shard_rows=1024)
    return folder


def train_args(dump: Path, run: Path) -> list:
    return ["--shards", dump, "--checkpoint-path", run, "--expansion-factor", "2", "--train-batch-size", "64",
            "--total-training-tokens", str(4096 * 3), "--n-checkpoints", str(TRAIN_CHECKPOINTS),
            "--lr", "3e-3", "--l1-coefficient", "0.05", "--feature-sampling-window", "40",
            "--dead-feature-window", "20", "--resample-sample-rows", "1024", "--shuffle-buffer-rows", "2048",
            "--wandb-log-frequency", "10", "--eval-holdout-contexts", "0", "--seed", "7", "--device", "cpu",
            "--quiet"]


def final_weights(run: Path) -> bytes:
    return (run / "final" / "sae_weights.safetensors").read_bytes()


def test_train_killed_anywhere_resumes_to_identical_weights(train_dump, tmp_path):
    r = rng("train")
    ok("train", train_args(train_dump, tmp_path / "ref"))
    reference = final_weights(tmp_path / "ref")

    ks = sorted(r.sample(range(1, TRAIN_CHECKPOINTS - 2), 6))
    plans: list[list[Callable[[], Event]]] = [
        [lambda: after(r.uniform(0.0, 0.3))],  # before the run folder, or just after
        [lambda: exists("metrics.jsonl")],  # training, no checkpoint yet
        *([lambda k=k: checkpoint(k)] for k in ks[:4]),
        [lambda: checkpoint(ks[4]), lambda: checkpoint(ks[5])],  # the resume is killed too
    ]
    for i, plan in enumerate(plans):
        run = tmp_path / f"kill{i}"
        args = train_args(train_dump, run)
        points = []
        for j, event in enumerate(plan):
            if j:  # continue the newest checkpoint, as the next resume below does
                cmd = ["--resume-from", run / checkpoints_listed(run)[-1], "--quiet"]
            else:
                cmd = args
            if i == 0:
                start = lambda: start_module("train", cmd, tmp_path / f"log{i}_{j}")  # noqa: E731
            else:
                start = lambda: start_forked("train", cmd, tmp_path / f"log{i}_{j}")  # noqa: E731
            points.append(run_and_kill(start, event, run, r.uniform(0.0, 0.01)))
        verdict, note = resume_run(run, args)
        assert final_weights(run) == reference, f"train killed at {points}: the resumed weights differ"
        for point in points:
            TALLY.kill("train", point, verdict, note)


def resume_run(run: Path, args: list) -> tuple[str, str]:
    """The documented resume of a killed run: --resume-from its newest checkpoint; with none, the
    run folder itself, which must be refused in one line, and then the run started again."""
    saved = checkpoints_listed(run)
    if saved:
        ok("train", ["--resume-from", run / saved[-1], "--quiet"])
        return "identical", ""
    got = invoke("train", ["--resume-from", run, "--quiet"])
    if got.code == 0:
        return "identical", ""
    note = error_line(got)
    ok("train", args)
    return "restart", note


# ---- sweep ---------------------------------------------------------------------------------------

SWEEP = ["--sweep", "l1_coefficient=0.02,0.1,0.4"]
SAES = ["l1_coefficient_0.02", "l1_coefficient_0.1", "l1_coefficient_0.4"]
SWEEP_CHECKPOINTS = 6


def sweep_args(dump: Path, root: Path) -> list:
    args = train_args(dump, root)
    at = args.index("--n-checkpoints")
    args[at + 1] = str(SWEEP_CHECKPOINTS)
    at = args.index("--total-training-tokens")
    args[at + 1] = str(4096 * 2)
    return [*args, *SWEEP]


def sweep_weights(root: Path) -> dict[str, bytes]:
    return {name: final_weights(root / name) for name in SAES}


def common_checkpoints(root: Path) -> int:
    index = read_json(root / "sweep.json")
    if index is None:
        return 0
    return min(len(checkpoints_listed(root / name)) for name in SAES)


def test_sweep_killed_anywhere_resumes_to_identical_weights(train_dump, tmp_path):
    r = rng("sweep")
    ok("train", sweep_args(train_dump, tmp_path / "ref"))
    reference = sweep_weights(tmp_path / "ref")
    assert len(reference) == 3

    picks = [(r.randrange(1, SWEEP_CHECKPOINTS - 1), r.choice(SAES)) for _ in range(6)]
    plans: list[list[Callable[[], Event]]] = [
        [lambda: exists("sweep.json")],  # the sweep exists, its SAEs perhaps not yet
        [lambda: exists(f"{SAES[-1]}/config.json")],  # every SAE set up, no checkpoint yet
        *([lambda k=k, s=s: checkpoint(k, s)] for k, s in picks[:4]),  # others may be mid-checkpoint
        [lambda: checkpoint(min(picks[4][0], picks[5][0]), picks[4][1]),
         lambda: checkpoint(max(picks[4][0], picks[5][0]) + 1, picks[5][1])],
    ]
    for i, plan in enumerate(plans):
        root = tmp_path / f"kill{i}"
        args = sweep_args(train_dump, root)
        points = []
        for j, event in enumerate(plan):
            cmd = ["--resume-from", root, "--quiet"] if j else args
            start = lambda: start_forked("train", cmd, tmp_path / f"log{i}_{j}")  # noqa: E731
            points.append(run_and_kill(start, event, root, r.uniform(0.0, 0.01)))
        progress = common_checkpoints(root)
        got = invoke("train", ["--resume-from", root, "--quiet"])
        if got.code == 0:
            verdict, note = "identical", ""
        else:
            note = error_line(got)
            assert progress == 0, f"told to restart with {progress} common checkpoints:\n" + got.describe()
            ok("train", args)
            verdict = "restart"
        assert sweep_weights(root) == reference, f"sweep killed at {points}: the resumed weights differ"
        for point in points:
            TALLY.kill("sweep", point, verdict, note)


def test_sweep_killed_before_its_saes_exist_resumes(train_dump, tmp_path, monkeypatch):
    """The window between the sweep index and the SAEs' own folders, made deterministic: the
    process dies (here: an exception) right after `sweep.json` is written. The resume either
    trains the sweep from the start or says in one line to start again."""
    import train.run

    def die(*args, **kwargs):
        raise SystemExit(137)

    root = tmp_path / "sweep"
    monkeypatch.setattr(train.run, "make_slot", die)
    assert invoke("train", sweep_args(train_dump, root)).code == 137
    monkeypatch.undo()
    assert (root / "sweep.json").is_file() and not (root / SAES[0] / "config.json").exists()
    got = invoke("train", ["--resume-from", root, "--quiet"])
    if got.code:
        error_line(got)
        ok("train", sweep_args(train_dump, root))
    ok("train", sweep_args(train_dump, tmp_path / "ref"))
    assert sweep_weights(root) == sweep_weights(tmp_path / "ref")


def test_run_killed_before_its_first_checkpoint_is_told_to_start_again(train_dump, tmp_path):
    run = tmp_path / "run"
    args = train_args(train_dump, run)
    args[args.index("--n-checkpoints") + 1] = "0"  # no checkpoint before final/
    args[args.index("--total-training-tokens") + 1] = str(4096 * 50)
    killed = start_forked("train", args, tmp_path / "log")
    assert kill_when(killed, lambda: (run / "metrics.jsonl").is_file(), 0.0)
    assert not checkpoints_listed(run) and not (run / "final").exists()
    got = invoke("train", ["--resume-from", run, "--quiet"])
    line = error_line(got)
    assert "start" in line.lower() or "again" in line.lower(), got.describe()
