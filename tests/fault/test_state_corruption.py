"""Damaged trainer state: every tensor of trainer_state.safetensors with a wrong shape (one that
torch would broadcast into place), a wrong dtype, or missing; every counter of trainer_state.json
missing, negative, huge or of the wrong type; and resumes that would change what the checkpoint
is. Each `train --resume-from` is refused with one line naming what is wrong, no traceback, no
internal error, nothing written. (The damage of whole files is test_run_corruption.py's.)"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fault._support import error_line, invoke, tiny_checkpointed_run

# Slow tier: the fault suite (tests/README.md); test_hardening_train.py keeps a fast sample.
pytestmark = pytest.mark.slow

CHECKPOINT = "512"  # tokens seen at the run's one checkpoint: step 8 of 16
STATE_JSON, STATE_TENSORS = "trainer_state.json", "trainer_state.safetensors"


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished standard run (16 x 64 rows, d_in 16, d_sae 32) with one checkpoint at step 8."""
    run = tiny_checkpointed_run(tmp_path_factory.mktemp("state_corruption"), "run", 3)
    assert (run / CHECKPOINT / STATE_TENSORS).is_file()
    return run


def _tensor_names() -> list[str]:
    """The tensors of a standard SAE's trainer state at a step with metric sums pending."""
    params = {"W_enc": (16, 32), "b_enc": (32,), "W_dec": (32, 16), "b_dec": (16,)}
    names = [f"sae.{p}" for p in params]
    names += [f"optim.{p}.{k}" for p in params for k in ("exp_avg", "exp_avg_sq", "step")]
    names += ["tokens_since_fired", "window_fired", "fired_total"]
    names += [f"metric_sum.{k}" for k in ("loss", "mse", "l1_loss", "l0", "sum_sq_err", "sum_sq_total", "l2_ratio")]
    return names


def _broadcastable(t: torch.Tensor) -> torch.Tensor:
    """A tensor of another shape that `copy_` would broadcast into t: [1, ...] rows, [1] for a
    vector or a scalar."""
    if t.dim() == 0:
        return t.reshape(1).clone()
    return t[:1].clone()


_OTHER_DTYPE = {torch.float32: torch.float64, torch.int64: torch.int32}


def edit_tensors(name: str, how: str) -> Callable[[Path], None]:
    def apply(ckpt: Path) -> None:
        path = ckpt / STATE_TENSORS
        tensors = load_file(str(path))
        assert name in tensors, f"{name} not in {sorted(tensors)}"
        if how == "missing":
            del tensors[name]
        elif how == "shape":
            tensors[name] = _broadcastable(tensors[name])
        else:
            tensors[name] = tensors[name].to(_OTHER_DTYPE[tensors[name].dtype])
        save_file(tensors, str(path))
    return apply


def set_values(name: str, value: float) -> Callable[[Path], None]:
    """Put `value` into the last element of one state tensor (right shape and dtype, wrong value)."""
    def apply(ckpt: Path) -> None:
        path = ckpt / STATE_TENSORS
        tensors = load_file(str(path))
        t = tensors[name].clone()
        t.view(-1)[-1] = value
        tensors[name] = t
        save_file(tensors, str(path))
    return apply


def edit_state(key: str, value: object) -> Callable[[Path], None]:
    """Set (or, with value `...`, delete) a key of trainer_state.json; 'counters.x' is nested."""
    def apply(ckpt: Path) -> None:
        path = ckpt / STATE_JSON
        state = json.loads(path.read_text())
        holder, leaf = (state["counters"], key.split(".", 1)[1]) if key.startswith("counters.") else (state, key)
        assert leaf in holder, f"{key} not in the state"
        if value is ...:
            del holder[leaf]
        else:
            holder[leaf] = value
        path.write_text(json.dumps(state))
    return apply


# Whole-tensor damage refused before this change too (the weights' own shape check, a missing
# weight): not counted here.
_REFUSED_BEFORE = {("sae.W_enc", "shape"), ("sae.b_enc", "shape"), ("sae.W_dec", "shape"), ("sae.b_dec", "shape"),
                   ("sae.W_enc", "missing"), ("sae.b_enc", "missing"), ("sae.W_dec", "missing"),
                   ("sae.b_dec", "missing")}

COUNTERS = ["counters.step", "counters.tokens_seen", "counters.window_rows", "counters.n_resampled_total",
            "counters.n_resampled_last", "scheduler_last_epoch", "metric_sum_steps", "total_steps"]
_COUNTER_EDITS = {"missing": ..., "negative": -1, "huge": 10**15, "text": "8"}

# name -> (damage, extra flags of the resume)
DAMAGE: dict[str, tuple[Callable[[Path], None], list[str]]] = {}
for _name in _tensor_names():
    for _how in ("shape", "dtype", "missing"):
        if (_name, _how) not in _REFUSED_BEFORE:
            DAMAGE[f"tensor-{_name}-{_how}"] = (edit_tensors(_name, _how), [])
# right shape and dtype, impossible values (a NaN or negative Adam moment is refused before this
# change too, as a divergence at the first log step: not counted here)
DAMAGE |= {
    "value-optim.W_enc.step-huge": (set_values("optim.W_enc.step", 1e12), []),
    "value-optim.W_enc.step-fraction": (set_values("optim.W_enc.step", 2.5), []),
    "value-fired_total-negative": (set_values("fired_total", -5), []),
    "value-fired_total-huge": (set_values("fired_total", 10**12), []),
    "value-tokens_since_fired-negative": (set_values("tokens_since_fired", -1), []),
    "value-window_fired-huge": (set_values("window_fired", 10**12), []),
    "value-metric_sum.l0-nan": (set_values("metric_sum.l0", float("nan")), []),
}
for _key in COUNTERS:
    for _how, _value in _COUNTER_EDITS.items():
        DAMAGE[f"counter-{_key}-{_how}"] = (edit_state(_key, _value), [])
for _how, _value in {"missing": ..., "text": "no", "number": 1}.items():
    DAMAGE[f"counter-counters.auxk_active-{_how}"] = (edit_state("counters.auxk_active", _value), [])
for _how, _value in {"missing": ..., "negative": -1.0, "huge": 1e300, "text": "1.0", "zero": 0}.items():
    DAMAGE[f"counter-input_scale-{_how}"] = (edit_state("input_scale", _value), [])
DAMAGE |= {
    "counter-counters-unknown": (edit_state("counters", {"step": 8, "tokens_seen": 512, "window_rows": 512,
                                                         "n_resampled_total": 0, "n_resampled_last": 0,
                                                         "auxk_active": False, "epoch": 1}), []),
    "counter-counters-a-list": (edit_state("counters", [8, 512]), []),
    "state-config-missing": (edit_state("config", ...), []),
    "state-dump-missing": (edit_state("dump", ...), []),
    "resume-as-topk": (lambda ckpt: None, ["--architecture", "topk", "--k", "4"]),
    "resume-with-expected-norm": (lambda ckpt: None, ["--normalize-activations", "expected_norm"]),
    "resume-past-a-shorter-total": (lambda ckpt: None, ["--total-training-tokens", "256"]),
}


def files_below(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", list(DAMAGE))
def test_damaged_trainer_state_is_refused_in_one_line(run, tmp_path, name):
    root = shutil.copytree(run, tmp_path / "run")
    damage, flags = DAMAGE[name]
    damage(root / CHECKPOINT)
    before = files_below(tmp_path)
    got = invoke("train", ["--resume-from", root / CHECKPOINT, "--quiet", *flags])
    line = error_line(got, strict=False)
    assert line.startswith("train: error:"), got.describe()
    assert "internal error" not in line, "a damaged file reported as a bug\n" + got.describe()
    written = files_below(tmp_path) - before
    assert not written, f"written despite the refusal: {sorted(map(str, written))}\n" + got.describe()
