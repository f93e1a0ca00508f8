"""Sparse autoencoder architectures: one file each, behind the `SAE` interface in `base`.

`ARCHITECTURES` maps the name saved in cfg.json to the class; `load_sae` rebuilds any saved SAE.
The names are imported when first used (module `__getattr__`): the registry and the settings load
without torch, the classes with it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shared.saes.base import SAE, SAEOutput, StepContext, TrainOutput
    from shared.saes.io import load_sae
    from shared.saes.registry import ARCHITECTURES, architecture_class
    from shared.saes.settings_base import BaseSettings, SAEConfig

_HOME = {"SAE": "base", "SAEOutput": "base", "StepContext": "base", "TrainOutput": "base",
         "BaseSettings": "settings_base", "SAEConfig": "settings_base", "load_sae": "io",
         "ARCHITECTURES": "registry", "architecture_class": "registry"}

__all__ = ["ARCHITECTURES", "SAE", "BaseSettings", "SAEConfig", "SAEOutput",
           "StepContext", "TrainOutput", "architecture_class", "load_sae"]


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
