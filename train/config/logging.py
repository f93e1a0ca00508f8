"""The `logging` part: metrics logs and Weights & Biases."""
from __future__ import annotations

from dataclasses import dataclass

from shared.settings import POSITIVE, setting


@dataclass
class LoggingPart:
    log_to_wandb: bool = setting(False)
    """Also log to Weights & Biases (WANDB_MODE=offline works with no network)."""
    wandb_project: str = setting("mats_sae_training_language_models")
    """wandb project."""
    wandb_entity: str | None = setting(None)
    """wandb entity."""
    wandb_log_frequency: int = setting(10, POSITIVE)
    """Steps between metric logs (the only host syncs)."""
