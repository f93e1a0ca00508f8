"""The evaluation API under its earlier import path (`from train.evaluate import ...`).

The code lives in `train.evaluation`, one module per kind of metric.
"""
from train.evaluation.downstream import ce_metrics
from train.evaluation.examples import format_example, load_tokenizer, top_examples
from train.evaluation.reconstruction import DENSE_THRESHOLD, RARE_THRESHOLDS, reconstruction_metrics
from train.evaluation.run_eval import EvalConfig, evaluate_checkpoint
from train.evaluation.tokens import context_tokens

__all__ = ["DENSE_THRESHOLD", "RARE_THRESHOLDS", "EvalConfig", "ce_metrics", "context_tokens",
           "evaluate_checkpoint", "format_example", "load_tokenizer", "reconstruction_metrics", "top_examples"]
