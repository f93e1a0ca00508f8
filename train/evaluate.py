"""Evaluate a trained SAE on the contexts its dump held out of training.

Two kinds of metrics (explained variance pooled over rows, not averaged per token; CE loss recovered
against zero ablation, as in Bricken et al. 2023 and Gao et al. 2024):
  - reconstruction, from the stored activations alone: MSE, explained variance, L0, feature density;
  - downstream, with the language model: next-token cross-entropy with the SAE's reconstruction
    spliced in at the hook, against the clean run and zero/mean ablation of the hook.
The model needs the held-out contexts' tokens; the dump stores them row by row, and
`context_tokens` rebuilds the exact token grid harvest fed the model.

`top_examples` finds a feature's strongest rows from the dump alone (no model run), for reading.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shared.errors import DumpError, UserError
from shared.models import check_hook, load_model, resolve_model_name
from shared.reader import Dump, open_dump
from shared.sae import SparseAutoencoder, read_cfg
from train.holdout import split_rows

DENSE_THRESHOLD = 0.1
"""A feature firing on more than this fraction of rows counts as dense (it acts like a bias,
not like a sparse feature)."""
RARE_THRESHOLDS = {"1e-5": 1e-5, "1e-6": 1e-6}
"""Also reported: the fraction of features with density below each of these (rare features)."""


# ----------------------------------------------------------------------------- tokens


def context_tokens(dump: Dump, first_context: int, n_contexts: int) -> torch.Tensor:
    """Token ids of contexts [first_context, first_context + n_contexts): [n, context_size] int64.

    Rows are stored context by context, `rows_per_context` each, so the contexts' rows are one
    contiguous range. With `skip_bos` position 0 is not stored: it was the BOS token (harvest only
    skips it when it prepended one), so it is filled with `bos_token_id`.
    """
    m = dump.manifest
    if n_contexts < 1 or first_context < 0 or first_context + n_contexts > m.n_contexts:
        raise UserError(f"contexts [{first_context}, {first_context + n_contexts}) are outside the "
                        f"dump's {m.n_contexts} contexts ({dump.path})")
    first_pos = 1 if m.skip_bos else 0
    if m.rows_per_context != m.context_size - first_pos:
        raise DumpError(f"{dump.path}: {m.rows_per_context} rows per context do not cover "
                        f"{m.context_size}-token contexts; cannot rebuild its tokens")
    if m.skip_bos and m.bos_token_id is None:
        raise DumpError(f"{dump.path} skips BOS but records no bos_token_id; cannot rebuild its tokens")
    start, stop = first_context * m.rows_per_context, (first_context + n_contexts) * m.rows_per_context
    tokens = dump.column("tokens", start, stop).astype(np.int64)  # [rows]
    context = dump.column("context", start, stop).astype(np.int64)
    position = dump.column("position", start, stop).astype(np.int64)
    want_context = np.repeat(np.arange(first_context, first_context + n_contexts), m.rows_per_context)
    want_position = np.tile(np.arange(first_pos, m.context_size), n_contexts)
    if not (np.array_equal(context, want_context) and np.array_equal(position, want_position)):
        raise DumpError(f"{dump.path}: rows [{start}, {stop}) are not stored context by context; "
                        "re-harvest the dump")
    grid = np.empty((n_contexts, m.context_size), dtype=np.int64)
    grid[:, first_pos:] = tokens.reshape(n_contexts, m.rows_per_context)
    if m.skip_bos:
        grid[:, 0] = m.bos_token_id
    return torch.from_numpy(grid)


# ----------------------------------------------------------------------------- reconstruction


@torch.inference_mode()
def reconstruction_metrics(sae: SparseAutoencoder, dump: Dump, rows: tuple[int, int],
                           device: str | torch.device, chunk_rows: int = 8192) -> dict[str, Any]:
    """Reconstruction and sparsity of `sae` (already on `device`) over dump rows [start, stop).

    The SAE reads raw activations, as saved checkpoints expect, in float32. Returns JSON-able
    scalars plus `density` ([d_sae] float tensor, fraction of rows each feature fired on), which
    callers pop before serializing.
    """
    start, stop = rows
    if not 0 <= start < stop <= dump.n_rows:
        raise UserError(f"rows [{start}, {stop}) are empty or outside the dump's {dump.n_rows} rows")
    if dump.d_in != sae.cfg.d_in:
        raise UserError(f"the SAE reads d_in={sae.cfg.d_in} but the dump {dump.path} has d_in={dump.d_in}")
    device = torch.device(device)
    sums = _ReconstructionSums(dump.d_in, sae.cfg.d_sae, device)
    for a in range(start, stop, chunk_rows):
        x = dump.activations(a, min(a + chunk_rows, stop)).to(device, torch.float32)  # [chunk, d_in]
        sums.add_(x, sae(x))
    return sums.metrics()


class _ReconstructionSums:
    """float64 running sums, one pass over the rows.

    The total variance uses sums of x - c with c the first chunk's mean (the "shifted data"
    formula): sum||x - mean||^2 = sum||x - c||^2 - n ||mean - c||^2 stays exact when the mean is
    large compared with the spread, where the unshifted sum||x||^2 - n||mean||^2 cancels badly.
    """

    def __init__(self, d_in: int, d_sae: int, device: torch.device) -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.shift: torch.Tensor | None = None  # [d_in]
        self.sum_shifted = torch.zeros(d_in, **f64)  # sum of (x - c)
        self.sum_sq_shifted = torch.zeros((), **f64)  # sum of ||x - c||^2
        self.sum_sq_err = torch.zeros((), **f64)  # sum of ||x - x_hat||^2
        self.active = torch.zeros((), **f64)  # non-zero features, summed over rows
        self.fired = torch.zeros(d_sae, dtype=torch.int64, device=device)  # rows each feature fired on

    def add_(self, x: torch.Tensor, out: Any) -> None:
        """x: [rows, d_in]; out: the SAE's output on x (sae_out [rows, d_in], feature_acts [rows, d_sae])."""
        x64 = x.double()
        if self.shift is None:
            self.shift = x64.mean(0)
        centred = x64 - self.shift
        self.n += x.shape[0]
        self.sum_shifted += centred.sum(0)
        self.sum_sq_shifted += centred.pow(2).sum()
        self.sum_sq_err += (x64 - out.sae_out.double()).pow(2).sum()
        firing = out.feature_acts > 0  # [rows, d_sae]
        self.active += firing.sum()
        self.fired += firing.sum(0)

    def metrics(self) -> dict[str, Any]:
        n = self.n
        total_var = float(self.sum_sq_shifted - self.sum_shifted.pow(2).sum() / n)
        sq_err = float(self.sum_sq_err)
        density = (self.fired.double() / n).float().cpu()  # [d_sae]
        out: dict[str, Any] = {
            "n_rows": n,
            "mse": sq_err / n,
            "explained_variance": 1.0 - sq_err / total_var if total_var > 0 else None,
            "l0": float(self.active) / n,
            "frac_dead": float((self.fired == 0).double().mean()),
            "frac_dense": float((density > DENSE_THRESHOLD).double().mean()),
        }
        for name, threshold in RARE_THRESHOLDS.items():
            out[f"frac_density_below_{name}"] = float((density < threshold).double().mean())
        out["density"] = density
        return out


# ----------------------------------------------------------------------------- cross-entropy


@torch.inference_mode()
def ce_metrics(model: Any, sae: SparseAutoencoder, hook: str, tokens: torch.Tensor,
               mean_activation: torch.Tensor, skip_bos: bool, batch_size: int,
               device: str | torch.device, baselines: dict | None = None) -> dict[str, float | None]:
    """Next-token cross-entropy of a TransformerBridge `model` with the hook's output replaced.

    tokens: [n, T] int64; mean_activation: [d_in]. Four runs per batch of contexts: clean, SAE
    reconstruction spliced in, zero ablation, mean ablation. Losses average over all predicted
    positions (0..T-2 predicting 1..T-1). With `skip_bos` position 0 keeps its clean activation
    in every patched run: the SAE never saw BOS rows, and BOS is outside what it is judged on.
    `baselines`, a dict the caller keeps across SAEs evaluated on the same tokens, saves the two
    ablation runs for every SAE after the first (a sweep pays for them once).
    """
    if tokens.ndim != 2 or tokens.shape[1] < 2:
        raise UserError(f"need tokens of shape [contexts, >= 2 positions], got {tuple(tokens.shape)}")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    check_hook(model, hook)
    device = torch.device(device)
    mean_activation = mean_activation.to(device, torch.float32)
    patches = {
        "sae": lambda x: sae(x.float()).sae_out,
        "zero": torch.zeros_like,
        "mean": lambda x: mean_activation.expand_as(x).contiguous(),
    }
    sums = {name: 0.0 for name in ("clean", "sae", "zero", "mean", "kl")}
    count = 0
    for b in range(0, tokens.shape[0], batch_size):
        batch = tokens[b : b + batch_size].to(device)  # [batch, T]
        clean = _log_probs(model(batch))  # [batch, T-1, vocab]
        sums["clean"] += float(_nll_sum(clean, batch))
        key = (hook, b, tuple(batch.shape), int(batch.sum()))
        cached = baselines.get(key) if baselines is not None else None
        if cached is not None:
            sums["zero"] += cached["zero"]
            sums["mean"] += cached["mean"]
        for name, patch in patches.items():
            if cached is not None and name in ("zero", "mean"):
                continue
            before = sums[name]
            logits = model.run_with_hooks(batch, fwd_hooks=[(hook, _splice(patch, skip_bos))])
            patched = _log_probs(logits)
            sums[name] += float(_nll_sum(patched, batch))
            if name == "sae":
                # KL(p_clean || p_sae) summed over the vocabulary, for each predicted position.
                sums["kl"] += float((clean.exp() * (clean - patched)).sum(-1).double().sum())
            elif baselines is not None:
                baselines.setdefault(key, {})[name] = sums[name] - before
        count += batch.shape[0] * (batch.shape[1] - 1)
    return _ce_summary({name: total / count for name, total in sums.items()})


def _splice(patch: Any, skip_bos: bool) -> Any:
    """A hook function replacing the hook's output [batch, pos, d_in] by `patch(output)`."""

    def hook_fn(acts: torch.Tensor, hook: Any) -> torch.Tensor:
        new = patch(acts).to(acts.dtype)
        if skip_bos:
            new = torch.cat([acts[:, :1], new[:, 1:]], dim=1)
        return new

    return hook_fn


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


# ----------------------------------------------------------------------------- a checkpoint


@dataclass
class EvalConfig:
    """How to evaluate a checkpoint folder written by `train`."""

    holdout_contexts: int | None = None
    """Held-out contexts (the dump's last ones) to evaluate on [what training held out]."""
    with_model: bool = True
    """Also run the language model for the cross-entropy metrics (False: reconstruction only)."""
    batch_contexts: int = 8
    """Contexts per forward pass of the language model."""
    max_eval_contexts: int | None = 256
    """At most this many held-out contexts go through the model (None: all of them)."""
    device: str | None = None
    """Device for the SAE and the model [cuda if available, else cpu]."""

    def __post_init__(self) -> None:
        if self.holdout_contexts is not None and self.holdout_contexts < 0:
            raise UserError(f"holdout contexts must be >= 0, got {self.holdout_contexts}")
        if self.batch_contexts < 1:
            raise UserError(f"batch contexts must be at least 1, got {self.batch_contexts}")
        if self.max_eval_contexts is not None and self.max_eval_contexts < 1:
            raise UserError(f"max eval contexts must be at least 1, got {self.max_eval_contexts}")


def evaluate_checkpoint(sae_folder: Path, cfg: EvalConfig, dump_path: str | None = None,
                        model: Any = None, baselines: dict | None = None) -> dict[str, Any]:
    """Metrics of the SAE in `sae_folder` on its dump's held-out contexts, as one flat JSON-able dict.

    The dump is the one cfg.json names (`shards`) unless `dump_path` is given; `model` (a
    TransformerBridge) saves loading the model the dump was harvested from.
    """
    sae_folder = Path(sae_folder)
    sae_cfg = read_cfg(sae_folder)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dump = _open_eval_dump(sae_folder, sae_cfg, dump_path)
    requested = cfg.holdout_contexts
    if requested is None:  # what training held out (absent from older checkpoints: the default)
        requested = sae_cfg.get("eval_holdout_contexts")
    rows = _heldout_rows(dump, requested)
    n_heldout = (rows[1] - rows[0]) // dump.manifest.rows_per_context
    sae = SparseAutoencoder.load_from_pretrained(sae_folder, device=device)
    out: dict[str, Any] = {"sae": str(sae_folder), "dump": str(dump.path), "hook": dump.manifest.hook,
                           "n_eval_contexts": n_heldout}
    metrics = reconstruction_metrics(sae, dump, rows, device)
    metrics.pop("density")
    out.update(metrics)
    if cfg.with_model:
        out.update(_ce_on_heldout(sae, dump, n_heldout, cfg, device, model, baselines))
    return out


def _open_eval_dump(sae_folder: Path, sae_cfg: dict[str, Any], dump_path: str | None) -> Dump:
    path = dump_path or sae_cfg.get("shards")
    if not path:
        raise UserError(f"{sae_folder}/cfg.json names no dump (`shards`); pass the dump folder")
    dump = open_dump(path)
    if dump.d_in != sae_cfg["d_in"]:
        raise UserError(f"the SAE reads d_in={sae_cfg['d_in']} but the dump {dump.path} has d_in={dump.d_in}")
    hook = sae_cfg.get("hook_name")
    if hook is not None and hook != dump.manifest.hook:
        raise UserError(f"the SAE was trained on hook '{hook}' but the dump {dump.path} holds "
                        f"'{dump.manifest.hook}'")
    return dump


def _heldout_rows(dump: Dump, requested: int | None) -> tuple[int, int]:
    try:
        _, rows = split_rows(dump, requested)
    except ValueError as e:
        raise UserError(f"{e} of {dump.path}; pass fewer --holdout-contexts") from None
    if rows[0] == rows[1]:
        raise UserError(f"no contexts of {dump.path} are held out of training: train with a holdout "
                        "(--eval-holdout-contexts) or pass --holdout-contexts")
    return rows


def _ce_on_heldout(sae: SparseAutoencoder, dump: Dump, n_heldout: int, cfg: EvalConfig,
                   device: torch.device, model: Any, baselines: dict | None = None) -> dict[str, Any]:
    """CE metrics on the first `max_eval_contexts` held-out contexts."""
    m = dump.manifest
    if model is None:
        model = load_model(m.model, str(device))
    if m.stats is None:
        raise DumpError(f"{dump.path}/manifest.json has no stats (mean activation); re-harvest the dump")
    n = n_heldout if cfg.max_eval_contexts is None else min(n_heldout, cfg.max_eval_contexts)
    tokens = context_tokens(dump, m.n_contexts - n_heldout, n)
    mean = torch.tensor(m.stats["mean"], dtype=torch.float32)
    ce = ce_metrics(model, sae, m.hook, tokens, mean, m.skip_bos, cfg.batch_contexts, device, baselines)
    return {"n_ce_contexts": n, **ce}


# ----------------------------------------------------------------------------- feature examples


@torch.inference_mode()
def top_examples(sae: SparseAutoencoder, dump: Dump, features: list[int], n: int,
                 rows: tuple[int, int] | None = None, device: str | torch.device = "cpu",
                 chunk_rows: int = 8192) -> dict[int, list[dict[str, Any]]]:
    """The `n` rows where each feature fires hardest, strongest first, from the dump alone.

    A running top-n per feature is kept across chunks, so memory stays [n + chunk_rows, features].
    Rows where a feature does not fire are never examples: a rare feature may get fewer than n.
    """
    start, stop = rows if rows is not None else (0, dump.n_rows)
    if not 0 <= start < stop <= dump.n_rows:
        raise UserError(f"rows [{start}, {stop}) are empty or outside the dump's {dump.n_rows} rows")
    bad = [f for f in features if not 0 <= f < sae.cfg.d_sae]
    if bad or not features:
        raise UserError(f"features must be a non-empty list in [0, {sae.cfg.d_sae}), got {bad or features}")
    if n < 1:
        raise UserError(f"number of examples must be at least 1, got {n}")
    device = torch.device(device)
    index = torch.tensor(features, device=device)
    best = torch.empty(0, len(features), device=device)  # [<= n, features] activations
    best_rows = torch.empty(0, len(features), dtype=torch.int64, device=device)
    for a in range(start, stop, chunk_rows):
        b = min(a + chunk_rows, stop)
        acts = sae.encode(dump.activations(a, b).to(device, torch.float32))[:, index]  # [chunk, features]
        ids = torch.arange(a, b, device=device).unsqueeze(1).expand_as(acts)
        best = torch.cat([best, acts])
        best_rows = torch.cat([best_rows, ids])
        best, order = best.topk(min(n, best.shape[0]), dim=0)
        best_rows = best_rows.gather(0, order)
    return _examples(dump, features, best.cpu(), best_rows.cpu())


def _examples(dump: Dump, features: list[int], best: torch.Tensor,
              best_rows: torch.Tensor) -> dict[int, list[dict[str, Any]]]:
    """best, best_rows: [n, features], strongest first -> one dict per firing row."""
    contexts: dict[int, list[int]] = {}
    out: dict[int, list[dict[str, Any]]] = {}
    for j, feature in enumerate(features):
        out[feature] = []
        for value, row in zip(best[:, j].tolist(), best_rows[:, j].tolist()):
            if value <= 0:
                break
            context = int(dump.column("context", row, row + 1)[0])
            position = int(dump.column("position", row, row + 1)[0])
            if context not in contexts:
                contexts[context] = context_tokens(dump, context, 1)[0].tolist()
            out[feature].append({"activation": value, "row": row, "context": context, "position": position,
                                 "tokens": contexts[context], "ids_marked": position})
    return out


def format_example(example: dict[str, Any], tokenizer: Any = None, window: int = 10) -> str:
    """One line of text: `window` tokens either side of the firing token, which is shown [[so]].

    Each token is decoded alone, so the firing one can be marked; newlines are escaped to keep
    one example per line. Without a tokenizer the token ids are shown.
    """
    tokens, i = example["tokens"], example["ids_marked"]
    lo, hi = max(0, i - window), min(len(tokens), i + window + 1)
    if tokenizer is None:
        pieces, sep = [str(t) for t in tokens[lo:hi]], " "
    else:
        pieces, sep = [tokenizer.decode([t]).replace("\n", "\\n") for t in tokens[lo:hi]], ""
    pieces[i - lo] = f"[[{pieces[i - lo]}]]"
    return sep.join(pieces)


def load_tokenizer(model_name: str) -> Any:
    """The tokenizer of `model_name` (alias, local folder or hub repo), or None if it cannot be
    loaded (e.g. offline with nothing cached): examples then show token ids."""
    try:
        from transformers import AutoTokenizer

        _, target = resolve_model_name(model_name)
        return AutoTokenizer.from_pretrained(target)
    except Exception:  # hub, network and format errors come in many types
        return None
