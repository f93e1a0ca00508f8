"""Downstream metrics: the language model's next-token loss with the SAE spliced in at its hook.

CE loss recovered is measured against zero ablation of the hook (Bricken et al. 2023, "Towards
Monosemanticity"; Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), and against
mean ablation; KL is from the clean next-token distribution to the spliced one.

A transcoder is spliced in at the hook it writes (`target_hook`): in one forward pass a hook on
its input hook keeps that activation, and the target hook's activation, later in the same pass,
is replaced by the transcoder's output on it (Dunefsky et al. 2024, "Transcoders find
interpretable LLM feature circuits"). The ablations are of the target hook.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from shared.errors import UserError
from shared.models import check_hook
from shared.progress import bar
from shared.saes import SAE


@torch.inference_mode()
def ce_metrics(model: Any, sae: SAE, hook: str, tokens: torch.Tensor,
               mean_activation: torch.Tensor, skip_bos: bool, batch_size: int,
               device: str | torch.device, baselines: dict | None = None,
               progress: bool = False, target_hook: str | None = None) -> dict[str, float | None]:
    """Next-token cross-entropy of a TransformerBridge `model` with the hook's output replaced.

    tokens: [n, T] int64; mean_activation: [d_out] (the target hook's, for a transcoder). Four
    runs per batch of contexts: clean, SAE reconstruction spliced in, zero ablation, mean
    ablation. Losses average over all predicted positions (0..T-2 predicting 1..T-1). With
    `skip_bos` position 0 keeps its clean activation in every patched run: the SAE never saw BOS
    rows, and BOS is outside what it is judged on. `target_hook` (a transcoder's output hook; None:
    `hook` itself, for an SAE): the SAE reads `hook` and its output replaces `target_hook`'s
    activation in the same forward pass, and the ablations are of `target_hook`. `baselines`, a
    dict the caller keeps across SAEs evaluated on the same tokens, saves the two ablation runs for
    every SAE after the first (a sweep pays for them once). `progress`: a bar on stderr over the
    model runs (four per batch; a run over a batch can take seconds on a CPU).
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise UserError(f"need tokens of shape [contexts, >= 2 positions], got {tuple(tokens.shape)}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    check_hook(model, hook)
    write = hook if target_hook is None else target_hook
    if write != hook:
        check_hook(model, write)
    device = torch.device(device)
    mean_activation = mean_activation.to(device, torch.float32)
    patches = {
        "sae": (_spliced_sae(sae, hook, write, skip_bos) if write != hook
                else [(hook, _splice(lambda x: sae(x.float()).sae_out, skip_bos))]),
        "zero": [(write, _splice(torch.zeros_like, skip_bos))],
        "mean": [(write, _splice(lambda x: mean_activation.expand_as(x).contiguous(), skip_bos))],
    }
    sums = {name: 0.0 for name in ("clean", "sae", "zero", "mean", "kl")}
    count = 0
    n_batches = -(-tokens.shape[0] // batch_size)
    with bar(n_batches * (1 + len(patches)), "CE with the SAE spliced in", "run", progress) as shown:
        for b in range(0, tokens.shape[0], batch_size):
            batch = tokens[b : b + batch_size].to(device)  # [batch, T]
            clean = _log_probs(model(batch))  # [batch, T-1, vocab]
            sums["clean"] += float(_nll_sum(clean, batch))
            shown.update(1)
            key = (write, b, tuple(batch.shape), int(batch.sum()))
            cached = baselines.get(key) if baselines is not None else None
            if cached is not None:
                sums["zero"] += cached["zero"]
                sums["mean"] += cached["mean"]
            for name, hooks in patches.items():
                if cached is not None and name in ("zero", "mean"):
                    shown.update(1)  # paid for by an earlier SAE
                    continue
                before = sums[name]
                logits = model.run_with_hooks(batch, fwd_hooks=hooks)
                patched = _log_probs(logits)
                sums[name] += float(_nll_sum(patched, batch))
                if name == "sae":
                    # KL(p_clean || p_sae) summed over the vocabulary, for each predicted position.
                    sums["kl"] += float((clean.exp() * (clean - patched)).sum(-1).double().sum())
                elif baselines is not None:
                    baselines.setdefault(key, {})[name] = sums[name] - before
                shown.update(1)
            count += batch.shape[0] * (batch.shape[1] - 1)
    return _ce_summary({name: total / count for name, total in sums.items()})


def _splice(patch: Any, skip_bos: bool) -> Any:
    """A hook function replacing the hook's output [batch, pos, d] by `patch(output)`."""

    def hook_fn(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        new = patch(acts)
        if new.shape != acts.shape:
            raise UserError(f"the SAE writes activations of shape {tuple(new.shape)} where hook "
                            f"'{getattr(hook, 'name', hook)}' holds {tuple(acts.shape)}")
        new = new.to(acts.dtype)
        if skip_bos:
            new = torch.cat([acts[:, :1], new[:, 1:]], dim=1)
        return new

    return hook_fn


def _spliced_sae(sae: SAE, read: str, write: str, skip_bos: bool) -> list[tuple[str, Any]]:
    """Hooks splicing a transcoder in: `read`'s activation is kept, and `write`'s (later in the same
    forward pass) replaced by the transcoder's output on it. A `write` hook that fires before
    `read` in the pass (a pair in the wrong order) is a one-line error, not a stale input."""
    seen: dict[str, torch.Tensor] = {}

    def keep(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        seen["x"] = acts.detach().clone()  # later modules must not change it before it is read
        return acts

    def from_input(acts: torch.Tensor) -> torch.Tensor:
        x = seen.pop("x", None)
        if x is None:
            raise UserError(f"hook '{write}' runs before '{read}' in the model's forward pass: a transcoder "
                            f"reading '{read}' cannot replace it")
        if x.shape[:-1] != acts.shape[:-1]:
            raise UserError(f"hooks '{read}' {tuple(x.shape)} and '{write}' {tuple(acts.shape)} do not hold "
                            "the same positions: no transcoder between them")
        return sae(x.float()).sae_out

    return [(read, keep), (write, _splice(from_input, skip_bos))]


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    """logits [batch, T, vocab] -> float32 log-probabilities of the predictions [batch, T-1, vocab]."""
    return torch.log_softmax(logits[:, :-1].float(), dim=-1)


def _nll_sum(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of tokens[:, 1:]; log_probs: [batch, T-1, vocab]."""
    target = tokens[:, 1:].unsqueeze(-1)  # [batch, T-1, 1]
    return -log_probs.gather(-1, target).double().sum()


def _ce_summary(mean: dict[str, float]) -> dict[str, float | None]:
    clean, sae, zero, ablate_mean = mean["clean"], mean["sae"], mean["zero"], mean["mean"]
    return {
        "ce_clean": clean,
        "ce_with_sae": sae,
        "ce_zero_ablation": zero,
        "ce_mean_ablation": ablate_mean,
        "ce_loss_recovered": _recovered(baseline=zero, clean=clean, patched=sae),
        "ce_loss_recovered_mean_ablation": _recovered(baseline=ablate_mean, clean=clean, patched=sae),
        "kl_clean_sae": mean["kl"],
    }


def _recovered(baseline: float, clean: float, patched: float) -> float | None:
    """(L_baseline - L_patched) / (L_baseline - L_clean); None when ablating changes nothing."""
    gap = baseline - clean
    return (baseline - patched) / gap if gap != 0 and math.isfinite(gap) else None
