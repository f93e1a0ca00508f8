"""The training loop: dump -> shuffled loader -> SAE steps -> resampling, metrics, checkpoints."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from shared import atomic
from shared.errors import UserError
from shared.reader import Dump, open_dump
from shared.sae import SparseAutoencoder
from train.checkpoint import load_trainer_state_, read_state, save_checkpoint
from train.config import LanguageModelSAERunnerConfig
from train.loader import ActivationLoader
from train.metrics_log import MetricsLog
from train.sae_trainer import SAETrainer

B_DEC_SAMPLE_ROWS = 16384  # rows the geometric median is computed on


@dataclass
class TrainResult:
    sae: SparseAutoencoder  # in training space (see `final` for the saved, raw-input weights)
    run_dir: Path
    final: Path  # the final checkpoint folder
    trainer: SAETrainer


def pick_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def steps_for_tokens(total_tokens: int, n_rows: int, batch_size: int) -> int:
    """Steps to see `total_tokens` rows when each epoch ends with a partial batch."""
    per_epoch = math.ceil(n_rows / batch_size)
    epochs, rest = divmod(total_tokens, n_rows)
    return epochs * per_epoch + math.ceil(rest / batch_size)


def dump_identity(dump: Dump) -> dict[str, Any]:
    """What a checkpoint records about its activations (and what a resume must match)."""
    m = dump.manifest
    return {"shards": str(dump.path), "dump_fingerprint": m.config_fingerprint, "hook_point": m.hook,
            "hook_point_layer": m.layer, "model_name": m.model, "dataset_path": m.dataset,
            "context_size": m.context_size, "prepend_bos": m.prepend_bos, "skip_bos": m.skip_bos,
            "d_in_dump": m.d_in}


def open_training_dump(cfg: LanguageModelSAERunnerConfig, verify: bool) -> Dump:
    if not cfg.shards:
        raise UserError("no dump given: pass --shards DUMP_FOLDER (write one with `harvest`)")
    dump = open_dump(cfg.shards, verify=verify)
    if cfg.d_in is not None and cfg.d_in != dump.d_in:
        raise UserError(f"d_in {cfg.d_in} does not match the dump's d_in {dump.d_in} ({dump.path}); "
                        "drop d_in or pick the matching dump")
    if dump.n_rows == 0:
        raise UserError(f"{dump.path} holds no rows")
    return dump


def check_resume(state: dict[str, Any], dump: Dump, folder: Path) -> None:
    saved = state["dump"]
    ident = dump_identity(dump)
    for key, what in (("d_in_dump", "d_in"), ("hook_point", "hook"), ("dump_fingerprint", "dump")):
        if saved.get(key) != ident[key]:
            raise UserError(f"{folder} was trained on a different {what} ({saved.get(key)}) than "
                            f"{dump.path} ({ident[key]}); resume with the run's own dump")


def input_scale(cfg: LanguageModelSAERunnerConfig, dump: Dump) -> float:
    """expected_norm: scale so E||x|| = sqrt(d_in), from the manifest's statistics."""
    if cfg.normalize_activations != "expected_norm":
        return 1.0
    stats = dump.manifest.stats or {}
    mean_norm = stats.get("mean_norm") or math.sqrt(stats.get("mean_sq_norm", 0.0))
    if not mean_norm > 0:
        raise UserError(f"{dump.path}: the manifest has no activation norm statistics to normalize with")
    return math.sqrt(dump.d_in) / mean_norm


def random_rows(loader: ActivationLoader, n: int, seed: int, salt: int) -> torch.Tensor:
    """n distinct random rows of the loader's range (all of them if it holds fewer), raw."""
    rng = np.random.default_rng([seed, salt, 1])
    n = min(n, loader.n_rows)
    rows = np.sort(rng.choice(loader.n_rows, size=n, replace=False)) + loader.lo
    return loader.gather(rows)


def train(cfg: LanguageModelSAERunnerConfig, resume_from: str | Path | None = None,
          log: Callable[[str], None] = print, progress: bool = True, verify: bool = True) -> TrainResult:
    """Train one SAE from the dump `cfg.shards`; optionally continue a checkpoint."""
    device = pick_device(cfg.device)
    dump = open_training_dump(cfg, verify)
    state = None
    if resume_from is not None:
        state = read_state(Path(resume_from))
        check_resume(state, dump, Path(resume_from))
    scale = input_scale(cfg, dump)
    total_tokens = cfg.total_training_tokens or dump.n_rows
    total_steps = steps_for_tokens(total_tokens, dump.n_rows, cfg.train_batch_size)
    loader = ActivationLoader(dump, cfg.train_batch_size, cfg.seed, device,
                              buffer_rows=cfg.shuffle_buffer_rows, block_rows=cfg.shuffle_block_rows)
    trainer = SAETrainer(cfg, dump.d_in, scale, total_steps, device)
    if state is not None:
        load_trainer_state_(trainer, Path(resume_from))
    else:
        mean = torch.tensor((dump.manifest.stats or {}).get("mean", [0.0] * dump.d_in))
        trainer.init_b_dec_(mean, lambda: random_rows(loader, B_DEC_SAMPLE_ROWS, cfg.seed, 0))

    name = cfg.run_name or cfg.default_run_name(dump.d_in, dump.path.name)
    run_dir = Path(cfg.checkpoint_path or Path("data") / "runs" / name)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic.write_json(run_dir / "config.json", cfg.to_dict() | {"resolved_run_name": name})
    ident = dump_identity(dump)
    log(f"training {trainer.sae.cfg.d_in} -> {trainer.sae.cfg.d_sae} SAE on {dump.n_rows:,} rows of "
        f"{dump.path} for {total_steps:,} steps ({total_tokens:,} tokens) on {device}; run folder {run_dir}")
    metrics = MetricsLog(run_dir, name, cfg.to_dict(), cfg.log_to_wandb, cfg.wandb_project,
                         cfg.wandb_entity, resume_step=trainer.counters.step)
    checkpoints = {round(total_steps * (i + 1) / (cfg.n_checkpoints + 1)) for i in range(cfg.n_checkpoints)}
    try:
        _loop(trainer, loader, metrics, total_steps, checkpoints, run_dir, ident, scale, progress)
    except KeyboardInterrupt:
        saved = save_checkpoint(run_dir / str(trainer.counters.tokens_seen), trainer, ident)
        metrics.close()
        raise UserError(f"interrupted; state saved: continue with --resume-from {saved}") from None
    final = save_checkpoint(run_dir / "final", trainer, ident)
    metrics.close()
    log(f"final SAE: {final}")
    return TrainResult(trainer.sae, run_dir, final, trainer)


def _loop(trainer: SAETrainer, loader: ActivationLoader, metrics: MetricsLog, total_steps: int,
          checkpoints: set[int], run_dir: Path, ident: dict[str, Any], scale: float, progress: bool) -> None:
    cfg = trainer.cfg
    c = trainer.counters
    bar = tqdm(total=total_steps, initial=c.step, unit="step", disable=not progress, desc="train")
    started, tokens_at_start = time.perf_counter(), c.tokens_seen
    batches = loader.batches(start_batch=c.step)
    try:
        while c.step < total_steps:
            x = next(batches)
            if scale != 1.0:
                x = x * scale
            trainer.update(x)
            if trainer.end_of_window():
                trainer.resample_(x, lambda n, step: random_rows(loader, n, cfg.seed, step))
                metrics.density_histogram(c.step, trainer.log10_density())
                trainer.reset_window()
            if c.step % cfg.wandb_log_frequency == 0 or c.step == total_steps:
                rate = (c.tokens_seen - tokens_at_start) / max(1e-9, time.perf_counter() - started)
                row = trainer.pop_metrics() | {"tokens": c.tokens_seen, "tokens_per_s": rate}
                metrics.log(c.step, row)
                bar.set_postfix(tokens=f"{c.tokens_seen:,}", tok_s=f"{rate:,.0f}", mse=f"{row['mse']:.4g}",
                                L0=f"{row['l0']:.1f}", refresh=False)
            bar.update(1)
            if c.step in checkpoints:
                save_checkpoint(run_dir / str(c.tokens_seen), trainer, ident)
    finally:
        batches.close()
        bar.close()
