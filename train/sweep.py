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

from shared.device import pick_device
from shared.errors import UserError
from shared.saes import architecture_class
from shared.run_paths import dump_list, dump_list_for, dump_path_for, plain_name
from shared.storage import absolute
from train import distributed
from train import run_layout as layout
from train.arch_settings import check_fits, check_settings_used, check_shapes, without_unused
from train.config import SWEEPABLE_GROUPS, LanguageModelSAERunnerConfig
from train.run import DataPlan, Job, TrainResult, plan_data, run_folder, train_job, with_absolute_dump
from train.run_folder import hold_run_folder

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
    """Only settings of the SAEs, their optimizers and dead-feature handling may vary: the rest
    defines the one data stream (or the run) that every SAE of the sweep shares."""
    group = {f.name: f.metadata["group"] for f in fields(LanguageModelSAERunnerConfig)}
    for key, values in sweep.items():
        if key not in group:
            raise UserError(f"cannot sweep unknown key '{key}'; see `train --help`")
        if group[key] not in SWEEPABLE_GROUPS:
            what = "data stream" if group[key] == "data" else group[key] + " settings"
            raise UserError(f"cannot sweep '{key}': all SAEs of a sweep share one {what}; "
                            "run separate `train` commands for it")
        if not isinstance(values, list) or not values:
            raise UserError(f"sweep '{key}' needs a list of values")


def _fmt(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def grid(base: LanguageModelSAERunnerConfig, sweep: dict[str, list[Any]]) -> list[tuple[str, LanguageModelSAERunnerConfig]]:
    """Every distinct combination of the swept values, named like 'l1_coefficient_0.6__expansion_factor_16'.

    Across architectures a combination keeps only the settings its architecture uses: with
    `architecture=topk,jumprelu` and `k=32,64` there are two topk SAEs and one jumprelu SAE
    (named without k), not two identical jumprelu runs.
    """
    check_sweep(sweep)
    keys = list(sweep)
    combos = [replace(base, **dict(zip(keys, combo))) for combo in itertools.product(*(sweep[k] for k in keys))]
    check_settings_used(combos)
    out, seen = [], set()
    for cfg in combos:
        cfg = LanguageModelSAERunnerConfig.from_dict(without_unused(cfg))
        name = "__".join(f"{k}_{_fmt(getattr(cfg, k))}" for k in keys if getattr(cfg, k) is not None)
        plain_name(name, "the swept values")  # it names the SAE's folder
        if name not in seen:
            seen.add(name)
            out.append((name, cfg))
    return out


def sae_bytes(d_in: int, d_sae: int, batch: int, architecture: str = "standard", d_out: int | None = None,
              n_hooks: int = 1) -> int:
    """Rough peak memory of one SAE in training (its architecture's `training_bytes`)."""
    return architecture_class(architecture).training_bytes(d_in, d_in if d_out is None else d_out, d_sae,
                                                           n_hooks, batch)


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


def plan_groups(runs: list[tuple[str, LanguageModelSAERunnerConfig]], base: LanguageModelSAERunnerConfig,
                data: DataPlan, log: Callable[[str], None]) -> list[list[int]]:
    """The SAEs this process trains (sweep-parallel: grid points rank, rank + N, ...), split into
    groups trained in lockstep one after the other, each within the memory free now."""
    device = pick_device(base.device)
    parallel = distributed.current()
    d_in = data.d_in
    mine = parallel.my_runs(len(runs))
    sizes = [sae_bytes(d_in, runs[i][1].sae_width(d_in), base.train_batch_size, runs[i][1].architecture,
                       data.d_out, data.n_hooks) for i in mine]
    budget = int(free_bytes(device) * MEMORY_HEADROOM) - 3 * data.loader.buffer_rows * d_in * 4
    groups = [[mine[j] for j in g] for g in groups_that_fit(sizes, max(budget, 1))] if mine else []
    if len(groups) > 1:
        log(f"the {len(runs)} SAEs need {sum(sizes) / 1e9:.1f} GB, {max(budget, 0) / 1e9:.1f} GB is free "
            f"on {device}: training them in {len(groups)} groups of {', '.join(str(len(g)) for g in groups)}")
    return groups


def train_sweep(base: LanguageModelSAERunnerConfig, sweep: dict[str, list[Any]],
                log: Callable[[str], None] = print, progress: bool = True, verify: bool = True,
                overwrite: bool = False) -> list[TrainResult]:
    """Train the grid; returns one result per SAE, in grid order. The sweep folder may not hold
    another run unless `overwrite` (see `train.run_folder`)."""
    base = with_absolute_dump(base)
    if not distributed.current().lead:
        log = lambda s: None  # noqa: E731
    runs = grid(base, sweep)
    data = plan_data(base, verify, progress=progress)
    check_shapes(runs, data.d_in, data.d_out, data.paired, data.n_hooks)  # every SAE, before any trains
    check_fits(runs, data.d_in, data.d_out, data.n_hooks, pick_device(base.device))
    root = run_folder(base, _sweep_name(base, data))
    runs = [(name, replace(cfg, checkpoint_path=str(root))) for name, cfg in runs]
    job = Job(root, base, runs, list(sweep), wandb_group=_sweep_name(base, data))
    with hold_run_folder(root, job.configs(), overwrite, log):
        return train_job(replace(job, groups=plan_groups(runs, base, data, log)), data, log, progress)


def resume_sweep(root: Path, log: Callable[[str], None] = print, progress: bool = True,
                 verify: bool = True, shards: str | None = None) -> list[TrainResult]:
    """Continue every SAE of the sweep in `root` from the newest checkpoint they all have (from the
    start if they have none: the sweep was stopped before its first checkpoint); `shards` is the
    dump's new place when it has moved since (the resume checks it is the same dump)."""
    root = Path(root).resolve()
    if not distributed.current().lead:
        log = lambda s: None  # noqa: E731
    with hold_run_folder(root, None, False, log):
        runs, keys, step, resume_from = _sweep_state(root, shards)
        log(f"resuming the sweep in {root} at step {step:,}" if resume_from else
            f"the SAEs in {root} share no checkpoint: training them from the start")
        base = runs[0][1]
        data = plan_data(base, verify, progress=progress)
        job = Job(root, base, runs, keys, resume_from, plan_groups(runs, base, data, log), _sweep_name(base, data))
        return train_job(job, data, log, progress)


def _sweep_state(root: Path, shards: str | None = None) -> tuple[list[tuple[str, LanguageModelSAERunnerConfig]], list[str], int,
                                      dict[str, Path] | None]:
    """(SAE configs, swept keys, step, checkpoint of each SAE at that step) of a sweep folder; the
    checkpoints are None (and the step 0) when the SAEs share none."""
    entries, keys = layout.read_sweep_index(root)
    configs = layout.read_sweep_configs(root)
    runs = []
    for e in entries:
        raw = configs[e.name]
        if raw is None:
            raise UserError(f"{root} was stopped before it recorded the settings of {e.name}: start the "
                            "sweep again with its original command (and --overwrite)")
        # The sweep folder may have moved since: its dump is found from the recorded path, and
        # its outputs go where it is now.
        dump = ",".join(absolute(p) for p in dump_list(shards)) if shards else (
            dump_list_for(e.run_dir, raw["shards"]) if raw.get("shards") else str(dump_path_for(e.run_dir, raw)))
        raw = raw | {"shards": dump, "checkpoint_path": str(root)}
        if raw.get("target_shards"):  # a transcoder sweep: its target dumps, found the same way
            raw["target_shards"] = dump_list_for(e.run_dir, raw["target_shards"], "--target-shards", "target dump")
        runs.append((e.name, LanguageModelSAERunnerConfig.from_dict(raw, where=str(layout.sweep_index_path(root)))))
    indexes = [{c["step"]: c["folder"] for c in layout.read_checkpoint_index(e.run_dir) if c["folder"] != layout.FINAL}
               for e in entries]
    common = set.intersection(*(set(i) for i in indexes)) if indexes else set()
    if not common:
        return runs, keys, 0, None
    step = max(common)
    return runs, keys, step, {e.name: e.run_dir / index[step] for e, index in zip(entries, indexes)}


def _sweep_name(base: LanguageModelSAERunnerConfig, data: DataPlan) -> str:
    return base.run_name or f"sweep-{data.dump.path.name}"
