"""Which output tokens each feature promotes and suppresses, through the direct path only.

A feature written at the hook adds W_dec[f] to the residual stream; its direct effect on the logits
is W_dec[f] @ W_U, ignoring every later layer and the final normalization's scale (which depends
on the input), with the normalization's learned weight folded into W_U. This is the "logit
weights" view of feature dashboards (Bricken et al. 2023, "Towards Monosemanticity"). A
transcoder's W_dec rows are in the space of the hook it writes (d_out wide): the same product is
its direct effect when that hook is a residual-stream write (hook_mlp_out, hook_attn_out, a
residual hook), which is what a width of d_model is taken to mean.
"""
from __future__ import annotations

from typing import Any

import torch

from shared.errors import UserError


def unembedding(model: Any) -> torch.Tensor:
    """W_U [d_model, vocab] of a TransformerBridge, with the final norm's weight folded in."""
    W_U = model.W_U.detach().float()
    norm = getattr(model, "ln_final", None)
    weight = getattr(norm, "weight", None)
    if weight is not None and weight.shape == (W_U.shape[0],):
        W_U = weight.detach().float().unsqueeze(1) * W_U
    return W_U


@torch.inference_mode()
def logit_effects(W_dec: torch.Tensor, W_U: torch.Tensor, k: int = 10,
                  chunk: int = 512) -> dict[str, torch.Tensor]:
    """The k most promoted and most suppressed tokens of every feature.

    W_dec: [d_sae, d_out] with d_out = d_model; W_U: [d_model, vocab]. Returns `top_values`/`top_tokens` (largest
    first) and `bottom_values`/`bottom_tokens` (most negative first), each [d_sae, k]. Memory stays
    [chunk, vocab].
    """
    if W_dec.shape[1] != W_U.shape[0]:
        raise UserError(f"the SAE writes d_out={W_dec.shape[1]} but the unembedding reads "
                        f"d_model={W_U.shape[0]}: no direct path to the logits from this hook")
    k = min(k, W_U.shape[1])
    W_U = W_U.to(W_dec.device, torch.float32)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in ("top_values", "top_tokens", "bottom_values", "bottom_tokens")}
    for a in range(0, W_dec.shape[0], chunk):
        logits = W_dec[a : a + chunk].float() @ W_U  # [chunk, vocab]
        top = logits.topk(k, dim=1)
        bottom = logits.topk(k, dim=1, largest=False)
        parts["top_values"].append(top.values)
        parts["top_tokens"].append(top.indices)
        parts["bottom_values"].append(bottom.values)
        parts["bottom_tokens"].append(bottom.indices)
    return {n: torch.cat(v).cpu() for n, v in parts.items()}
