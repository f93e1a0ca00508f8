"""The `evaluate` command under its earlier import path; it lives in `train.evaluation.cli`."""
from train.evaluation.cli import main

__all__ = ["main"]
