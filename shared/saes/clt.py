"""Cross-layer transcoders (Ameisen et al. 2025, "Circuit Tracing: Revealing Computational Graphs
in Language Models"): `jumprelu_clt` and `topk_clt`.

A CLT over layers 0..L-1 reads each layer's MLP input (or the residual stream before the MLP) and
writes every MLP's output. Layer l has F features of its own, read from that layer's input only,
and each of them writes into the outputs of layer l and of every later layer:

    h_l     = x_l @ W_enc[l] + b_enc[l]                        x_l: [batch, d], h_l: [batch, F]
    f_l     = JumpReLU_theta(h_l)  or  TopK_k(h_l) (k per layer)
    y_hat_m = sum over l <= m of f_l @ W_dec_l[:, m - l] + b_dec[m]        y_hat_m: [batch, d_out]
    loss    = sum over m of ||y_m - y_hat_m||^2 (the MSE of the concatenated outputs)
              + l0_coefficient * L0 (JumpReLU, over every layer's features)  or  AuxK (TopK)

The input and the target are the layers' hooks concatenated in layer order (`--shards` and
`--target-shards` each list the L dumps of one harvest pass), so x [batch, L * d], target
[batch, L * d_out], and f [batch, L * F] with feature l * F + j being feature j of layer l.

Memory: W_enc is L * d * F numbers and the decoders L (L + 1) / 2 * F * d_out (the n_layers^2 / 2
decoders of the paper), 16 bytes each in training (weights, gradients and Adam's two moments);
`training_bytes` gives the total, and training refuses up front what will not fit.

Decoders are free (not held at unit norm, as in the paper); the sparsity terms are those of the
activation function (JumpReLU's L0 with its straight-through estimators; TopK's AuxK over the dead
features of each layer). Saved as `cfg.json` + safetensors in our own form (W_enc [L, d, F],
b_enc [L, F], W_dec_l [F, L - l, d_out], b_dec [L * d_out], threshold [L * F]); circuit-tracer's
form is written from it by `shared.saes.circuit_tracer_form`.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from shared.errors import UserError
from shared.saes.base import SAE, SAEConfig, StepContext, TrainOutput, _kaiming_unit_rows, sum_sq_err
from shared.saes.clt_settings import JumpReLUCLTSettings, TopKCLTSettings
from shared.saes.jumprelu import JumpReLUActivation


class CrossLayerTranscoder(SAE):
    """What both CLTs share: the tensors, the decode into every later layer, folding and saving."""

    unit_norm_decoder = False
    transcoder_only = True
    W_enc: torch.nn.Parameter  # [L, d, F]
    b_enc: torch.nn.Parameter  # [L, F]

    # ---- shape ---------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.cfg.n_hooks

    @property
    def d_layer_in(self) -> int:
        return self.cfg.d_in // self.cfg.n_hooks

    @property
    def d_layer_out(self) -> int:
        return self.cfg.d_out // self.cfg.n_hooks

    @property
    def features_per_layer(self) -> int:
        return self.cfg.d_sae // self.cfg.n_hooks

    def check_shape(self, cfg: SAEConfig) -> None:
        if not cfg.transcoder:
            raise UserError(f"a {self.architecture} reads each layer's MLP input and writes the MLP outputs: give "
                            "the layers' output dumps as --target-shards (one per --shards dump, in layer order)")

    @staticmethod
    def training_bytes(d_in: int, d_out: int, d_sae: int, n_layers: int, batch: int) -> int:
        """Rough peak memory in training (float32): 16 bytes per parameter (weights, gradients and
        Adam's two moments), a checkpoint copy of the weights, and about six [batch, d_sae]
        activations plus the [batch, d_out] outputs of each source layer's decode."""
        L, d, F_, d_o = n_layers, d_in // n_layers, d_sae // n_layers, d_out // n_layers
        params = L * d * F_ + L * F_ + F_ * d_o * L * (L + 1) // 2 + L * d_o + L * F_
        return 20 * params + 4 * batch * (6 * d_sae + L * d_out)

    # ---- parameters ------------------------------------------------------------------------
    def init_parameters_(self, cfg: SAEConfig, device: str | torch.device) -> None:
        """Each feature's encoder column a random direction of its layer's input and each of its
        decoders a random direction of an output, all at norm decoder_init_norm (small, so the
        first outputs are small and features start near their threshold)."""
        L, d, F_, d_o = self.n_layers, self.d_layer_in, self.features_per_layer, self.d_layer_out
        norm = self.settings.decoder_init_norm
        enc = torch.stack([_kaiming_unit_rows(F_, d, device).T for _ in range(L)]) if L else None
        self.W_enc = torch.nn.Parameter((enc * norm).contiguous())
        self.b_enc = torch.nn.Parameter(torch.zeros(L, F_, device=device))
        for layer in range(L):
            rows = _kaiming_unit_rows(F_ * (L - layer), d_o, device).reshape(F_, L - layer, d_o)
            self.register_parameter(f"W_dec_{layer}", torch.nn.Parameter(rows * norm))
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_out, device=device))
        self.init_extra_(device)

    def decoders(self) -> list[torch.Tensor]:
        """[W_dec_0, ..., W_dec_{L-1}], W_dec_l: [F, L - l, d_out]."""
        return [getattr(self, f"W_dec_{layer}") for layer in range(self.n_layers)]

    @property
    def W_dec(self) -> torch.Tensor:  # type: ignore[override]
        """Each feature's decoders as one row [d_sae, L * d_out], zero into the layers before its
        own (what generic code reads: the dashboard's neighbours, the decoder norms)."""
        d_o = self.d_layer_out
        rows = [F.pad(w.reshape(w.shape[0], -1), (layer * d_o, 0)) for layer, w in enumerate(self.decoders())]
        return torch.cat(rows)

    # ---- the model -------------------------------------------------------------------------
    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., L * d] -> h [..., L * F]: each layer's features from that layer's input."""
        lead = x.shape[:-1]
        xs = x.reshape(-1, self.n_layers, self.d_layer_in)
        h = torch.einsum("nld,ldf->nlf", xs, self.W_enc) + self.b_enc
        return h.reshape(*lead, self.cfg.d_sae)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """f [..., L * F] -> y_hat [..., L * d_out]: layer l's features into layers l..L-1."""
        lead = feature_acts.shape[:-1]
        L, F_, d_o = self.n_layers, self.features_per_layer, self.d_layer_out
        f = feature_acts.reshape(-1, L, F_)
        # Each source layer adds into the slice of the layers it writes: no padded full-width
        # copy per source layer (L of them, each [n, L * d_out], forward and backward).
        out = self.b_dec.expand(f.shape[0], -1).clone()
        for layer, w in enumerate(self.decoders()):
            out[:, layer * d_o:] += f[:, layer] @ w.reshape(F_, -1)  # [n, (L - layer) * d_out]
        return out.reshape(*lead, self.cfg.d_out)

    def layer_pre(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Layer `layer`'s pre-activations from that layer's input alone: x [..., d] -> [..., F]."""
        return x @ self.W_enc[layer] + self.b_enc[layer]

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """f_l [..., F], layer `layer`'s features from its input x [..., d] alone (what `encode`
        gives for that layer: its features read only their own layer). The replacement model
        uses it, feeding each layer's input as the spliced model produces it."""
        raise NotImplementedError

    def per_layer(self, t: torch.Tensor) -> torch.Tensor:
        """[..., L * F] -> [..., L, F]."""
        return t.reshape(*t.shape[:-1], self.n_layers, self.features_per_layer)

    # ---- generic mechanics -------------------------------------------------------------------
    @torch.no_grad()
    def fold_scaling_(self, input_scale: float, target_scale: float | None = None) -> None:
        """As a transcoder's (`SAE.fold_scaling_`): W_enc' = a W_enc, W_dec_l' = W_dec_l / b,
        b_dec' = b_dec / b; the pre-activations, so the thresholds, are unchanged."""
        target_scale = input_scale if target_scale is None else target_scale
        for name, scale in (("input", input_scale), ("target", target_scale)):
            if not scale > 0:
                raise UserError(f"{name} scale to fold must be positive, got {scale}")
        self.W_enc *= input_scale
        for w in self.decoders():
            w /= target_scale
        self.b_dec /= target_scale
        self.input_scale_folded *= input_scale
        self.target_scale_folded *= target_scale

    def inference_form(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {"W_enc": self.W_enc, "b_enc": self.b_enc, "b_dec": self.b_dec}
        tensors |= {f"W_dec_{layer}": w for layer, w in enumerate(self.decoders())}
        return self.architecture, tensors, {"n_layers": self.n_layers}

    def saved_form(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        return self.inference_form()  # its own name: no SAELens class loads a CLT


class JumpReLUCLT(JumpReLUActivation, CrossLayerTranscoder):
    architecture = "jumprelu_clt"
    Settings = JumpReLUCLTSettings
    settings: JumpReLUCLTSettings

    def init_extra_(self, device: str | torch.device) -> None:
        self.init_threshold_(device)

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        h = self.layer_pre(x, layer)
        F_ = self.features_per_layer
        return torch.relu(h) * (h > self.threshold[layer * F_:(layer + 1) * F_]).to(h.dtype)

    def inference_form(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        architecture, tensors, extra = super().inference_form()
        return architecture, tensors | {"threshold": self.threshold}, extra


class TopKCLT(CrossLayerTranscoder):
    architecture = "topk_clt"
    Settings = TopKCLTSettings
    dead_feature_policy = "auxk"
    sparsity_setting, sparsity_label = "k", "k"
    settings: TopKCLTSettings

    def _keep_topk(self, h: torch.Tensor) -> torch.Tensor:
        """relu of each layer's k largest pre-activations, the rest 0: [..., L * F]."""
        per = self.per_layer(h)
        vals, idx = per.topk(self.settings.k, dim=-1)
        kept = torch.zeros_like(per).scatter(-1, idx, torch.relu(vals))
        return kept.reshape(h.shape)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._keep_topk(self.hidden_pre(x))

    def encode_layer(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        h = self.layer_pre(x, layer)
        vals, idx = h.topk(self.settings.k, dim=-1)
        return torch.zeros_like(h).scatter(-1, idx, torch.relu(vals))

    @property
    def aux_k(self) -> int:
        aux_k = self.settings.aux_k if self.settings.aux_k is not None else self.d_layer_out // 2
        return max(1, min(aux_k, self.features_per_layer))

    def training_losses(self, x: torch.Tensor, target: torch.Tensor, step: StepContext) -> TrainOutput:
        h = self.hidden_pre(x)
        feature_acts = self._keep_topk(h)
        sae_out = self.decode(feature_acts)
        losses = {"mse": self.reconstruction_error(target, sae_out),
                  "auxk_loss": self.auxk_loss(target, sae_out, h, step.dead_mask)}
        return TrainOutput(sae_out, feature_acts, losses, losses["mse"] + losses["auxk_loss"])

    def auxk_loss(self, target: torch.Tensor, sae_out: torch.Tensor, h: torch.Tensor,
                  dead_mask: torch.Tensor | None) -> torch.Tensor:
        """Gao et al.'s AuxK, per layer: the aux_k largest pre-activations among each layer's dead
        features reconstruct the residual (no b_dec); 0 when nothing is dead, no host sync."""
        zero = torch.zeros((), device=target.device)
        if dead_mask is None:
            return zero
        dead = dead_mask.to(device=h.device, dtype=torch.bool)
        masked = self.per_layer(h.masked_fill(~dead, -math.inf))
        vals, idx = masked.topk(self.aux_k, dim=-1)
        alive_pick = torch.isfinite(vals)
        vals = torch.where(alive_pick, torch.relu(vals), torch.zeros_like(vals))
        aux = torch.zeros_like(self.per_layer(h)).scatter(-1, idx, vals).reshape(h.shape)
        e_hat = self.decode(aux) - self.b_dec
        residual = (target - sae_out).detach()
        return self.settings.aux_loss_coefficient * sum_sq_err(residual, e_hat) * dead.any()

    def inference_form(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        architecture, tensors, extra = super().inference_form()
        return architecture, tensors, extra | {"k": self.settings.k}
