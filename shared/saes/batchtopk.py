"""`batchtopk`: the BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders",
arXiv 2412.06410); saved, and used at inference, as a JumpReLU SAE.

Training keeps the k * batch largest activations of the whole batch instead of k per row:

    h     = (x - b_dec) @ W_enc + b_enc                  h: [batch, d_sae]
    f     = ReLU(h) where it is among the k * batch largest of ReLU(h) over the batch, else 0
    x_hat = f @ W_dec + b_dec;   loss = ||x - x_hat||^2 + AuxK (as TopK)

so a row may use more or fewer than k latents, k on average. Inference must not depend on the
batch: a feature fires where h exceeds a single threshold theta,

    f = ReLU(h) * (h > theta)                            (SAELens' JumpReLU encode)

theta is a running estimate of the smallest activation training keeps: after each step,
theta <- (1 - lr) theta + lr * m, with m the batch's minimum positive kept activation and
lr = `topk_threshold_lr` (SAELens' rule). SAELens starts theta at 0, so a checkpoint taken in the
first few hundred steps has a threshold far too low; here the first update sets theta = m (theta
is 0 only before the first batch with a positive kept activation; a batch without one leaves it
unchanged). It is the buffer `threshold` (saved with checkpoints, so a resume continues it).

That running average lags: the activations grow through training faster than a 1% average of
batch minima follows, so the saved JumpReLU fired about 3x k per row after 96 steps on a real dump
(SAELens' too). So the threshold that is saved (and that `encode` uses once set) is estimated from
data instead: before every save the trainer passes `threshold_sample_rows` training rows (drawn
seeded by the step, so a resume draws the same) to `calibrate_inference_`, which picks the
threshold BatchTopK's own selection implies on them: with v_j the j-th largest relu(h) over the
n rows, theta = (v_{k n} + v_{k n + 1}) / 2, so exactly the k n largest fire and the mean L0 on
those rows is k. It is no buffer and no training step reads it (a step clears it), so training
and its resume are unchanged. Without a calibration (`SAE.save` called directly,
`threshold_sample_rows` 0) the running threshold is saved, as SAELens does; cfg.json says which
(`threshold_calibrated_rows`: the rows used, 0 for the running one; `threshold_running`: the
running value either way).
"""
from __future__ import annotations

import math
from typing import Any

import torch

from shared.saes.base import TrainOutput
from shared.saes.batchtopk_settings import BatchTopKSettings
from shared.saes.topk import Selection, TopKSAE, selection_from_pairs

CALIBRATION_CHUNK_ROWS = 512
"""Rows per pre-activation block in `calibrate_inference_` (bounds its memory to 512 x d_sae)."""

CANDIDATES_PER_K = 4
"""CPU: the batch's top k * batch are picked among each row's top CANDIDATES_PER_K * k (a row
keeping all of its candidates falls back to the whole batch): 3.7x faster than one top-k over
batch * d_sae values at batch 4096, d_sae 16384, k 32 on 2 cores."""


def batch_topk_selection(acts: torch.Tensor, n_keep: int) -> Selection:
    """The n_keep largest entries of acts [batch, d_sae] (non-negative), as pairs sorted by row."""
    batch, d_sae = acts.shape
    n_keep = min(n_keep, batch * d_sae)
    m = min(d_sae, CANDIDATES_PER_K * math.ceil(n_keep / batch))
    if acts.device.type == "cpu" and m < d_sae:
        # Exact unless some row keeps all m of its candidates (then its next value might belong
        # too). Checking that is a host sync, which is free on the CPU only.
        cand_vals, cand_idx = acts.topk(m, dim=-1)  # [batch, m]
        top = cand_vals.reshape(-1).topk(n_keep, sorted=False).indices
        rows = top // m
        if int(torch.bincount(rows, minlength=batch).max()) < m:
            return selection_from_pairs(rows, cand_idx.reshape(-1)[top], batch, d_sae)
    top = acts.reshape(-1).topk(n_keep, sorted=False).indices
    return selection_from_pairs(top // d_sae, top % d_sae, batch, d_sae)


class BatchTopKSAE(TopKSAE):
    architecture = "batchtopk"
    Settings = BatchTopKSettings
    batch_wide_selection = True
    settings: BatchTopKSettings
    threshold: torch.Tensor

    def init_extra_(self, device: str | torch.device) -> None:
        super().init_extra_(device)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float32, device=device))
        self._kept_min: torch.Tensor | None = None
        """Minimum positive activation the latest training_forward kept (inf if none), for the
        update after the step (cheaper than searching the dense feature_acts for it)."""
        self._calibrated: tuple[torch.Tensor, int] | None = None
        """(threshold, rows it was estimated from) of the latest `calibrate_inference_`, until the
        next step; not a buffer (training and its resume never see it)."""

    @property
    def inference_threshold(self) -> torch.Tensor:
        """The threshold `encode` and the saved form use: the calibrated one if set, else the
        running `threshold`. 0-dim."""
        return self._calibrated[0] if self._calibrated is not None else self.threshold

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, d_in] -> f: [batch, d_sae]; JumpReLU at the inference threshold (per-row,
        unlike training)."""
        h = self.hidden_pre(x)
        return torch.relu(h) * (h > self.inference_threshold)

    @property
    def calibration_rows(self) -> int:
        return self.settings.threshold_sample_rows

    @torch.no_grad()
    def calibrate_inference_(self, x: torch.Tensor) -> None:
        """Set the inference threshold to BatchTopK's selection on rows x [n, d_in] (training
        space): midway between the (k n)-th and (k n + 1)-th largest relu(h), 0 if fewer than
        k n + 1 are positive (then every positive one fires). Exact: the k n + 1 largest are
        kept across blocks of `CALIBRATION_CHUNK_ROWS` rows."""
        n = x.shape[0]
        if n == 0:
            return
        n_keep = self.settings.k * n
        top = x.new_empty(0, dtype=torch.float32)
        for chunk in x.split(CALIBRATION_CHUNK_ROWS):
            vals = torch.cat([top, torch.relu(self.hidden_pre(chunk).float()).reshape(-1)])
            top = vals.topk(min(n_keep + 1, vals.numel()), sorted=False).values
        theta = torch.zeros((), dtype=torch.float32, device=x.device)
        if top.numel() > n_keep:
            below, at = top.topk(2, largest=False).values  # v_{kn+1} <= v_{kn}
            if at > 0:
                theta = (below + at) / 2
        self._calibrated = (theta.to(self.threshold.device), n)

    def training_selection(self, h: torch.Tensor) -> Selection:
        return batch_topk_selection(torch.relu(h), self.settings.k * h.shape[0])

    def _note_kept_(self, vals: torch.Tensor) -> None:
        with torch.no_grad():
            kept = vals.detach().float()
            self._kept_min = torch.where(kept > 0, kept, math.inf).amin()

    @torch.no_grad()
    def after_optimizer_step_(self, out: TrainOutput) -> None:
        super().after_optimizer_step_(out)
        self.update_threshold_()
        self._calibrated = None  # estimated from weights this step changed

    @torch.no_grad()
    def update_threshold_(self) -> None:
        """theta <- (1 - lr) theta + lr * (minimum positive kept activation); theta <- that
        minimum on the first update; unchanged if the batch kept nothing positive. No host sync."""
        batch_min, self._kept_min = self._kept_min, None
        if batch_min is None:  # no training_forward since the last update: nothing to learn from
            return
        lr = self.settings.topk_threshold_lr
        theta = self.threshold
        updated = torch.where(theta > 0, (1 - lr) * theta + lr * batch_min, batch_min)
        self.threshold.copy_(torch.where(torch.isfinite(batch_min), updated, theta))

    def inference_form(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        """SAELens loads a BatchTopK SAE as JumpReLU, the inference threshold repeated per feature;
        cfg.json records how it was set."""
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec,
                   "threshold": self.inference_threshold.expand(self.cfg.d_sae)}
        rows = self._calibrated[1] if self._calibrated is not None else 0
        return "jumprelu", tensors, {"threshold_calibrated_rows": rows}

    def _cfg_for_saving(self, cfg_dict: dict[str, Any], architecture: str, extra: dict[str, Any]) -> dict[str, Any]:
        """+ `threshold_running`: the running estimate, beside the calibrated one in the weights."""
        cfg = super()._cfg_for_saving(cfg_dict, architecture, extra)
        return {**cfg, "threshold_running": float(self.threshold)}
