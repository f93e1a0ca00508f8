"""Files the tool writes get the permissions `open()` would give them (0o666 less the umask), the
weights included: safetensors creates its files 0600, which would hide the weights from a group
that can read the cfg.json beside them."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from shared.dump_writer import write_dump
from shared.file_mode import current_umask
from train.config import LanguageModelSAERunnerConfig
from train.run import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=[0o022, 0o027, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_umask_is_read_as_set(umask):
    assert current_umask() == umask


def test_dump_run_and_checkpoint_files_get_the_umask_mode(tmp_path, umask):
    dump = tmp_path / "dump"
    write_dump(dump, torch.randn(1024, 8, generator=torch.Generator().manual_seed(0)), context_size=16,
               shard_rows=512)
    cfg = LanguageModelSAERunnerConfig(shards=str(dump), checkpoint_path=str(tmp_path / "run"), expansion_factor=2,
                                       train_batch_size=128, total_training_tokens=512, device="cpu",
                                       eval_holdout_contexts=0, shuffle_buffer_rows=512)
    final = train(cfg, progress=False).final
    expected = 0o666 & ~umask
    files = [p for p in [*dump.rglob("*"), *(tmp_path / "run").rglob("*")] if p.is_file()]
    names = {p.name for p in files}
    assert {"manifest.json", "sae_weights.safetensors", "cfg.json", "trainer_state.safetensors"} <= names
    assert any(p.name.startswith("shard") or p.suffix == ".safetensors" for p in dump.rglob("*"))
    assert (final / "sae_weights.safetensors").is_file()
    wrong = {str(p.relative_to(tmp_path)): oct(mode(p)) for p in files if mode(p) != expected}
    assert wrong == {}, f"expected {oct(expected)}"
