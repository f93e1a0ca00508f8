"""Sweeps: a grid of SAEs trained in lockstep from one read of a dump.

`train --sweep l1_coefficient=1e-4,3e-4 --sweep expansion_factor=16,64` (or a `sweep:` mapping in
the config file) trains every combination on one shuffled stream: each batch is read once and fed
to each SAE. Each SAE keeps its own optimizer, schedule, resampling, metrics and checkpoints in a
subfolder named after its settings, and ends with exactly the weights it would have trained alone.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Callable

import torch

from shared.errors import UserError
from train.config import LanguageModelSAERunnerConfig
from train.run import TrainResult, evaluate_final, make_slot, pick_device, plan_data, run_slots

# Settings every SAE of a sweep must share: they define the one data stream it trains on.
STREAM_KEYS = {"shards", "train_batch_size", "seed", "total_training_tokens", "shuffle_buffer_rows",
               "shuffle_block_rows", "eval_holdout_contexts", "device", "checkpoint_path", "run_name",
               "model_name", "hook_point", "dataset_path", "context_size", "normalize_activations",
               "wandb_log_frequency", "log_to_wandb", "wandb_project", "wandb_entity"}
MEMORY_HEADROOM = 0.8  # plan to use at most this fraction of free memory


def parse_value(text: str) -> Any:
    """'1e-4' -> 0.0001, '64' -> 64, 'true' -> True, anything else stays a string."""
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_sweep_flags(flags: tuple[str, ...]) -> dict[str, list[Any]]:
    """--sweep key=v1,v2 (repeatable) -> {key: [v1, v2]}."""
    out: dict[str, list[Any]] = {}
    for flag in flags:
        key, sep, values = flag.partition("=")
        if not sep or not values.strip():
            raise UserError(f"--sweep {flag!r}: write KEY=V1,V2,... e.g. --sweep l1_coefficient=0.6,1.2")
        out[key.strip().replace("-", "_")] = [parse_value(v) for v in values.split(",")]
    return out


def check_sweep(sweep: dict[str, list[Any]]) -> None:
    known = {f.name for f in fields(LanguageModelSAERunnerConfig)}
    for key, values in sweep.items():
        if key not in known:
            raise UserError(f"cannot sweep unknown key '{key}'; see `train --help`")
        if key in STREAM_KEYS:
            raise UserError(f"cannot sweep '{key}': all SAEs of a sweep share one data stream; "
                            "run separate `train` commands for it")
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep '{key}' needs a list of values")


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def grid(base: LanguageModelSAERunnerConfig, sweep: dict[str, list[Any]]) -> list[tuple[str, LanguageModelSAERunnerConfig]]:
    """Every combination of the swept values, named like 'l1_coefficient_0.6__expansion_factor_16'."""
    check_sweep(sweep)
    keys = list(sweep)
    out = []
    for combo in itertools.product(*(sweep[k] for k in keys)):
        name = "__".join(f"{k}_{_fmt(v)}" for k, v in zip(keys, combo))
        out.append((name, replace(base, **dict(zip(keys, combo)))))
    return out


def sae_bytes(d_in: int, d_sae: int, batch: int) -> int:
    """Rough peak memory of one SAE in training (float32): weights, grads and two Adam moments
    (16 bytes per parameter), a checkpoint copy, and about five [batch, d_sae] activations."""
    params = 2 * d_in * d_sae + d_sae + d_in
    return 20 * params + 5 * 4 * batch * d_sae


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def groups_that_fit(sizes: list[int], budget: int) -> list[list[int]]:
    """Greedy, in grid order: indices of SAEs trained together, each group within `budget`."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += size
    return groups


def train_sweep(base: LanguageModelSAERunnerConfig, sweep: dict[str, list[Any]],
                log: Callable[[str], None] = print, progress: bool = True, verify: bool = True
                ) -> list[TrainResult]:
    """Train the grid; returns one result per SAE, in grid order."""
    runs = grid(base, sweep)
    data = plan_data(base, verify)
    device = pick_device(base.device)
    d_in = data.dump.d_in
    sweep_name = base.run_name or f"sweep-{data.dump.path.name}"
    root = Path(base.checkpoint_path or Path("data") / "runs" / sweep_name)
    sizes = [sae_bytes(d_in, cfg.sae_width(d_in), base.train_batch_size) for _, cfg in runs]
    budget = int(free_bytes(device) * MEMORY_HEADROOM) - 3 * data.loader.buffer_rows * d_in * 4
    groups = groups_that_fit(sizes, max(budget, 1))
    if len(groups) > 1:
        log(f"the {len(runs)} SAEs need {sum(sizes) / 1e9:.1f} GB, {max(budget, 0) / 1e9:.1f} GB is free "
            f"on {device}: training them in {len(groups)} groups of {', '.join(str(len(g)) for g in groups)}")
    log(f"sweep of {len(runs)} SAEs on {data.loader.n_rows:,} rows of {data.dump.path} for "
        f"{data.total_steps:,} steps each; folder {root}")
    results: list[TrainResult | None] = [None] * len(runs)
    for group in groups:
        slots = [make_slot(runs[i][1], data, root / runs[i][0], runs[i][0], None, wandb_group=sweep_name)
                 for i in group]
        finals = run_slots(slots, data, progress)
        for i, slot, final in zip(group, slots, finals):
            results[i] = TrainResult(slot.trainer.sae, slot.run_dir, final, slot.trainer)
    done = [r for r in results if r is not None]
    if base.evaluate_at_end:
        model = _load_model_once(data, base)
        baselines: dict = {}  # the ablation runs are the same for every SAE: pay for them once
        for r in done:
            r.evaluation = evaluate_final(r.trainer.cfg, r.final, log, model=model, baselines=baselines)
    from train.summary import SummaryEntry, write_summary, write_sweep_index

    entries = [SummaryEntry(name, r.run_dir, {k: getattr(cfg, k) for k in sweep})
               for (name, cfg), r in zip(runs, done)]
    write_sweep_index(root, entries, list(sweep))
    rows = write_summary(root, entries, list(sweep), log)
    if base.log_to_wandb:
        _log_summary_to_wandb(base, sweep_name, root, rows)
    return done


def _log_summary_to_wandb(base: LanguageModelSAERunnerConfig, group: str, root: Path,
                          rows: list[dict[str, Any]]) -> None:
    """The sweep's table and plots as one more run of the sweep's wandb group."""
    import wandb

    run = wandb.init(project=base.wandb_project, entity=base.wandb_entity, group=group,
                     name=f"{group}-summary", job_type="summary", dir=str(root), reinit="create_new")
    keys = sorted({k for r in rows for k in r if not k.startswith("label")})
    run.log({"summary": wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows])})
    from train.summary import PLOTS

    for name in PLOTS:
        if (root / name).is_file():  # the CE frontier exists only after evaluation with the model
            run.log({f"plots/{Path(name).stem}": wandb.Image(str(root / name))})
    run.finish()


def _load_model_once(data, base: LanguageModelSAERunnerConfig) -> Any:
    from shared.models import load_model

    return load_model(data.dump.manifest.model, str(pick_device(base.device)))
