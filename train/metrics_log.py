"""Metrics go to `metrics.jsonl` in the run folder always, and to wandb when asked."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from train.run_layout import metrics_path

HIST_BINS = np.linspace(-10, 0, 51)  # log10 density bins; -10 means "never fired"


def _clean(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    def __init__(self, run_dir: Path, run_name: str, config: dict[str, Any], use_wandb: bool,
                 project: str, entity: str | None, resume_step: int = 0, group: str | None = None):
        self.path = metrics_path(run_dir)
        if resume_step and self.path.exists():
            # Drop what an interrupted run logged after its last checkpoint: it is logged again.
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif self.path.exists():
            self.path.unlink()
        self._file = open(self.path, "a")
        self._wandb = None
        if use_wandb:
            import wandb

            # One wandb run per SAE; a sweep's SAEs share a group and run side by side.
            self._wandb = wandb.init(project=project, entity=entity, name=run_name, config=config,
                                     dir=str(run_dir), group=group, reinit="create_new")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        if self._wandb is not None:
            self._wandb.log({f"metrics/{k}": v for k, v in metrics.items()}, step=step)

    def density_histogram(self, step: int, log10_density: torch.Tensor) -> None:
        values = log10_density.detach().float().cpu().numpy()
        counts, _ = np.histogram(np.clip(values, HIST_BINS[0], HIST_BINS[-1]), bins=HIST_BINS)
        self._file.write(json.dumps({"step": step, "kind": "log10_feature_density_histogram",
                                     "bin_edges": HIST_BINS.round(3).tolist(),
                                     "counts": counts.tolist()}) + "\n")
        self._file.flush()
        if self._wandb is not None:
            import wandb

            self._wandb.log({"plots/log10_feature_density": wandb.Histogram(values)}, step=step)

    def close(self) -> None:
        self._file.close()
        if self._wandb is not None:
            self._wandb.finish()


class NullMetrics:
    """The metrics log of a rank that does not write (data-parallel ranks other than 0)."""

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        pass

    def density_histogram(self, step: int, log10_density: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass
