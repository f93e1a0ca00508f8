"""Results that cannot be right: `evaluate` on SAE weights holding a NaN or an infinity (each
tensor of each architecture), or on a cfg.json edited to describe another SAE than its weights
(another architecture with the same tensors, keys of one architecture under another's name, a
weight stored as integers, a folded scale or held-out count that is no number). Each is refused
with one line naming the tensor or the key, no traceback, and no eval.json. (Missing, truncated or unparseable files are test_run_corruption.py's.)"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fault._support import error_line, invoke, ok
from shared.dump_writer import write_dump

# Slow tier: the fault suite (tests/README.md); test_evaluate.py keeps a fast sample.
pytestmark = pytest.mark.slow

TENSORS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "gated": ("W_enc", "W_dec", "b_dec", "b_gate", "r_mag", "b_mag"),
}
"""Each architecture's tensors in sae_weights.safetensors (SAELens' names)."""
EXTRA = {"topk": ["--k", "4"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One finished run per architecture (d_in 16, d_sae 32) beside their dump, 8 held-out contexts."""
    root = tmp_path_factory.mktemp("eval_refusals")
    g = torch.Generator().manual_seed(4)
    write_dump(root / "dump", torch.randn(2048, 16, generator=g), context_size=16, shard_rows=512)
    for arch in TENSORS:
        ok("train", ["--shards", root / "dump", "--checkpoint-path", root / arch, "--architecture", arch,
                     *EXTRA.get(arch, []), "--expansion-factor", "2", "--train-batch-size", "64",
                     "--total-training-tokens", "512", "--device", "cpu", "--eval-holdout-contexts", "8",
                     "--quiet"])
    return root


def poison(name: str, value: float) -> Callable[[Path], None]:
    def apply(final: Path) -> None:
        path = final / "sae_weights.safetensors"
        tensors = load_file(str(path))
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[-1] = value
        save_file(tensors, str(path))
    return apply


def as_integers(name: str) -> Callable[[Path], None]:
    def apply(final: Path) -> None:
        path = final / "sae_weights.safetensors"
        tensors = load_file(str(path))
        tensors[name] = tensors[name].round().to(torch.int32)
        save_file(tensors, str(path))
    return apply


def edit_cfg(change: dict[str, object]) -> Callable[[Path], None]:
    """Set keys of cfg.json; a value `...` deletes the key."""
    def apply(final: Path) -> None:
        path = final / "cfg.json"
        cfg = json.loads(path.read_text())
        for key, value in change.items():
            if value is ...:
                cfg.pop(key, None)
            else:
                cfg[key] = value
        path.write_text(json.dumps(cfg))
    return apply


# name -> (architecture of the run, damage of its final/)
DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {}
for _arch, _names in TENSORS.items():
    for _t in _names:
        DAMAGE[f"{_arch}-{_t}-nan"] = (_arch, poison(_t, float("nan")))
    DAMAGE[f"{_arch}-W_dec-inf"] = (_arch, poison("W_dec", float("inf")))
    DAMAGE[f"{_arch}-b_dec--inf"] = (_arch, poison("b_dec", float("-inf")))
    DAMAGE[f"{_arch}-W_enc-as-int32"] = (_arch, as_integers("W_enc"))
DAMAGE |= {
    # the same four tensors: only the architecture's own cfg keys tell these apart
    "standard-edited-to-topk": ("standard", edit_cfg({"architecture": "topk"})),
    "standard-edited-to-topk-no-trained-architecture": (
        "standard", edit_cfg({"architecture": "topk", "trained_architecture": ...})),
    "topk-edited-to-standard": ("topk", edit_cfg({"architecture": "standard"})),
    "topk-edited-to-standard-no-trained-architecture": (
        "topk", edit_cfg({"architecture": "standard", "trained_architecture": ...})),
    # values of cfg.json that evaluation reads besides the weights
    "standard-input-scale-folded-text": ("standard", edit_cfg({"input_scale_folded": "2.0"})),
    "standard-input-scale-folded-negative": ("standard", edit_cfg({"input_scale_folded": -2.0})),
    "standard-input-scale-folded-nan": ("standard", edit_cfg({"input_scale_folded": float("nan")})),
    "standard-target-scale-folded-zero": ("standard", edit_cfg({"target_scale_folded": 0})),
    "standard-eval-holdout-contexts-text": ("standard", edit_cfg({"eval_holdout_contexts": "8"})),
}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_weights_that_cannot_give_metrics_are_refused(runs, tmp_path, name):
    arch, damage = DAMAGE[name]
    root = tmp_path / "runs"
    root.mkdir()
    shutil.copytree(runs / arch, root / arch)
    (root / arch / "eval.json").unlink(missing_ok=True)
    damage(root / arch / "final")
    got = invoke("evaluate", [root / arch, "--no-model", "--shards", runs / "dump"])
    line = error_line(got)
    assert line.startswith("evaluate: error:"), got.describe()
    assert "internal error" not in line, "a damaged file reported as a bug\n" + got.describe()
    assert not (root / arch / "eval.json").exists(), got.describe()
