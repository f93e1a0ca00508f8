"""`topk`: the TopK SAE (Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
arXiv 2406.04093), with their AuxK loss for dead features.

    h     = (x - b_dec) @ W_enc + b_enc                 h: [batch, d_sae]
    f     = ReLU(TopK_k(h))   per row: the k largest of h kept, the rest zeroed, then ReLU
    x_hat = f @ W_dec + b_dec                           x_hat: [batch, d_in]
    loss  = ||x - x_hat||^2 + aux_loss_coefficient * ||e_hat - e||^2      (each averaged over rows)

AuxK: e = x - x_hat (detached; x in the losses is the target, the input itself for an SAE) is the
residual; e_hat = ReLU(TopK_aux_k(h restricted to the dead latents)) @ W_dec (no b_dec) is the
dead latents' best aux_k-sparse reconstruction of it, so the
gradient of this term reaches only dead latents' encoder columns and decoder rows. Dead latents
come from the trainer (`StepContext.dead_mask`); with none dead the term is 0. SAELens multiplies
the term by min(n_dead / aux_k, 1); OpenAI's code and this one do not.

The decoder rows are held at unit norm (the base class's constraint), so the sparsity is the
k itself, not a penalty: no L1 term.

Training uses the sparsity when k << d_sae (`sparse_decode`): only the encoder's forward matmul is
dense. The chosen latents are a list of (row, column) pairs; the decoder gathers just those W_dec
rows (`embedding_bag`), and the encoder's backward (`_GatheredPreacts`) computes dW_enc, db_enc and
d(x - b_dec) from those pairs alone, instead of from a [batch, d_sae] gradient. The dense path
(`sparse_decode=False`) is the plain computation through a dense f; the two give the same outputs
and gradients (tests/test_arch_topk_family.py) and `benchmarks/topk_sparse.py` times them.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from shared.saes.base import SAE, StepContext, TrainOutput, sum_sq_err
from shared.saes.topk_settings import TopKSettings

SPARSE_RATIO = 8
"""`sparse_decode=None` (auto) trains sparsely when k * SPARSE_RATIO <= d_sae."""


class Selection(NamedTuple):
    """Chosen latents of a batch as (row, column) pairs, sorted by row: bag b of `embedding_bag`
    is pairs offsets[b] .. offsets[b + 1] - 1."""

    rows: torch.Tensor  # [n] int64, non-decreasing
    cols: torch.Tensor  # [n] int64
    offsets: torch.Tensor  # [batch] int64: first pair of each row


def per_row_selection(idx: torch.Tensor) -> Selection:
    """idx: [batch, m] column indices -> m pairs per row."""
    batch, m = idx.shape
    rows = torch.arange(batch, device=idx.device).repeat_interleave(m)
    return Selection(rows, idx.reshape(-1), torch.arange(batch, device=idx.device) * m)


def selection_from_pairs(rows: torch.Tensor, cols: torch.Tensor, batch: int, d_sae: int) -> Selection:
    """Pairs in any order -> sorted by (row, column), with each row's first pair."""
    order = torch.argsort(rows * d_sae + cols)
    rows, cols = rows[order], cols[order]
    counts = torch.bincount(rows, minlength=batch)
    offsets = torch.zeros(batch, dtype=torch.long, device=rows.device)
    offsets[1:] = counts.cumsum(0)[:-1]
    return Selection(rows, cols, offsets)


class _GatheredPreacts(torch.autograd.Function):
    """h[rows, cols] where h = s @ W_enc + b_enc, differentiable in s, W_enc and b_enc.

    Forward reads the already computed dense h (no graph). Backward, with g the gradient of the n
    gathered values, touches only the chosen pairs:
        dW_enc[:, c] = sum over pairs (r, c) of g * s[r]       (a sparse [d_sae, batch] @ s)
        db_enc[c]    = sum over pairs (r, c) of g
        ds[r]        = sum over pairs (r, c) of g * W_enc[:, c] (an embedding_bag over W_enc^T)
    n * d_in work each, against batch * d_sae * d_in for the dense matmuls autograd would run.
    """

    @staticmethod
    def forward(ctx, s, W_enc, b_enc, h, rows, cols, offsets):  # type: ignore[override]
        ctx.save_for_backward(s, W_enc, rows, cols, offsets)
        return h[rows, cols].float()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        s, W_enc, rows, cols, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        batch, d_sae = s.shape[0], W_enc.shape[1]
        grad_s = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_s = F.embedding_bag(cols, W_enc.t().contiguous(), offsets, mode="sum",
                                     per_sample_weights=grad.to(W_enc.dtype)).to(s.dtype)
        if ctx.needs_input_grad[1]:
            pairs = torch.sparse_coo_tensor(torch.stack([cols, rows]), grad.to(s.dtype), (d_sae, batch),
                                            check_invariants=False)
            grad_w = torch.sparse.mm(pairs, s).t().contiguous().to(W_enc.dtype)  # [d_in, d_sae]
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(d_sae, dtype=grad.dtype, device=grad.device).index_add_(0, cols, grad)
        return grad_s, grad_w, grad_b, None, None, None, None


class TopKSAE(SAE):
    architecture = "topk"
    Settings = TopKSettings
    dead_feature_policy = "auxk"
    sparsity_setting, sparsity_label = "k", "k"
    settings: TopKSettings
    b_enc: torch.nn.Parameter

    def init_extra_(self, device: str | torch.device) -> None:
        self.b_enc = torch.nn.Parameter(torch.zeros(self.cfg.d_sae, device=device))

    # ---- inference -------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, d_in] -> f: [batch, d_sae], at most k non-zero per row."""
        h = self.hidden_pre(x)
        vals, idx = h.topk(self.settings.k, dim=-1)
        return torch.zeros_like(h).scatter_(-1, idx, torch.relu(vals))

    # ---- training --------------------------------------------------------------------------
    @property
    def sparse_decode(self) -> bool:
        """Whether training goes through the chosen latents only (see the module docstring)."""
        if self.settings.sparse_decode is not None:
            return self.settings.sparse_decode
        return self.settings.k * SPARSE_RATIO <= self.cfg.d_sae

    @property
    def aux_k(self) -> int:
        aux_k = self.settings.aux_k if self.settings.aux_k is not None else self.cfg.d_in // 2
        return max(1, min(aux_k, self.cfg.d_sae))

    def training_selection(self, h: torch.Tensor) -> Selection:
        """The latents training keeps, from the detached pre-activations h: [batch, d_sae]."""
        return per_row_selection(h.topk(self.settings.k, dim=-1).indices)

    def _gather(self, s: torch.Tensor, h: torch.Tensor, sel: Selection, sparse: bool) -> torch.Tensor:
        """Pre-activations at the selection, [n], with gradients to s, W_enc and b_enc."""
        if sparse:
            return _GatheredPreacts.apply(s, self.W_enc, self.b_enc, h.detach(), sel.rows, sel.cols, sel.offsets)
        return h[sel.rows, sel.cols]

    def _dense(self, sel: Selection, vals: torch.Tensor, batch: int) -> torch.Tensor:
        """The pairs' values as a dense [batch, d_sae] (differentiable in vals)."""
        zeros = torch.zeros(batch, self.cfg.d_sae, dtype=vals.dtype, device=vals.device)
        return zeros.index_put((sel.rows, sel.cols), vals)

    def _decode_pairs(self, sel: Selection, vals: torch.Tensor, dense: torch.Tensor | None,
                      lo: int = 0, hi: int | None = None) -> torch.Tensor:
        """sum over the pairs (r, c) with lo <= c < hi of vals * W_dec[c], per row: [batch, d_in]
        (no b_dec). Sparse: from the pairs; dense: from `dense`, the same values as [batch, d_sae]."""
        hi = self.cfg.d_sae if hi is None else hi
        if dense is not None:
            return dense[:, lo:hi] @ self.W_dec[lo:hi]
        weights = vals.to(self.W_dec.dtype)
        if lo > 0 or hi < self.cfg.d_sae:
            weights = weights * ((sel.cols >= lo) & (sel.cols < hi))
        return F.embedding_bag(sel.cols, self.W_dec, sel.offsets, mode="sum", per_sample_weights=weights)

    def training_losses(self, x: torch.Tensor, target: torch.Tensor, step: StepContext) -> TrainOutput:
        sparse = self.sparse_decode
        batch = x.shape[0]
        s = self.encoder_input(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not sparse):
            # Sparse: no graph; the gradient comes from _GatheredPreacts, at the chosen pairs only.
            h = torch.addmm(self.b_enc, s, self.W_enc)  # [batch, d_sae]
        sel = self.training_selection(h.detach())
        vals = torch.relu(self._gather(s, h, sel, sparse))  # [n]
        self._note_kept_(vals)
        dense = None if sparse else self._dense(sel, vals, batch)
        losses, sae_out = self.reconstruction_losses(target, sel, vals, dense)
        losses["auxk_loss"] = self.auxk_loss(target, sae_out, s, h, step.dead_mask, sparse)
        fired = None
        if dense is None:
            # The trainer only counts firing features in feature_acts: no graph needed, and h's
            # memory is free now (writing it beats faulting in a fresh [batch, d_sae]).
            feature_acts = h.zero_().index_put_((sel.rows, sel.cols), vals.detach().to(h.dtype))
            # Counted from the k pairs per row (weights, not a mask index: no host sync).
            fired = torch.bincount(sel.cols, weights=(vals.detach() > 0).float(), minlength=self.cfg.d_sae)
        else:
            feature_acts = dense
        return TrainOutput(sae_out, feature_acts, losses, sum(losses.values()), fired)

    def _note_kept_(self, vals: torch.Tensor) -> None:
        """Hook for running estimates over the kept activations (BatchTopK's threshold)."""

    def reconstruction_losses(self, target: torch.Tensor, sel: Selection, vals: torch.Tensor,
                              dense: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The reconstruction terms against target [batch, d_out], and x_hat [batch, d_out]."""
        sae_out = self._decode_pairs(sel, vals, dense) + self.b_dec
        return {"mse": self.reconstruction_error(target, sae_out)}, sae_out

    def auxk_loss(self, target: torch.Tensor, sae_out: torch.Tensor, s: torch.Tensor, h: torch.Tensor,
                  dead_mask: torch.Tensor | None, sparse: bool) -> torch.Tensor:
        """aux_loss_coefficient * mean over rows of ||e_hat - e||^2 (module docstring); 0 when
        nothing is dead. No host sync: a row's picks beyond the dead latents count as zero."""
        zero = torch.zeros((), device=target.device)
        if dead_mask is None:
            return zero
        dead = dead_mask.to(device=h.device, dtype=torch.bool)
        with torch.no_grad():
            idx = h.detach().masked_fill(~dead, -math.inf).topk(self.aux_k, dim=-1).indices
        sel = per_row_selection(idx)
        vals = torch.relu(self._gather(s, h, sel, sparse)) * dead[sel.cols]
        e_hat = self._decode_pairs(sel, vals, None if sparse else self._dense(sel, vals, target.shape[0]))
        residual = (target - sae_out).detach()
        return self.settings.aux_loss_coefficient * sum_sq_err(residual, e_hat) * dead.any()

    def inference_form(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec}
        return "topk", tensors, {"k": self.settings.k, "rescale_acts_by_decoder_norm": False,
                                 "activation_fn_str": "topk"}
