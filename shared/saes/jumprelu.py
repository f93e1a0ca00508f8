"""`jumprelu`: the JumpReLU SAE with an L0 penalty (Rajamanoharan et al. 2024, "Jumping Ahead:
Improving Reconstruction Fidelity with JumpReLU Sparse Autoencoders", arXiv 2407.14435).

    h     = (x - b_dec) @ W_enc + b_enc                     h: [batch, d_sae]
    f     = h * H(h - theta)        (= relu(h) * 1[h > theta] for theta >= 0)
    x_hat = f @ W_dec + b_dec
    loss  = ||x - x_hat||^2 + l0_coefficient * sum_i H(h_i - theta_i)     (each averaged over rows)

theta = exp(log_threshold) is a trained per-feature threshold (the log keeps it positive, and makes
Adam's steps relative). The Heaviside step H has no useful derivative, so theta learns through the
paper's straight-through estimators, with a rectangle kernel rect(u) = 1[-1/2 < u < 1/2] of
width eps = `jumprelu_bandwidth` (in pre-activation units):

    d f_i / d theta_i        = -(theta_i / eps) * rect((h_i - theta_i) / eps)
    d H(h_i - theta_i)/d theta_i = -(1 / eps) * rect((h_i - theta_i) / eps)

and d f / d h = H(h - theta) (no estimator on h: the L0 term reaches the model only through theta).
Only pre-activations within eps/2 of a feature's threshold move it; the gradient on log_threshold
is theta times the above (chain rule). Decoder rows are held at unit norm (Gemma Scope's recipe).

On disk (SAELens' `jumprelu`): W_enc, b_enc, W_dec, b_dec and the raw `threshold` = exp(log_threshold).
A BatchTopK or Matryoshka SAE is saved in this form too, with one shared threshold that can be 0:
loading stores log(0) = -inf, whose exp is exactly 0, so such a folder encodes as relu(h), exactly
(trained further, such a threshold stays 0: its log-space gradient is theta times the above).
Thresholds this class saved load back exactly (`log_of_threshold`); another tool's threshold that
no float32 log reproduces is off by ~1e-7 relative, so only pre-activations that close to it
could fire differently than in SAELens.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from shared.saes.base import SAE, StepContext, TrainOutput
from shared.saes.jumprelu_settings import JumpReLUSettings


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """rect(u) = 1 on (-1/2, 1/2), else 0 (the paper's kernel), in u's dtype."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


def _per_feature_sum(grad: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """Sum a [..., d_sae] gradient over every leading dim, in float32, as threshold's dtype."""
    return grad.float().reshape(-1, grad.shape[-1]).sum(dim=0).to(threshold.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """f = h * H(h - theta); df/dh = H(h - theta), df/dtheta = -(theta/eps) rect((h - theta)/eps)."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return h * (h > threshold).to(h.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        h, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        theta = threshold.float()
        h_grad = grad_out * (h > threshold).to(grad_out.dtype)
        kernel = rectangle((h.float() - theta) / eps)
        threshold_grad = _per_feature_sum(-(theta / eps) * kernel * grad_out.float(), threshold)
        return h_grad, threshold_grad, None


class StepFunction(torch.autograd.Function):
    """H(h - theta) as float32 (sums of it are counts); dH/dtheta = -(1/eps) rect((h - theta)/eps),
    and no gradient to h."""

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(h, threshold)
        ctx.bandwidth = bandwidth
        return (h > threshold).float()

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        h, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        kernel = rectangle((h.float() - threshold.float()) / eps)
        return None, _per_feature_sum(-(1.0 / eps) * kernel * grad_out.float(), threshold), None


def log_of_threshold(threshold: torch.Tensor) -> torch.Tensor:
    """log_threshold whose exp (as `JumpReLUSAE.threshold` computes it, in float32 on this device)
    is exactly `threshold` where some float32 does that, else the nearest log.

    Thresholds <= 0 all become -inf (exp gives 0): relu(h) * 1[h > t] is relu(h) for every t <= 0.
    Exactness matters for round trips: a saved threshold exp(L) loads as L (or an equivalent), so a
    reloaded SAE fires on exactly the same inputs."""
    t = threshold.float().clamp_min(0.0)
    nearest = torch.log(t.double()).float()
    candidates, up, down = [nearest], nearest, nearest
    for _ in range(3):
        up = torch.nextafter(up, torch.full_like(up, math.inf))
        down = torch.nextafter(down, torch.full_like(down, -math.inf))
        candidates += [up, down]
    stacked = torch.stack(candidates)  # [7, d_sae], nearest first
    exact = torch.exp(stacked) == t
    pick = exact.to(torch.uint8).argmax(dim=0)  # first exact one; 0 (nearest) where none is
    return stacked.gather(0, pick[None])[0].contiguous()


class JumpReLUActivation:
    """JumpReLU on an architecture's `hidden_pre` (an SAE's, a cross-layer transcoder's): the
    learned per-feature threshold theta = exp(log_threshold) at its own learning rate, the
    inference form relu(h) * 1[h > theta], and the training loss mse + l0_coefficient * L0 with
    the straight-through estimators. Mixed in before the architecture's base class."""

    sparsity_setting, sparsity_label, sparsity_warm_up = "l0_coefficient", "L0", "l0_warm_up_steps"
    settings: JumpReLUSettings
    log_threshold: torch.nn.Parameter

    def init_threshold_(self, device: str | torch.device) -> None:
        log_init = math.log(self.settings.jumprelu_init_threshold)
        self.log_threshold = torch.nn.Parameter(torch.full((self.cfg.d_sae,), log_init, device=device))

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The threshold at its own rate (`jumprelu_threshold_lr`), the rest at `lr`."""
        rest = [p for name, p in self.named_parameters() if name != "log_threshold"]
        return [{"params": rest, "lr": lr},
                {"params": [self.log_threshold], "lr": self.settings.jumprelu_threshold_lr}]

    @property
    def threshold(self) -> torch.Tensor:
        """theta = exp(log_threshold): [d_sae], positive (0 only for a loaded threshold of 0)."""
        return torch.exp(self.log_threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, d_in] -> relu(h) * 1[h > theta]: [batch, d_sae], exactly SAELens' formula."""
        hidden_pre = self.hidden_pre(x)
        return torch.relu(hidden_pre) * (hidden_pre > self.threshold).to(hidden_pre.dtype)

    def training_losses(self, x: torch.Tensor, target: torch.Tensor, step: StepContext) -> TrainOutput:
        hidden_pre = self.hidden_pre(x)
        threshold, eps = self.threshold, self.settings.jumprelu_bandwidth
        feature_acts = JumpReLUFunction.apply(hidden_pre, threshold, eps)
        sae_out = self.decode(feature_acts)
        l0 = StepFunction.apply(hidden_pre, threshold, eps).sum(dim=-1).mean()
        coefficient = self.settings.l0_coefficient * step.sparsity_scale * step.sparsity_multiplier
        losses = {"mse": self.reconstruction_error(target, sae_out), "l0_loss": coefficient * l0}
        return TrainOutput(sae_out, feature_acts, losses, losses["mse"] + losses["l0_loss"])

    def load_inference_(self, tensors: dict[str, torch.Tensor]) -> None:
        own = {name: t for name, t in tensors.items() if name != "threshold"}
        own["log_threshold"] = log_of_threshold(tensors["threshold"])
        self.load_state_dict(own, strict=True, assign=True)


class JumpReLUSAE(JumpReLUActivation, SAE):
    architecture = "jumprelu"
    Settings = JumpReLUSettings
    b_enc: torch.nn.Parameter

    def init_extra_(self, device: str | torch.device) -> None:
        self.b_enc = torch.nn.Parameter(torch.zeros(self.cfg.d_sae, device=device))
        self.init_threshold_(device)

    def inference_form(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "W_dec": self.W_dec, "b_dec": self.b_dec,
                   "threshold": self.threshold}
        return "jumprelu", tensors, {}
