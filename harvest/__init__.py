"""Stage one: run a language model over a token dataset once and write activations to disk."""
from harvest.config import HarvestConfig
from harvest.run import harvest

__all__ = ["HarvestConfig", "harvest"]
