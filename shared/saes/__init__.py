"""Sparse autoencoder architectures: one file each, behind the `SAE` interface in `base`.

`ARCHITECTURES` maps the name saved in cfg.json to the class; `load_sae` rebuilds any saved SAE.
"""
from shared.saes.base import SAE, BaseSettings, SAEConfig, SAEOutput, StepContext, TrainOutput
from shared.saes.io import load_sae
from shared.saes.registry import ARCHITECTURES, architecture_class

__all__ = ["ARCHITECTURES", "SAE", "BaseSettings", "SAEConfig", "SAEOutput", "StepContext", "TrainOutput",
           "architecture_class", "load_sae"]
