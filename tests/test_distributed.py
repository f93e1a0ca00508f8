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

from helpers import dump_files, run_harvest

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
    proc = subprocess.run(cmd, env=_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
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
    torchrun(["-m", "harvest", *_harvest_args(tiny_model, token_dataset, out)])
    assert not (out / ".harvest-shards").exists()
    assert dump_files(out) == dump_files(ref)


_DYING_RANK = """
import os, sys
sys.path.insert(0, {repo!r})
import harvest.distributed as d
real = d.RankShardWriter._write
written = []
def dying(self):
    real(self)
    written.append(1)
    if os.environ["RANK"] == "1":
        os._exit(9)  # rank 1 dies right after its first shard
d.RankShardWriter._write = dying
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
    # The same launch finishes it; so does one process (another N).
    alone = tmp_path / "alone"
    shutil.copytree(out, alone)
    refused = torchrun(["-m", "harvest", *_harvest_args(tiny_model, token_dataset, out)], expect_ok=False)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    torchrun(["-m", "harvest", *_harvest_args(tiny_model, token_dataset, out), "--resume"])
    assert dump_files(out) == dump_files(ref)
    run_harvest(*_harvest_args(tiny_model, token_dataset, alone)[1:], "--resume")
    assert dump_files(alone) == dump_files(ref)
