"""The `run` part: where the run lives and when it checkpoints."""
from __future__ import annotations

from dataclasses import dataclass

from shared.settings import NON_NEGATIVE, setting


@dataclass
class RunPart:
    n_checkpoints: int = setting(0, NON_NEGATIVE)
    """Evenly spaced checkpoints before the final one."""
    checkpoint_path: str | None = setting(None, default_text="data/runs/<run name>")
    """Run folder."""
    run_name: str | None = setting(None, default_text="from the architecture, d_sae, its sparsity setting, "
                                                      "lr and the dump")
    """Run name."""
