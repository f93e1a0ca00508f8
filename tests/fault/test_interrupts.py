"""Ctrl-C at any moment of `train`, `harvest` and `evaluate`, their imports included: SIGINT sent to
the real console scripts at several delays after they start (inside Python's start, torch's
import, transformers', or a request to object storage). Each ends with exit 130 and one line
saying it was interrupted as its last line: never a traceback, never an abort (a KeyboardInterrupt
inside `import torch` used to abort the process; inside `import numpy`, to leave it half-imported).

The commands read from (or write to) an object store that never answers, under a long bound, so
that none of them can finish, or reach its training loop, before its signal: every delay lands
where a command starts or waits."""
from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest

from fault._support import _PROGRESS, SilentStore, command_env, console_script, tiny_checkpointed_run

# Slow tier: the fault suite, real processes (tests/README.md).
pytestmark = pytest.mark.slow

STARTING = "interrupted while starting; nothing was written"
RUNNING = {"train": "train: interrupted before a checkpoint was saved",
           "harvest": "harvest: interrupted; finished shards are kept",
           "evaluate": "evaluate: interrupted"}
"""The start of each command's own line for a Ctrl-C once it runs (its `one_line_errors`)."""
DELAYS = {"train": (0.25, 0.5, 1.0, 2.0, 3.0), "harvest": (0.25, 1.0, 3.0), "evaluate": (0.5, 2.0, 3.5)}
"""Seconds after the start. Harvest's later delays land inside transformers' import, which a
Ctrl-C lets finish (seconds): fewer of them keep the table short."""
ROWS = [(prog, delay) for prog, delays in DELAYS.items() for delay in delays]


@pytest.fixture(scope="module")
def store():
    with SilentStore() as s:
        yield s


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory) -> Path:
    return tiny_checkpointed_run(tmp_path_factory.mktemp("interrupts"), "run", 5)


def arguments(prog: str, store: SilentStore, tmp: Path, run: Path, model: Path, text: Path) -> list:
    where = ["--s3-endpoint", store.url]
    if prog == "train":
        return ["--shards", "s3://bucket/dump", *where, "--checkpoint-path", tmp / "run", "--device", "cpu"]
    if prog == "harvest":
        return ["--model", model, "--dataset", text, "--out", "s3://bucket/harvested", *where, "--context-size",
                "16", "--batch-size", "2", "--tokens", "256", "--device", "cpu"]
    return [run, "--shards", "s3://bucket/dump", *where, "--no-model", "--device", "cpu"]


@pytest.mark.parametrize("prog,delay", ROWS, ids=[f"{p}-{d:g}s" for p, d in ROWS])
def test_ctrl_c_is_one_line_and_exit_130(store, evaluated_run, tiny_model, text_dataset, tmp_path, prog, delay):
    command = console_script(prog)
    if command is None:
        pytest.skip(f"the console script {prog} is not installed (pip install -e .)")
    args = [str(a) for a in arguments(prog, store, tmp_path, evaluated_run, tiny_model, text_dataset)]
    env = command_env(MATS_SAE_S3_TIMEOUT="600")  # the store never answers: nothing ends by itself
    proc = subprocess.Popen([*command, *args], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    assert proc.poll() is None, f"{prog} ended before its signal: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)  # a Ctrl-C inside an import waits for it to finish
    shown = f"{prog} {' '.join(args)} after {delay} s -> exit {proc.returncode}\nstderr:\n{err}\nstdout:\n{out}"
    assert "Traceback" not in err + out and "Aborted" not in err, shown
    assert proc.returncode == 130, shown
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines, shown
    assert lines[-1] == f"{prog}: {STARTING}" or lines[-1].startswith(RUNNING[prog]), shown
    assert all(_PROGRESS.search(line) or line.startswith("note: ") for line in lines[:-1]), \
        "more than progress and notes before the line\n" + shown
    if lines[-1].endswith(STARTING):
        assert not (tmp_path / "run").exists(), shown  # "nothing was written"
