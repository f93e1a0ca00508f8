"""The training configuration: typed parts (one file each) behind the seed's flat
`LanguageModelSAERunnerConfig`.

Config keys are snake_case; every `train` key is also a `train --kebab-case` flag and may appear
in a `--config` YAML/JSON file. Each field documents its unit (steps, rows or tokens). The
architectures' own settings are declared by their `Settings` dataclasses (`shared.saes`) and
listed here by `train.config.architectures`.
"""
from train.config.architectures import ArchitectureSetting, architecture_settings
from train.config.coerce import coerce
from train.config.data import NORMALIZE, DataPart
from train.config.dead_features import SAMPLING_METHODS, DeadFeaturesPart
from train.config.evaluation import EvaluationPart
from train.config.flat import GROUPS, PARTS, SWEEPABLE_GROUPS, flat_fields
from train.config.logging import LoggingPart
from train.config.optimizer import SCHEDULERS, OptimizerPart
from train.config.run import RunPart
from train.config.runner import LanguageModelSAERunnerConfig
from train.config.sae import B_DEC_INIT, MIN_D_SAE, SAEPart

__all__ = ["ArchitectureSetting", "B_DEC_INIT", "DataPart", "DeadFeaturesPart", "EvaluationPart", "GROUPS",
           "LanguageModelSAERunnerConfig", "LoggingPart", "MIN_D_SAE", "NORMALIZE", "OptimizerPart", "PARTS",
           "RunPart", "SAEPart", "SAMPLING_METHODS", "SCHEDULERS", "SWEEPABLE_GROUPS", "architecture_settings",
           "coerce", "flat_fields"]
