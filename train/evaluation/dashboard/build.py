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
                    log: Callable[[str], None] = print, target_hook: str | None = None) -> Path:
    """Write the dashboard of `sae` over every row of `dump` to folder `out`; returns index.html.

    `model` (a TransformerBridge) gives the logit table through its unembedding; without one the
    table is left out. `tokenizer` turns token ids into text; without one ids are shown.
    `target_hook`: the hook a transcoder writes (None: the dump's own, for an SAE). Features and
    their examples are always of the input (`dump`'s rows); the decoder's rows are in the written
    hook's space, so the logit table (W_dec @ W_U) is built only when that space is the residual
    stream's width, d_model, and is otherwise left out with a note.

    Several hooks a side (`dump` a StackedDump; `target_hook` then the target hooks, comma-separated):
    a cross-layer transcoder's feature l * F + j (feature j of layer l) fires on layer l's input
    rows, and writes every MLP output from layer l on, each a write into the residual stream: its
    logit effect is the sum of its decoder rows over the layers it writes, @ W_U (the direct path
    of all its writes together). A crosscoder's decoder rows reconstruct several hooks, none of
    them a write into the residual stream that the others add to: no logit table, with a note.
    """
    from train.evaluation.run_eval import is_clt
    from train.evaluation.stacked import side_hooks, side_paths_of

    bar = tqdm(total=dump.n_rows, unit="row", desc=f"features of {name}", disable=not progress)
    with bar:
        stats = feature_stats(sae, dump, cfg, device=device, progress=bar.update)
    W_dec = sae.W_dec.detach()  # [d_sae, d_out]: directions in the space of the hook written
    m = dump.manifest
    read = ", ".join(side_hooks(dump))
    written = target_hook or read
    W_U = unembedding(model) if model is not None else None
    no_path = None
    writes = W_dec  # [d_sae, width of one write into the residual stream]
    if is_clt(sae):  # every layer's write, summed: all in the residual stream
        writes = W_dec.reshape(W_dec.shape[0], sae.n_layers, -1).sum(dim=1)
        hooks = f"cross-layer transcoder {read} -> {written}"
    elif sae.cfg.n_hooks > 1:
        hooks = f"crosscoder over {read}" if target_hook is None else f"transcoder {read} -> {written}"
        if W_U is not None:
            no_path = (f"no logit table: the decoder reconstructs {sae.cfg.n_hooks} hooks at once, not one write "
                       "into the residual stream")
            W_U = None
    else:
        hooks = m.hook if target_hook is None else f"transcoder {m.hook} -> {target_hook}"
    if W_U is not None and writes.shape[1] != W_U.shape[0]:
        no_path = (f"no logit table: the decoder writes {writes.shape[1]}-wide activations at {written}, "
                   f"not the residual stream (d_model {W_U.shape[0]})")
        W_U = None
    if progress:  # d_sae x d_sae similarities and d_sae x vocab logits: seconds on a CPU
        log(f"nearest features{' and logit table' if W_U is not None else ''} of {sae.cfg.d_sae} features ...")
    neighbours = tuple(t.cpu() for t in decoder_neighbours(W_dec, k=NEIGHBOURS))
    logits = None
    if W_U is not None:
        logits = logit_effects(writes, W_U.to(writes.device), k=LOGIT_TOKENS)
    ids = used_token_ids(stats, logits)
    text = {i: tokenizer.decode([i]) for i in ids} if tokenizer is not None else {}
    metrics = {k: evaluation[k] for k in HEADER_METRICS if evaluation and evaluation.get(k) is not None}
    inputs = DashboardInputs(
        stats=stats, neighbours=neighbours, logits=logits, token_text=text, title=f"{name}: {sae.cfg.d_sae} features",
        subtitle=f"{m.model}, {hooks}; statistics over all {dump.n_rows:,} rows of "
                 f"{', '.join(_shown(Path(q)) for q in side_paths_of(dump))}"
                 + (f"; {no_path}" if no_path else ""),
        metrics=metrics, absorption=(evaluation or {}).get("absorption_first_letter_per_letter"))
    if progress:
        log(f"writing the pages of {sae.cfg.d_sae} features to {out} ...")
    index = write_dashboard(out, inputs)
    if model is None:
        log("(without the model, the dashboard leaves out promoted and suppressed tokens)")
    elif no_path:
        log(f"({no_path}: the dashboard leaves out promoted and suppressed tokens)")
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
