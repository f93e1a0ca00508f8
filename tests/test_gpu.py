"""CUDA paths: pinned-memory harvest copies, device batches from the loader, training on the GPU.

Skipped without CUDA; run them on a GPU machine with `python -m pytest -q -m gpu`.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_harvest
from shared.reader import open_dump
from train.loader import ActivationLoader

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cuda_harvest_matches_cpu(tiny_model, token_dataset, tmp_path):
    common = ["--model", str(tiny_model), "--dataset", str(token_dataset), "--context-size", "32",
              "--batch-size", "4", "--tokens", "1000", "--shard-rows", "300"]
    run_harvest(*common, "--out", str(tmp_path / "cpu"), "--device", "cpu")
    run_harvest(*common, "--out", str(tmp_path / "gpu"), "--device", "cuda")
    a, b = open_dump(tmp_path / "cpu"), open_dump(tmp_path / "gpu", verify=True)
    assert (a.column("tokens", 0, a.n_rows) == b.column("tokens", 0, b.n_rows)).all()
    torch.testing.assert_close(b.activations(0, b.n_rows), a.activations(0, a.n_rows), rtol=1e-4, atol=1e-5)


def test_cuda_loader_serves_the_cpu_batches(tmp_path):
    from shared.dump_writer import write_dump

    write_dump(tmp_path / "d", torch.randn(4096, 16), context_size=64, shard_rows=1000)
    dump = open_dump(tmp_path / "d")
    cpu = itertools.islice(ActivationLoader(dump, 256, seed=1, buffer_rows=1024).batches(), 20)
    gpu = itertools.islice(ActivationLoader(dump, 256, seed=1, buffer_rows=1024, device="cuda").batches(), 20)
    for x, y in zip(cpu, gpu):
        assert y.device.type == "cuda" and torch.equal(x, y.cpu())


def test_cuda_resume_equals_uninterrupted(tmp_path):
    from test_train import small_cfg, sparse_dump
    from train.run import train

    sparse_dump(tmp_path / "dump", n_rows=4096, n_features=4, per_row=1)
    common = dict(total_training_tokens=4096 * 4, n_checkpoints=1, device="cuda", l1_coefficient=0.5)
    full = train(small_cfg(tmp_path / "dump", tmp_path / "full", **common), progress=False)
    mid = next(p for p in (tmp_path / "full").iterdir() if p.name.isdigit())
    resumed = train(small_cfg(tmp_path / "dump", tmp_path / "res", **common), resume_from=mid, progress=False)
    a = load_file(full.final / "trainer_state.safetensors")
    b = load_file(resumed.final / "trainer_state.safetensors")
    for key in a:
        assert torch.equal(a[key], b[key]), key
