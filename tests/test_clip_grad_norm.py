"""clip_grad_norm: the whole gradient is scaled to at most the given norm before each update
(after the architecture's constraints), nothing changes without it, and a clipped run resumes
bit for bit."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from test_train import small_cfg, sparse_dump
from train.run import train
from train.step import make_optimizer, train_step_
from shared.saes import SAEConfig
from shared.saes.standard import StandardSAE

pytestmark = pytest.mark.usefixtures("one_thread")


def norms_at_update(clip: float | None, steps: int = 4) -> tuple[list[float], StandardSAE]:
    """Train a small standard SAE a few steps; the total gradient norm Adam saw at each update."""
    torch.manual_seed(0)
    sae = StandardSAE(SAEConfig(d_in=16, d_sae=32), StandardSAE.settings_from({"l1_coefficient": 1.0}))
    optimizer = make_optimizer(sae, 1e-3)
    seen = []
    optimizer.register_step_pre_hook(lambda opt, args, kwargs: seen.append(float(torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in sae.parameters() if p.grad is not None])))))
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1)) * 10
    for _ in range(steps):
        train_step_(sae, optimizer, None, x, clip_grad_norm=clip)
    return seen, sae


def test_the_gradient_at_each_update_is_at_most_the_clip():
    free, free_sae = norms_at_update(None)
    assert min(free) > 1.0  # the unclipped gradient is larger than the clip below, so clipping acts
    clipped, clipped_sae = norms_at_update(1.0)
    assert all(n <= 1.0 + 1e-4 for n in clipped), clipped
    assert clipped[0] == pytest.approx(1.0, rel=1e-4)  # scaled to the norm, not below it
    assert not torch.equal(free_sae.W_enc, clipped_sae.W_enc)
    loose, loose_sae = norms_at_update(1e9)  # a clip above every norm changes nothing
    assert loose == free and torch.equal(loose_sae.W_enc, free_sae.W_enc)


def test_a_clipped_run_resumes_bit_for_bit(tmp_path):
    sparse_dump(tmp_path / "dump", n_rows=4096)
    kw = dict(total_training_tokens=256 * 12, n_checkpoints=1, clip_grad_norm=0.5)
    full = train(small_cfg(tmp_path / "dump", tmp_path / "full", **kw), progress=False)
    index = json.loads((full.run_dir / "checkpoints.json").read_text())
    shutil.copytree(full.run_dir / index[0]["folder"], tmp_path / "mid")
    resumed = train(small_cfg(tmp_path / "dump", tmp_path / "resumed", **kw), resume_from=tmp_path / "mid",
                    progress=False)
    assert (resumed.final / "sae_weights.safetensors").read_bytes() == (full.final / "sae_weights.safetensors").read_bytes()
    assert json.loads((full.final / "cfg.json").read_text())["clip_grad_norm"] == 0.5
