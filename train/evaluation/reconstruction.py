"""Reconstruction and sparsity of an SAE over dump rows, from the stored activations alone.

Every metric of eval.json's reconstruction part is defined here, once (docs/evaluate.md has the
table; tests/test_metrics_definitions.py recomputes each by hand). With t the target row, t_hat the
reconstruction, mean(t) the mean over all evaluated rows and n the rows:

- `mse`: sum_rows ||t - t_hat||^2 / n (squared error summed over dimensions, averaged over rows);
- `explained_variance`, pooled: 1 - sum_rows ||t - t_hat||^2 / sum_rows ||t - mean(t)||^2;
- `explained_variance_per_token_mean`: mean over rows of 1 - ||t - t_hat||^2 / ||t - mean(t)||^2
  (SAELens' `explained_variance_legacy`, but centred on the mean of all evaluated rows rather than
  each batch's, so it does not depend on the batch size); rows equal to the mean are left out;
- `cosine_similarity`: mean over rows of t . t_hat / (||t|| ||t_hat||) (rows with t = 0 left
  out; t_hat = 0 counts as 0);
- `l2_norm_ratio`: mean over rows of ||t_hat|| / ||t|| (rows with t = 0 left out);
- `feature_density_hist_*`: counts of features per bin of log10(fraction of rows fired on), over
  the fixed `DENSITY_HIST_EDGES`.

Every metric is against the target: the dump itself for an SAE, or the same rows of a target dump
of the same harvest pass (a transcoder's output hook). Sums are float64 and do not depend on how
the rows are chunked.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shared.errors import UserError
from shared.progress import bar
from shared.reader import Dump
from shared.saes import SAE
from train.evaluation.rows import float_rows
from train.same_pass import check_same_pass

DENSE_THRESHOLD = 0.1
"""A feature firing on more than this fraction of rows counts as dense (it acts like a bias,
not like a sparse feature)."""
RARE_THRESHOLDS = {"1e-5": 1e-5, "1e-6": 1e-6}
"""Also reported: the fraction of features with density below each of these (rare features)."""
DENSITY_HIST_EDGES = [round(-10.0 + 0.5 * i, 1) for i in range(21)]
"""Fixed bin edges of the feature density histogram, in log10(density): -10 to 0 in steps of 0.5.
Densities below 1e-10 (but above 0) count in the first bin; features that never fired are
`feature_density_hist_never_fired`, in no bin."""


@torch.inference_mode()
def reconstruction_metrics(sae: SAE, dump: Dump, rows: tuple[int, int],
                           device: str | torch.device, chunk_rows: int = 8192,
                           target: Dump | None = None, progress: bool = False,
                           target_widths: list[int] | None = None,
                           feature_layers: int | None = None) -> dict[str, Any]:
    """Reconstruction and sparsity of `sae` (already on `device`) over dump rows [start, stop).

    The SAE reads raw activations of `dump`, as saved checkpoints expect, in float32, and is
    measured against the same rows of `target` (a dump of the same harvest pass; None: `dump`
    itself). Returns JSON-able scalars plus `density` ([d_sae] float tensor, fraction of rows
    each feature fired on), which callers pop before serializing. `progress`: a bar over the rows
    on stderr. For an SAE over several hooks (`target` a StackedDump, say): `target_widths` (the
    target's hooks' widths, in order) adds `explained_variance_per_hook` and `mse_per_hook`, each
    hook's block of the target measured alone; `feature_layers` L (a cross-layer transcoder: its
    d_sae features are L layers' blocks) adds `l0_per_layer` and `frac_dead_per_layer`.
    """
    start, stop = rows
    if not 0 <= start < stop <= dump.n_rows:
        raise UserError(f"rows [{start}, {stop}) are empty or outside the dump's {dump.n_rows} rows")
    if dump.d_in != sae.cfg.d_in:
        raise UserError(f"the SAE reads d_in={sae.cfg.d_in} but the dump {dump.path} has d_in={dump.d_in}")
    target = dump if target is None else target
    if target is not dump:
        check_same_pass([dump, target])
    if target.d_in != sae.cfg.d_out:
        raise UserError(f"the SAE writes d_out={sae.cfg.d_out} but the target dump {target.path} "
                        f"has width {target.d_in}")
    if target_widths is not None and sum(target_widths) != target.d_in:
        raise UserError(f"hook widths {target_widths} do not add up to the target's width {target.d_in}")
    if feature_layers is not None and sae.cfg.d_sae % feature_layers:
        raise UserError(f"{sae.cfg.d_sae} features do not split into {feature_layers} layers")
    device = torch.device(device)
    sums = _ReconstructionSums(target.d_in, sae.cfg.d_sae, device)
    sums.mean = _target_mean(target, start, stop, chunk_rows, device)
    with bar(stop - start, "held-out rows", "row", progress, unit_scale=True) as shown:
        for a in range(start, stop, chunk_rows):
            b = min(a + chunk_rows, stop)
            x = float_rows(dump, a, b, device)  # [chunk, d_in]
            t = x if target is dump else float_rows(target, a, b, device)  # [chunk, d_out]
            sums.add_(t, sae(x))
            shown.update(b - a)
    return sums.metrics(target_widths, feature_layers)


def _target_mean(target: Dump, start: int, stop: int, chunk_rows: int, device: torch.device) -> torch.Tensor:
    """The mean target row over rows [start, stop), float64 [d_out] (a first pass over the target
    alone, without the SAE: the per-token explained variance centres every row on it)."""
    total = torch.zeros(target.d_in, dtype=torch.float64, device=device)
    for a in range(start, stop, chunk_rows):
        total += float_rows(target, a, min(a + chunk_rows, stop), device).double().sum(0)
    return total / (stop - start)


class _ReconstructionSums:
    """float64 running sums, one pass over the rows.

    x below is the target (the input itself for an SAE). The total variance uses sums of x - c
    with c the first chunk's mean (the "shifted data"
    formula): sum||x - mean||^2 = sum||x - c||^2 - n ||mean - c||^2 stays exact when the mean is
    large compared with the spread, where the unshifted sum||x||^2 - n||mean||^2 cancels badly.
    """

    def __init__(self, d_out: int, d_sae: int, device: torch.device) -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.shift: torch.Tensor | None = None  # [d_out]
        self.sum_shifted = torch.zeros(d_out, **f64)  # sum of (x - c)
        self.sum_sq_shifted = torch.zeros(d_out, **f64)  # sum of (x - c)^2, per dimension
        self.sum_sq_err = torch.zeros(d_out, **f64)  # sum of (x - x_hat)^2, per dimension
        self.active = torch.zeros((), **f64)  # non-zero features, summed over rows
        self.fired = torch.zeros(d_sae, dtype=torch.int64, device=device)  # rows each feature fired on
        self.sum_sq_out = torch.zeros((), **f64)  # sum of ||x_hat||^2
        self.sum_dot = torch.zeros((), **f64)  # sum of x_hat . x
        self.sum_norm_ratio = torch.zeros((), **f64)  # sum of ||x_hat|| / ||x|| over rows with x != 0
        self.n_nonzero = 0
        self.mean: torch.Tensor | None = None  # [d_out]: the mean target row over all rows, if known
        self.sum_ev_per_token = torch.zeros((), **f64)  # sum of 1 - ||x - x_hat||^2 / ||x - mean||^2
        self.n_ev_per_token = 0  # rows with x != mean
        self.sum_cosine = torch.zeros((), **f64)  # sum of x . x_hat / (||x|| ||x_hat||) over rows with x != 0

    def add_(self, x: torch.Tensor, out: Any) -> None:
        """x: the target rows [rows, d_out] (an SAE's input); out: the SAE's output on the input rows
        (sae_out [rows, d_out], feature_acts [rows, d_sae])."""
        x64 = x.double()
        if self.shift is None:
            self.shift = x64.mean(0)
        centred = x64 - self.shift
        self.n += x.shape[0]
        self.sum_shifted += centred.sum(0)
        self.sum_sq_shifted += centred.pow(2).sum(0)
        out64 = out.sae_out.double()
        self.sum_sq_err += (x64 - out64).pow(2).sum(0)
        self.sum_sq_out += out64.pow(2).sum()
        self.sum_dot += (out64 * x64).sum()
        x_norm = x64.norm(dim=1)
        nonzero = x_norm > 0
        out_norm = out64.norm(dim=1)
        self.sum_norm_ratio += (out_norm[nonzero] / x_norm[nonzero]).sum()
        self.n_nonzero += int(nonzero.sum())
        row_dot = (out64 * x64).sum(1)[nonzero]
        row_norms = x_norm[nonzero] * out_norm[nonzero]
        self.sum_cosine += torch.where(row_norms > 0, row_dot / row_norms.clamp(min=1e-300), 0.0).sum()
        if self.mean is not None:
            row_err = (x64 - out64).pow(2).sum(1)
            row_var = (x64 - self.mean).pow(2).sum(1)
            varied = row_var > 0
            self.sum_ev_per_token += (1.0 - row_err[varied] / row_var[varied]).sum()
            self.n_ev_per_token += int(varied.sum())
        firing = out.feature_acts > 0  # [rows, d_sae]
        self.active += firing.sum()
        self.fired += firing.sum(0)

    def metrics(self, target_widths: list[int] | None = None, feature_layers: int | None = None) -> dict[str, Any]:
        n = self.n
        var_per_dim = self.sum_sq_shifted - self.sum_shifted.pow(2) / n  # [d_out]
        total_var = float(var_per_dim.sum())
        sq_err = float(self.sum_sq_err.sum())
        density = (self.fired.double() / n).float().cpu()  # [d_sae]
        out: dict[str, Any] = {
            "n_rows": n,
            "mse": sq_err / n,
            "explained_variance": 1.0 - sq_err / total_var if total_var > 0 else None,
            "l0": float(self.active) / n,
            "frac_dead": float((self.fired == 0).double().mean()),
            "frac_dense": float((density > DENSE_THRESHOLD).double().mean()),
        }
        if target_widths is not None:
            blocks = list(zip(var_per_dim.split(target_widths), self.sum_sq_err.split(target_widths)))
            out["explained_variance_per_hook"] = [1.0 - float(e.sum()) / float(v.sum()) if float(v.sum()) > 0
                                                  else None for v, e in blocks]
            out["mse_per_hook"] = [float(e.sum()) / n for _, e in blocks]
        if feature_layers is not None:
            fired = self.fired.reshape(feature_layers, -1)  # [L, F]
            out["l0_per_layer"] = [float(v) / n for v in fired.sum(1).double().tolist()]
            out["frac_dead_per_layer"] = (fired == 0).double().mean(1).tolist()
        out.update(self._scale_metrics())
        for name, threshold in RARE_THRESHOLDS.items():
            out[f"frac_density_below_{name}"] = float((density < threshold).double().mean())
        if self.mean is not None:
            out["explained_variance_per_token_mean"] = (float(self.sum_ev_per_token) / self.n_ev_per_token
                                                        if self.n_ev_per_token else None)
        out["cosine_similarity"] = float(self.sum_cosine) / self.n_nonzero if self.n_nonzero else None
        out.update(density_histogram(self.fired, n))
        out["density"] = density
        return out

    def _scale_metrics(self) -> dict[str, float | None]:
        """Is the reconstruction systematically too small (shrinkage, which an L1 penalty causes)?

        relative_reconstruction_bias: the gamma minimising E||x_hat / gamma - x||^2, i.e.
        E||x_hat||^2 / E[x_hat . x] (Wright & Sharkey 2024, "Addressing Feature Suppression in
        SAEs"); 1 is unbiased, below 1 shrinks. l2_norm_ratio: mean over rows of ||x_hat|| / ||x||.
        """
        dot = float(self.sum_dot)
        return {
            "relative_reconstruction_bias": float(self.sum_sq_out) / dot if dot > 0 else None,
            "l2_norm_ratio": float(self.sum_norm_ratio) / self.n_nonzero if self.n_nonzero else None,
        }


def density_histogram(fired: torch.Tensor, n_rows: int) -> dict[str, Any]:
    """eval.json's feature density histogram from each feature's firing count over `n_rows` rows:
    `feature_density_hist_edges` (DENSITY_HIST_EDGES, log10 density), `feature_density_hist_counts`
    (features per bin [e_i, e_i+1), the last bin closed; densities below 1e-10 in the first) and
    `feature_density_hist_never_fired` (features with density 0, in no bin)."""
    fired = fired.detach().cpu().double()
    live = fired[fired > 0]
    log_density = torch.log10(live / n_rows).clamp(min=DENSITY_HIST_EDGES[0]).numpy()
    counts, _ = np.histogram(log_density, bins=np.array(DENSITY_HIST_EDGES))
    return {"feature_density_hist_edges": list(DENSITY_HIST_EDGES),
            "feature_density_hist_counts": [int(c) for c in counts],
            "feature_density_hist_never_fired": int((fired == 0).sum())}
