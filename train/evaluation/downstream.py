"""Downstream metrics: the language model's next-token loss with the SAE spliced in at its hook.

CE loss recovered is measured against zero ablation of the hook (Bricken et al. 2023, "Towards
Monosemanticity"; Gao et al. 2024, "Scaling and evaluating sparse autoencoders"), and against
mean ablation; KL is from the clean next-token distribution to the spliced one.

A transcoder is spliced in at the hook it writes (`target_hook`): in one forward pass a hook on
its input hook keeps that activation, and the target hook's activation, later in the same pass,
is replaced by the transcoder's output on it (Dunefsky et al. 2024, "Transcoders find
interpretable LLM feature circuits"). The ablations are of the target hook.

A cross-layer transcoder is spliced in at every MLP output it covers at once (the replacement
model, `replacement_ce_metrics`): in one forward pass each layer's input gives that layer's
features, and each layer's output is replaced by what the features of it and of every earlier
layer write there. The ablations replace every covered output at once.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

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
    return _ce_runs(model, tokens, patches, write, batch_size, device, baselines, progress)


def _ce_runs(model: Any, tokens: torch.Tensor, patches: dict[str, list[tuple[str, Any]]], write: Any,
             batch_size: int, device: torch.device, baselines: dict | None,
             progress: bool) -> dict[str, float | None]:
    """The clean run and the three patched ones (`patches`: "sae", "zero", "mean" -> hooks) over
    every batch of `tokens`; `write` (the hook, or hooks, patched) keys the ablations kept in
    `baselines`."""
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


@torch.inference_mode()
def replacement_ce_metrics(model: Any, clt: Any, read_hooks: Sequence[str], write_hooks: Sequence[str],
                           tokens: torch.Tensor, mean_activation: torch.Tensor, skip_bos: bool, batch_size: int,
                           device: str | torch.device, baselines: dict | None = None,
                           progress: bool = False) -> dict[str, float | None]:
    """`ce_metrics` of a cross-layer transcoder with every MLP output it covers replaced at once
    (the replacement model of Ameisen et al. 2025, without its error nodes).

    In one forward pass, layer l's input hook (`read_hooks[l]`) gives x_l, from the model as
    spliced so far (so a later layer's input sees the earlier layers' replacements), and with it
    the features f_l; layer m's output hook (`write_hooks[m]`) is replaced by `clt_outputs_at(clt,
    f, m)`. The ablations replace every output hook at once: zero, or `mean_activation` ([L *
    d_out], the target dumps' means concatenated in layer order). `skip_bos` keeps position 0's
    clean activation at every output hook.
    """
    read_hooks, write_hooks = list(read_hooks), list(write_hooks)
    L = clt.n_layers
    if len(read_hooks) != L or len(write_hooks) != L:
        raise UserError(f"a cross-layer transcoder over {L} layers needs {L} input and {L} output hooks, got "
                        f"{len(read_hooks)} and {len(write_hooks)}")
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise UserError(f"need tokens of shape [contexts, >= 2 positions], got {tuple(tokens.shape)}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    for hook in (*read_hooks, *write_hooks):
        check_hook(model, hook)
    device = torch.device(device)
    means = mean_activation.to(device, torch.float32).split(clt.d_layer_out)
    if len(means) != L or means[-1].shape[0] != clt.d_layer_out:
        raise UserError(f"the mean activation has {mean_activation.shape[0]} values where {L} output hooks of "
                        f"width {clt.d_layer_out} need {L * clt.d_layer_out}")
    patches = {
        "sae": _spliced_clt(clt, read_hooks, write_hooks, skip_bos),
        "zero": [(w, _splice(torch.zeros_like, skip_bos)) for w in write_hooks],
        "mean": [(w, _splice(lambda x, mu=mu: mu.expand_as(x).contiguous(), skip_bos))
                 for w, mu in zip(write_hooks, means)],
    }
    return _ce_runs(model, tokens, patches, tuple(write_hooks), batch_size, device, baselines, progress)


def clt_layer_features(clt: Any, x: torch.Tensor, layer: int) -> torch.Tensor:
    """f_l [..., F]: the features of layer `layer` of a cross-layer transcoder from that layer's
    input x [..., d] alone (`CrossLayerTranscoder.encode_layer`)."""
    return clt.encode_layer(x, layer)


def clt_outputs_at(clt: Any, features: Sequence[torch.Tensor], m: int) -> torch.Tensor:
    """The output at layer m given the features of layers <= m (`features[l]` = f_l [..., F]):
    sum over l <= m of f_l @ W_dec_l[:, m - l] + b_dec[m], [..., d_out] (the CLT's own tensors)."""
    d_o = clt.d_layer_out
    decoders = clt.decoders()
    out = clt.b_dec[m * d_o:(m + 1) * d_o]
    for layer in range(m + 1):
        out = out + features[layer] @ decoders[layer][:, m - layer]
    return out


def _spliced_clt(clt: Any, reads: list[str], writes: list[str], skip_bos: bool) -> list[tuple[str, Any]]:
    """Hooks splicing a cross-layer transcoder in: each read hook's features computed when it
    fires, each write hook replaced by the output of the features of its layer and those before.
    A write hook firing before its own layer's read hook is a one-line error."""
    feats: dict[int, torch.Tensor] = {}

    def keep(layer: int) -> Any:
        def hook_fn(acts: torch.Tensor, hook: Any) -> torch.Tensor:
            if layer == 0:
                feats.clear()  # a new forward pass
            feats[layer] = clt_layer_features(clt, acts.float(), layer)
            return acts
        return hook_fn

    def replace(m: int) -> Any:
        def from_features(acts: torch.Tensor) -> torch.Tensor:
            missing = [reads[layer] for layer in range(m + 1) if layer not in feats]
            if missing:
                raise UserError(f"hook '{writes[m]}' runs before '{missing[0]}' in the model's forward pass: a "
                                "cross-layer transcoder reading it cannot write there")
            if any(feats[layer].shape[:-1] != acts.shape[:-1] for layer in range(m + 1)):
                raise UserError(f"hooks {reads[:m + 1]} and '{writes[m]}' do not hold the same positions: no "
                                "cross-layer transcoder between them")
            out = clt_outputs_at(clt, [feats[layer] for layer in range(m + 1)], m)
            if m == len(writes) - 1:
                feats.clear()
            return out
        return _splice(from_features, skip_bos)

    hooks: list[tuple[str, Any]] = []
    for layer, (read, write) in enumerate(zip(reads, writes)):
        hooks += [(read, keep(layer)), (write, replace(layer))]
    return hooks


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
