"""Checkpoints: an SAE folder SAELens can load, plus the trainer state a resume needs.

    <run>/<tokens seen>/ or <run>/final/
        cfg.json                    training config + dump facts + SAE shape
        sae_weights.safetensors     the architecture's inference tensors, for raw inputs (SAELens' layout)
        sparsity.safetensors        log10 feature density over the run so far
        trainer_state.json          step, tokens, counters, scale, dump identity
        trainer_state.safetensors   every training-space parameter and buffer, Adam state, dead-feature state,
                                    metric sums not yet logged

Nothing a user loads is pickled. Each checkpoint folder appears whole (temp folder + rename).
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from shared import atomic
from shared.errors import UserError
from train import run_layout
from train.run_layout import SPARSITY, STATE_JSON, STATE_TENSORS
from train.sae_trainer import SAETrainer
from train.state_check import (CONTROL as _CONTROL, METRIC_SUM as _METRIC_SUM, TRACKERS as _TRACKERS, check_fits_run,
                               check_same_sae, check_state_json, check_state_tensors, damaged)


def sae_cfg_dict(trainer: SAETrainer, dump_info: dict[str, Any]) -> dict[str, Any]:
    """cfg.json: the training config, where the activations came from, and SAELens' keys."""
    cfg = trainer.cfg.to_dict()
    cfg.update(dump_info)
    cfg.update({
        "d_in": trainer.d_in, "d_sae": trainer.sae.cfg.d_sae, "device": str(trainer.device),
        "model_name": dump_info["model_name"], "hook_name": dump_info["hook_point"],
        "hook_layer": dump_info["hook_point_layer"], "hook_head_index": None,
        "finetuning_scaling_factor": False,
        "model_from_pretrained_kwargs": {},
        # The saved weights already include any input scaling, so loaders must not normalize again.
        "normalize_activations": "none",
        "trained_with_normalize_activations": trainer.cfg.normalize_activations,
    })
    if trainer.sparsity_control is not None:  # what the target-L0 controller steered the coefficient to
        cfg["sparsity_coefficient_reached"] = trainer.sparsity_coefficient()
    target = dump_info.get("target")
    if isinstance(target, dict):  # a transcoder: SAELens reads the hook it writes as metadata.hook_name_out
        cfg["metadata"] = {**cfg.get("metadata", {}), "hook_name_out": target["hook_point"],
                           "hook_head_index_out": None}
    return cfg


def save_checkpoint(folder: Path, trainer: SAETrainer, dump_info: dict[str, Any]) -> Path:
    folder = Path(folder)
    tmp = atomic.temp_path(folder)
    atomic.remove(tmp)
    # Saved weights work on raw activations: fold the input and target scaling into a copy.
    try:  # a failed save (a full disk) leaves no temporary folder behind
        trainer.calibrate_inference_()  # BatchTopK: the saved threshold from sample rows
        exported = copy.deepcopy(trainer.sae)
        if trainer.input_scale != 1.0 or trainer.target_scale != 1.0:
            exported.fold_scaling_(trainer.input_scale, trainer.target_scale)
        exported.save(tmp, sae_cfg_dict(trainer, dump_info))
        atomic.save_tensors({"sparsity": trainer.log10_density().cpu().contiguous()}, tmp / SPARSITY)
        atomic.save_tensors(_state_tensors(trainer), tmp / STATE_TENSORS)
        state = {"counters": asdict(trainer.counters), "scheduler_last_epoch": trainer.scheduler.last_epoch,
                 "metric_sum_steps": trainer.pending_metrics()[1],
                 "input_scale": trainer.input_scale,
                 **({"target_scale": trainer.target_scale} if trainer.target_scale != trainer.input_scale else {}),
                 "total_steps": trainer.total_steps,
                 "dump": dump_info, "config": trainer.cfg.to_dict()}
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=1) + "\n")
    except BaseException:
        atomic.remove(tmp)
        raise
    atomic.commit(tmp, folder)
    run_layout.record_checkpoint(folder, trainer.counters.step, trainer.counters.tokens_seen)
    return folder


def _state_tensors(trainer: SAETrainer) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the SAE (whatever its architecture), Adam's state of each
    parameter (found by parameter object), and the dead-feature trackers."""
    out = {f"sae.{n}": t.detach() for n, t in trainer.sae.named_parameters()}
    out |= {f"buffer.{n}": t for n, t in trainer.sae.named_buffers()}
    for n in _TRACKERS:
        out[n] = getattr(trainer, n)
    out |= {_METRIC_SUM + k: v for k, v in trainer.pending_metrics()[0].items()}
    if trainer.sparsity_control is not None:
        out |= {_CONTROL + k: v for k, v in trainer.sparsity_control.state().items()}
    for n, param in trainer.sae.named_parameters():
        for key, value in trainer.optimizer.state.get(param, {}).items():
            out[f"optim.{n}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return {k: v.detach().cpu().contiguous() for k, v in out.items()}


def read_state(folder: Path) -> dict[str, Any]:
    path = Path(folder) / STATE_JSON
    if not path.is_file():
        raise UserError(_not_a_checkpoint(Path(folder)))
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise TypeError("not a JSON object")
    except (ValueError, TypeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); resume from another checkpoint "
                        "of the run or start it again") from None
    # What the resume reads before the trainer exists (the run's settings, its dump); the rest is
    # checked against the trainer by `load_trainer_state_`.
    for key in ("config", "dump"):
        if not isinstance(state.get(key), dict):
            raise damaged(path, f"lacks its {key}" if key not in state else f"holds a {key} that is no JSON object")
    return state


def _not_a_checkpoint(folder: Path) -> str:
    """Why `folder` cannot be resumed from, and what to do instead."""
    entries = run_layout.read_checkpoint_index(folder)
    sweep = folder.parent
    if run_layout.is_sweep(sweep):  # one SAE of a sweep: the sweep, or its checkpoint in a new folder
        alone = (f", or this SAE alone in a new folder: --resume-from {folder / entries[-1]['folder']} "
                 "--checkpoint-path NEW_FOLDER") if entries else ""
        return f"{folder} is an SAE folder of the sweep {sweep}: continue the whole sweep with --resume-from {sweep}{alone}"
    if entries:
        return (f"{folder} is a run folder, not a checkpoint: resume from its latest checkpoint, "
                f"--resume-from {folder / entries[-1]['folder']}")
    if run_layout.has_run_files(folder):
        return (f"{folder} holds a run stopped before its first checkpoint: there is nothing to resume; "
                "start it again with the same command and --overwrite")
    return f"{folder} is not a checkpoint of this tool (no {STATE_JSON}); pass a folder such as data/runs/<run>/final"


def _read_state_tensors(folder: Path) -> dict[str, torch.Tensor]:
    path = folder / STATE_TENSORS
    try:
        return load_file(str(path), device="cpu")
    except FileNotFoundError:
        raise UserError(f"{path} is missing; resume from another checkpoint of the run or start it again") from None
    except Exception as e:  # safetensors reports damage with its own error type
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); resume from another checkpoint "
                        "of the run or start it again") from None


@torch.no_grad()
def load_trainer_state_(trainer: SAETrainer, folder: Path) -> None:
    """Put a freshly built trainer into exactly the state saved in `folder`, once every value of
    it is checked (`train.state_check`): nothing of a damaged checkpoint is used."""
    folder = Path(folder)
    state = read_state(folder)
    counters = check_state_json(state, folder / STATE_JSON)
    check_same_sae(state["config"], trainer, folder / STATE_JSON)
    check_fits_run(state, counters, trainer, folder / STATE_JSON)
    tensors = _read_state_tensors(folder)
    check_state_tensors(tensors, counters, state["metric_sum_steps"], trainer, folder / STATE_TENSORS)
    # Fused Adam keeps its step count on the parameter's device, the for-each one on the CPU.
    step_device = trainer.device if trainer.optimizer.defaults.get("fused") else torch.device("cpu")
    for n, param in trainer.sae.named_parameters():
        param.copy_(tensors[f"sae.{n}"])
        opt = {k.split(".", 2)[2]: v for k, v in tensors.items() if k.startswith(f"optim.{n}.")}
        # Moments must share the parameter's strides: fused Adam walks their memory in lockstep.
        opt = {k: v.to(step_device) if k == "step" else torch.empty_like(param).copy_(v)
               for k, v in opt.items()}
        if opt:
            trainer.optimizer.state[param] = opt
    for n, buffer in trainer.sae.named_buffers():
        buffer.copy_(tensors[f"buffer.{n}"])
    for n in _TRACKERS:
        getattr(trainer, n).copy_(tensors[n])
    if trainer.sparsity_control is not None:
        trainer.sparsity_control.load_({k[len(_CONTROL):]: v for k, v in tensors.items() if k.startswith(_CONTROL)})
    trainer.counters = counters
    sums = {k[len(_METRIC_SUM):]: v for k, v in tensors.items() if k.startswith(_METRIC_SUM)}
    trainer.restore_pending_metrics_(sums, state["metric_sum_steps"])
    trainer.scheduler.last_epoch = state["scheduler_last_epoch"]
    lr = [base * fn(trainer.scheduler.last_epoch)
          for base, fn in zip(trainer.scheduler.base_lrs, trainer.scheduler.lr_lambdas)]
    for group, value in zip(trainer.optimizer.param_groups, lr):
        group["lr"] = value
    trainer.scheduler._last_lr = lr  # what get_last_lr() reports until the next step
