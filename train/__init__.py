"""Stage two: train sparse autoencoders from a dump, never touching the language model.

The seed's names are imported when first used (module `__getattr__`), so that `python -m train
--help` and `import train.cli` do not import torch.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.sae import SparseAutoencoder
    from train.api import ActivationsStore, LMSparseAutoencoderSessionloader, language_model_sae_runner
    from train.config import LanguageModelSAERunnerConfig
    from train.run import train

_HOME = {"ActivationsStore": "train.api", "LanguageModelSAERunnerConfig": "train.config",
         "LMSparseAutoencoderSessionloader": "train.api", "SparseAutoencoder": "shared.sae",
         "language_model_sae_runner": "train.api", "train": "train.run"}

__all__ = ["ActivationsStore", "LMSparseAutoencoderSessionloader", "LanguageModelSAERunnerConfig",
           "SparseAutoencoder", "language_model_sae_runner", "train"]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
