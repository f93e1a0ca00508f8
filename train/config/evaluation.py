"""The `evaluation` part: what runs on the final SAE."""
from __future__ import annotations

from dataclasses import dataclass

from shared.settings import setting


@dataclass
class EvaluationPart:
    evaluate_at_end: bool = setting(False)
    """Run `evaluate` on the final SAE(s) (held-out rows and, with the language model, CE loss recovered)."""
