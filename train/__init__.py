"""Stage two: train sparse autoencoders from a dump, never touching the language model."""
from shared.sae import SparseAutoencoder
from train.api import LMSparseAutoencoderSessionloader, language_model_sae_runner
from train.config import LanguageModelSAERunnerConfig
from train.run import train

__all__ = ["LanguageModelSAERunnerConfig", "LMSparseAutoencoderSessionloader", "SparseAutoencoder",
           "language_model_sae_runner", "train"]
