"""Build one SAE's dashboard: one pass over its dump, the decoder's geometry, the logit table."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from tqdm import tqdm

from shared.reader import Dump
from shared.saes import SAE
from train.evaluation.dashboard import DashboardInputs, used_token_ids, write_dashboard
from train.evaluation.feature_stats import FeatureStatsConfig, feature_stats
from train.evaluation.geometry import decoder_neighbours
from train.evaluation.logit_table import logit_effects, unembedding
from train.run_layout import read_eval

NEIGHBOURS = 6
"""Nearest features listed per feature."""
LOGIT_TOKENS = 10
"""Promoted and suppressed tokens listed per feature."""
HEADER_METRICS = ("explained_variance", "l0", "frac_dead", "ce_loss_recovered", "kl_clean_sae",
                  "relative_reconstruction_bias", "frac_near_duplicate")
"""eval.json figures shown at the top of the page, when the run has been evaluated."""


def build_dashboard(sae: SAE, dump: Dump, out: Path, *, name: str, model: Any = None, tokenizer: Any = None,
                    evaluation: dict[str, Any] | None = None, cfg: FeatureStatsConfig | None = None,
                    device: str | torch.device = "cpu", progress: bool = True,
                    log: Callable[[str], None] = print) -> Path:
    """Write the dashboard of `sae` over every row of `dump` to folder `out`; returns index.html.

    `model` (a TransformerBridge) gives the logit table through its unembedding; without one the
    table is left out. `tokenizer` turns token ids into text; without one ids are shown.
    """
    bar = tqdm(total=dump.n_rows, unit="row", desc=f"features of {name}", disable=not progress)
    with bar:
        stats = feature_stats(sae, dump, cfg, device=device, progress=bar.update)
    W_dec = sae.W_dec.detach()
    if progress:  # d_sae x d_sae similarities and d_sae x vocab logits: seconds on a CPU
        log(f"nearest features{' and logit table' if model is not None else ''} of {sae.cfg.d_sae} features ...")
    neighbours = tuple(t.cpu() for t in decoder_neighbours(W_dec, k=NEIGHBOURS))
    logits = None
    if model is not None:
        logits = logit_effects(W_dec, unembedding(model).to(W_dec.device), k=LOGIT_TOKENS)
    ids = used_token_ids(stats, logits)
    text = {i: tokenizer.decode([i]) for i in ids} if tokenizer is not None else {}
    m = dump.manifest
    metrics = {k: evaluation[k] for k in HEADER_METRICS if evaluation and evaluation.get(k) is not None}
    inputs = DashboardInputs(
        stats=stats, neighbours=neighbours, logits=logits, token_text=text, title=f"{name}: {sae.cfg.d_sae} features",
        subtitle=f"{m.model}, {m.hook}; statistics over all {dump.n_rows:,} rows of {_shown(dump.path)}",
        metrics=metrics)
    if progress:
        log(f"writing the pages of {sae.cfg.d_sae} features to {out} ...")
    index = write_dashboard(out, inputs)
    if model is None:
        log("(without the model, the dashboard leaves out promoted and suppressed tokens)")
    return index


def _shown(path: Path) -> str:
    """A path as short as it can be said: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def read_evaluation(run_folder: Path) -> dict[str, Any] | None:
    """The run's eval.json, if `evaluate` has written one (a damaged one is left out)."""
    try:
        return read_eval(run_folder)
    except (OSError, ValueError):
        return None
