"""The seed's Python API: `language_model_sae_runner(cfg)`, `LMSparseAutoencoderSessionloader` and
the `ActivationsStore` its sessions return."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from shared.errors import DumpError, UserError
from shared.manifest import MANIFEST_NAME, read_manifest
from shared.models import default_dump_folder, load_model
from shared.reader import open_dump
from shared.run_paths import dump_path_for
from shared.sae import SparseAutoencoder, read_cfg
from shared.saes import SAE, SAEConfig, architecture_class
from train.activations_store import ActivationsStore
from train.config import LanguageModelSAERunnerConfig
from train.holdout import holdout_contexts
from train.run import pick_device, train


def _harvest_command(cfg: LanguageModelSAERunnerConfig, folder: Path) -> list[str]:
    if cfg.total_training_tokens is None:
        raise UserError("the dump is missing and total_training_tokens is unset: say how many tokens "
                        "to harvest, or pass shards= an existing dump")
    cmd = [sys.executable, "-m", "harvest", "--model", cfg.model_name, "--hook", cfg.hook_point,
           "--dataset", cfg.dataset_path, "--context-size", str(cfg.context_size),
           "--batch-size", str(cfg.store_batch_size), "--tokens", str(tokens_to_harvest(cfg)),
           "--out", str(folder), "--seed", str(cfg.seed), "--resume"]
    if cfg.device:
        cmd += ["--device", cfg.device]
    return cmd


def tokens_to_harvest(cfg: LanguageModelSAERunnerConfig) -> int:
    """total_training_tokens for training plus the contexts evaluation holds out."""
    assert cfg.total_training_tokens is not None
    n_train = -(-cfg.total_training_tokens // cfg.context_size)
    held = cfg.eval_holdout_contexts
    if held is None:  # the default depends on the dump's size: find the fixed point
        held = holdout_contexts(n_train + 1, None)
        while holdout_contexts(n_train + held, None) != held:
            held = holdout_contexts(n_train + held, None)
    return (n_train + held) * cfg.context_size


def ensure_dump(cfg: LanguageModelSAERunnerConfig) -> Path:
    """The dump this config trains on, harvested first (as a separate process) if it is missing.

    `train` never imports `harvest`: the two stages meet only through the dump on disk.
    """
    folder = Path(cfg.shards) if cfg.shards else default_dump_folder(cfg.model_name, cfg.hook_point)
    if (folder / MANIFEST_NAME).is_file():
        manifest = read_manifest(folder)
        if manifest.complete:
            return folder
    result = subprocess.run(_harvest_command(cfg, folder))
    if result.returncode != 0:
        raise DumpError(f"harvesting {folder} failed (exit code {result.returncode}); see the error above")
    return folder


def language_model_sae_runner(cfg: LanguageModelSAERunnerConfig) -> SAE:
    """Harvest the dump if needed, train the SAE, and return it (weights for raw activations)."""
    cfg.shards = str(ensure_dump(cfg))
    result = train(cfg)
    return SparseAutoencoder.load_from_pretrained(result.final, device=result.sae.W_enc.device)


class LMSparseAutoencoderSessionloader:
    """Loads what a trained SAE needs around it: its language model and its activations."""

    def __init__(self, cfg: LanguageModelSAERunnerConfig):
        self.cfg = cfg

    def load_session(self) -> tuple[Any, SAE, ActivationsStore]:
        """(model, fresh SAE of the config's architecture, the run's `ActivationsStore`), the dump
        harvested first if it is missing."""
        device = pick_device(self.cfg.device)
        dump = open_dump(ensure_dump(self.cfg))
        model = load_model(self.cfg.model_name, str(device))
        cls = architecture_class(self.cfg.architecture)
        sae = cls(SAEConfig(dump.d_in, self.cfg.sae_width(dump.d_in)), cls.settings_from(self.cfg.to_dict()),
                  device=device)
        return model, sae, ActivationsStore.for_run(dump, self.cfg.to_dict(), device)

    @classmethod
    def load_session_from_pretrained(cls, path: str | Path, device: str | None = None
                                     ) -> tuple[Any, SAE, ActivationsStore]:
        """(model, sae, the `ActivationsStore` of the run) for a checkpoint folder written by `train`:
        the store yields the batches that run trained on, in its order."""
        cfg = read_cfg(Path(path))
        dev = pick_device(device or None)
        sae = SparseAutoencoder.load_from_pretrained(path, device=dev)
        if "shards" not in cfg or "model_name" not in cfg:
            raise UserError(f"{path}/cfg.json names no dump or model: not a checkpoint of `train`")
        model = load_model(cfg["model_name"], str(dev))
        dump = open_dump(dump_path_for(Path(path), cfg))
        return model, sae, ActivationsStore.for_run(dump, cfg, dev)
