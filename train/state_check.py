"""Checks of a checkpoint's trainer state before a resume uses any of it.

A resume restores a trainer from two files (`train.checkpoint`): trainer_state.json (counters,
scale, the run's settings) and trainer_state.safetensors (parameters, buffers, Adam state,
dead-feature trackers, metric sums). Torch would broadcast a moment of the wrong shape into place,
a missing Adam state would silently become a fresh one and a missing counter its default, so every
value is checked here first, against the other values of the checkpoint and against the trainer
it is loaded into; what is wrong is named in one line (`shared.errors.UserError`).
"""
from __future__ import annotations

import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from shared.errors import UserError
from train.sae_trainer import Counters, SAETrainer
from train.sparsity_control import OPTIONAL as CONTROL_OPTIONAL, TENSORS as CONTROL_TENSORS

DAMAGED = "the checkpoint is damaged; resume from an earlier checkpoint or start again"
TRACKERS = ("tokens_since_fired", "window_fired", "fired_total")
"""The dead-feature trackers: [d_sae] int64 row counts."""
METRIC_SUM = "metric_sum."
METRIC_STATS = ("loss", "mse", "l0", "sum_sq_err", "sum_sq_total", "l2_ratio")
"""Metric sums every architecture keeps (`SAETrainer._accumulate`); its loss terms come on top."""
ADAM_MOMENTS = ("exp_avg", "exp_avg_sq")
CONTROL = "sparsity_control."
"""The target-L0 controller's state (`train.sparsity_control.TENSORS`): float32 scalars."""
_COUNTS = tuple(f.name for f in fields(Counters) if f.type in (int, "int"))
_FLAGS = tuple(f.name for f in fields(Counters) if f.type in (bool, "bool"))


def damaged(path: Path, what: str) -> UserError:
    return UserError(f"{path} {what}: {DAMAGED}")


def _plain_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(state: dict[str, Any], key: str, path: Path, where: str = "") -> int:
    """A non-negative integer of the state (`where`: the sub-object holding it, for the message)."""
    value = state.get(key)
    name = f"{where}{key}"
    if key not in state:
        raise damaged(path, f"lacks {name}")
    if not _plain_int(value) or value < 0:
        raise damaged(path, f"holds {name}={value!r}, not a non-negative integer")
    return value


def _scale(state: dict[str, Any], key: str, path: Path) -> float:
    value = state.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise damaged(path, f"holds {key}={value!r}, not a positive finite number")
    return float(value)


def check_state_json(state: dict[str, Any], path: Path) -> Counters:
    """The counters of trainer_state.json (`path`), once every value has its type and range and
    they agree with each other; UserError naming the first that does not."""
    counters = state.get("counters")
    if not isinstance(counters, dict):
        raise damaged(path, "lacks its counters" if counters is None else "holds counters that are no JSON object")
    unknown = sorted(set(counters) - set(_COUNTS) - set(_FLAGS))
    if unknown:
        raise damaged(path, f"holds unknown counters {unknown}")
    values: dict[str, Any] = {k: _count(counters, k, path, "counters.") for k in _COUNTS}
    for k in _FLAGS:
        if not isinstance(counters.get(k), bool):
            raise damaged(path, f"holds counters.{k}={counters.get(k)!r}, not true or false"
                          if k in counters else f"lacks counters.{k}")
        values[k] = counters[k]
    c = Counters(**values)
    for key in ("scheduler_last_epoch", "metric_sum_steps", "total_steps"):
        _count(state, key, path)
    _scale(state, "input_scale", path)
    if "target_scale" in state:
        _scale(state, "target_scale", path)
    _check_consistent(state, c, path)
    return c


def _check_consistent(state: dict[str, Any], c: Counters, path: Path) -> None:
    """What the counters of one run always satisfy: a step reads at least one row and at most a
    batch, the scheduler steps with the optimizer, and nothing counts past the rows seen."""
    rules = [
        (c.step <= state["total_steps"], f"step {c.step} beyond the run's total_steps {state['total_steps']}"),
        (state["scheduler_last_epoch"] == c.step,
         f"scheduler_last_epoch {state['scheduler_last_epoch']} that is not the step {c.step}"),
        (state["metric_sum_steps"] <= c.step, f"metric_sum_steps {state['metric_sum_steps']} beyond the step {c.step}"),
        (c.step <= c.tokens_seen, f"tokens_seen {c.tokens_seen} fewer than its {c.step} steps"),
        (c.window_rows <= c.tokens_seen, f"window_rows {c.window_rows} beyond tokens_seen {c.tokens_seen}"),
        (c.n_resampled_last <= c.n_resampled_total,
         f"n_resampled_last {c.n_resampled_last} beyond n_resampled_total {c.n_resampled_total}"),
    ]
    batch = (state.get("config") or {}).get("train_batch_size")
    if _plain_int(batch) and batch > 0:
        rules.append((c.tokens_seen <= c.step * batch,
                      f"tokens_seen {c.tokens_seen} beyond {c.step} steps of {batch} rows"))
    for ok, what in rules:
        if not ok:
            raise damaged(path, f"holds {what}")


def check_fits_run(state: dict[str, Any], c: Counters, trainer: SAETrainer, path: Path) -> None:
    """The state against the run resuming it: its step within this run's steps, its scales those
    of this run's dumps, its resample counts possible for this SAE's width."""
    if c.step > trainer.total_steps:
        raise UserError(f"{path.parent} is at step {c.step:,}, beyond this run's {trainer.total_steps:,} steps "
                        "(total_training_tokens, train_batch_size or the dump differ from the run's): resume "
                        "with the checkpoint's own settings")
    # Same length settings on the same split (the resume checked the dump's): the same total steps.
    same_length = all(state["config"].get(k) == getattr(trainer.cfg, k)
                      for k in ("total_training_tokens", "train_batch_size"))
    if same_length and state["total_steps"] != trainer.total_steps:
        raise damaged(path, f"holds total_steps {state['total_steps']:,}, but its settings give {trainer.total_steps:,}")
    d_sae = trainer.sae.cfg.d_sae
    if c.n_resampled_last > d_sae or c.n_resampled_total > d_sae * c.step:
        raise damaged(path, f"holds n_resampled_total {c.n_resampled_total} / n_resampled_last "
                            f"{c.n_resampled_last}, more than {d_sae} features resampled per step")
    for key, now in (("input_scale", trainer.input_scale), ("target_scale", trainer.target_scale)):
        saved = float(state.get(key, state["input_scale"]))
        if saved != now:
            raise UserError(f"{path.parent} was trained with {key.replace('_', ' ')} {saved!r}, this run's is "
                            f"{now!r} (normalize_activations or the dump's statistics differ): resume with the "
                            "checkpoint's own settings and dump")


def check_same_sae(saved_config: dict[str, Any], trainer: SAETrainer, path: Path) -> None:
    """Refuse a resume whose settings build another SAE than the checkpoint holds (another
    architecture, width or shape setting of the architecture, such as Matryoshka's prefix
    widths), even where the tensors happen to fit."""
    saved = dict(saved_config)
    d_sae, ef = saved.get("d_sae"), saved.get("expansion_factor")
    if d_sae is None and _plain_int(ef):
        d_sae = ef * trainer.d_in
    own = type(trainer.sae).shape_settings  # declared by the architecture (shared.saes.base.SAE)
    config = trainer.cfg.to_dict()
    now = {"architecture": trainer.cfg.architecture, "d_sae": trainer.sae.cfg.d_sae,
           **{k: config.get(k) for k in own}}
    was = {"architecture": saved.get("architecture"), "d_sae": d_sae, **{k: saved.get(k) for k in own}}
    changed = [k for k in now if was[k] != now[k]]
    if changed:
        what = ", ".join(f"{k} {now[k]} (the checkpoint's: {was[k]})" for k in changed)
        raise UserError(f"--resume-from {path.parent} continues the SAE it holds, but this run asks for {what}; "
                        "drop those settings to continue it. No command starts a new run from a checkpoint's "
                        "weights yet: to train that SAE, start a new run with another --checkpoint-path and "
                        "without --resume-from")


def check_state_tensors(tensors: dict[str, torch.Tensor], c: Counters, metric_steps: int,
                        trainer: SAETrainer, path: Path) -> None:
    """Every tensor a resume restores is present, of the shape and dtype of what it restores,
    finite, and consistent with the counters; nothing else is in the file."""
    expected: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for n, p in trainer.sae.named_parameters():
        expected[f"sae.{n}"] = (tuple(p.shape), p.dtype)
        if c.step > 0:  # every parameter has had a gradient by then: Adam keeps a state for each
            for key in ADAM_MOMENTS:
                expected[f"optim.{n}.{key}"] = (tuple(p.shape), p.dtype)
            expected[f"optim.{n}.step"] = ((), torch.float32)
    for n, b in trainer.sae.named_buffers():
        expected[f"buffer.{n}"] = (tuple(b.shape), b.dtype)
    for n in TRACKERS:
        expected[n] = ((trainer.sae.cfg.d_sae,), torch.int64)
    if metric_steps > 0:
        expected |= {METRIC_SUM + k: ((), torch.float32) for k in (*METRIC_STATS, *loss_terms(trainer))}
    if trainer.sparsity_control is not None:
        # A checkpoint from before the goal's glide lacks its start (sparsity_control.OPTIONAL).
        expected |= {CONTROL + k: ((), torch.float32) for k in CONTROL_TENSORS
                     if k not in CONTROL_OPTIONAL or CONTROL + k in tensors}
    _check_control(tensors, trainer, path)
    _check_names(tensors, expected, path)
    for name, (shape, dtype) in expected.items():
        t = tensors[name]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise damaged(path, f"holds {_what(name)} as {t.dtype} {tuple(t.shape)}, not the {dtype} {shape} "
                                "it restores")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise damaged(path, f"holds NaN or infinite values in {_what(name)}")
    _check_values(tensors, c, trainer, path)


@torch.no_grad()
def loss_terms(trainer: SAETrainer) -> list[str]:
    """The names of the SAE's loss terms (the metric sums besides `METRIC_STATS`), from one
    forward of two zero rows: each architecture returns the same terms on every batch. A forward
    changes no parameter or buffer, but may leave a note of its batch on the module for the step
    that follows (BatchTopK's kept minimum): the module's attributes are put back as they were."""
    sae = trainer.sae
    notes = dict(vars(sae))
    try:
        zeros = lambda width: torch.zeros(2, width, device=sae.W_enc.device, dtype=sae.W_enc.dtype)  # noqa: E731
        out = sae.training_forward(zeros(trainer.d_in), target=zeros(trainer.d_out))
    finally:
        for key in set(vars(sae)) - set(notes):
            delattr(sae, key)
        vars(sae).update(notes)
    return sorted(set(out.losses) - set(METRIC_STATS))


def _check_control(tensors: dict[str, torch.Tensor], trainer: SAETrainer, path: Path) -> None:
    """A checkpoint steered toward a target L0 resumes only with one, and one without only without."""
    saved = any(k.startswith(CONTROL) for k in tensors)
    steering = trainer.sparsity_control is not None
    if saved != steering:
        was, now = ("a target_l0", "none") if saved else ("no target_l0", f"target_l0 {trainer.sparsity_control.target:g}")
        raise UserError(f"{path.parent} was trained with {was}, this run asks for {now}: resume with the "
                        "checkpoint's own settings (a target_l0 may change, not appear or go)")


def _check_names(tensors: dict[str, torch.Tensor], expected: dict[str, Any], path: Path) -> None:
    missing = [k for k in expected if k not in tensors]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise damaged(path, f"lacks {_what(missing[0])}{more}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise damaged(path, f"holds tensors {extra} that this SAE and its trainer do not have")


def _what(name: str) -> str:
    """A state tensor's name in words: 'the Adam state exp_avg of W_enc', 'the tracker fired_total'."""
    if name.startswith("optim."):
        param, key = name[len("optim."):].rsplit(".", 1)
        return f"the Adam state {key} of {param}"
    if name.startswith(METRIC_SUM):
        return f"the pending metric sum {name[len(METRIC_SUM):]}"
    if name in TRACKERS:
        return f"the dead-feature tracker {name}"
    if name.startswith(CONTROL):
        return f"the target-L0 controller's {name[len(CONTROL):]}"
    return name.split(".", 1)[1] if name.startswith(("sae.", "buffer.")) else name


def _check_values(tensors: dict[str, torch.Tensor], c: Counters, trainer: SAETrainer, path: Path) -> None:
    """Counts within what the counters allow: trackers count rows, Adam counts steps."""
    bounds = {"tokens_since_fired": c.tokens_seen, "window_fired": c.window_rows, "fired_total": c.tokens_seen}
    for name, most in bounds.items():
        t = tensors[name]
        if t.numel() and (int(t.min()) < 0 or int(t.max()) > most):
            raise damaged(path, f"holds {_what(name)} outside 0..{most}")
    for n, _ in trainer.sae.named_parameters():
        step = tensors.get(f"optim.{n}.step")
        if step is not None and not (0 <= float(step) <= c.step and float(step).is_integer()):
            raise damaged(path, f"holds the Adam step {float(step)} of {n}, not a whole number of steps up to {c.step}")
    ema = tensors.get(CONTROL + "l0_ema")
    if ema is not None and not 0 <= float(ema) <= trainer.sae.cfg.d_sae:
        raise damaged(path, f"holds the target-L0 controller's L0 estimate {float(ema)}, outside 0..{trainer.sae.cfg.d_sae}")
    for key in ADAM_MOMENTS[1:]:  # the second moment is a mean of squares
        for n, _ in trainer.sae.named_parameters():
            sq = tensors.get(f"optim.{n}.{key}")
            if sq is not None and bool((sq < 0).any()):
                raise damaged(path, f"holds negative values in the Adam state {key} of {n}")
