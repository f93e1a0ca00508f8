"""The seed's names for the SAE: `SparseAutoencoder` is the `standard` architecture, and its
`load_from_pretrained` loads a saved SAE of any architecture. New code imports `shared.saes`."""
from shared.saes.base import CFG_NAME, WEIGHTS_NAME, SAEConfig, SAEOutput, read_cfg
from shared.saes.standard import StandardSAE as SparseAutoencoder

__all__ = ["CFG_NAME", "WEIGHTS_NAME", "SAEConfig", "SAEOutput", "SparseAutoencoder", "read_cfg"]
