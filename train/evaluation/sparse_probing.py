"""Sparse probing: how well k of the SAE's features, chosen per task, classify a binary property,
against a probe on the raw activations (Gurnee et al. 2023, "Finding Neurons in a Haystack";
SAEBench's sparse probing).

The exact variant computed here:

- Inputs: the dump's held-out rows (those `evaluate` measures), one example per row (token-level,
  no pooling over a context). Rows whose token is one of the tokenizer's special tokens (BOS, ...)
  are left out of every task.
- Tasks: binary properties of the row's token, computed offline from the tokenizer's own token
  strings (`TASKS`; the body is the token decoded alone, stripped of whitespace):
  `word_start` (the raw token starts with a leading-space marker, GPT-2's `Ġ` or SentencePiece's
  `▁`, or decodes with a leading space), `capitalised` (the body is alphabetic and starts upper
  case), `punctuation` (the body is non-empty and every character is Unicode punctuation),
  `short_word` (the body is 1 or 2 letters). Negatives are every other non-special token.
  Position-based tasks are left out (trivial), and so are document sources (dumps do not record them).
- Split: held-out contexts are split at random (seed 0) into train (80%) and test (20%), so no
  context has rows on both sides. Each side is then balanced by subsampling: as many negatives as
  positives (the smaller class), at most `max_train_per_class` (`max_test_per_class`) a class.
  A task with fewer than `MIN_TRAIN_PER_CLASS` (`MIN_TEST_PER_CLASS`) rows of a class is skipped
  (and is a UserError when asked for by name).
- Probes: logistic regression (weights and bias) in torch, full batch, L-BFGS (strong Wolfe line
  search, `PROBE_STEPS` iterations), mean binary cross-entropy + `L2` * ||w||^2, on inputs
  standardised with the train side's mean and standard deviation (a constant input stays 0).
  Accuracy is on the test side, threshold 0 on the logit.
- Raw baseline: that probe on the raw activations (all d_in dimensions).
- SAE: features = sae.encode(x) of the raw activations; for each k in `KS` the k features with the
  largest |mean over train positives - mean over train negatives| (SAEBench's selection by the
  difference of class means, taken in absolute value here) are chosen, and the probe is fitted
  on those k alone. k above d_sae is capped at d_sae.

eval.json gets, averaged over the tasks probed: `sparse_probing_raw_accuracy`,
`sparse_probing_top_{k}_accuracy` and `sparse_probing_top_{k}_relative` (accuracy / the raw probe's,
per task, then averaged), plus `sparse_probing` (per task: sizes, accuracies, chosen features) and
`sparse_probing_skipped` (task -> why).
"""
from __future__ import annotations

import unicodedata
from typing import Any, Callable

import numpy as np
import torch

from shared.errors import UserError
from shared.progress import bar
from shared.reader import Dump
from shared.saes import SAE
from train.evaluation.rows import float_rows

KS = (1, 2, 5, 20)
"""Numbers of SAE features a sparse probe may use."""
TEST_FRACTION = 0.2
"""Fraction of the held-out contexts whose rows are the test side."""
MIN_TRAIN_PER_CLASS, MIN_TEST_PER_CLASS = 10, 5
"""Fewest rows of either class on each side for a task to be probed."""
L2 = 1e-3
"""L2 penalty on the probe's weights (not its bias), added to the mean cross-entropy."""
PROBE_STEPS = 100
"""L-BFGS iterations of each probe."""
SEED = 0
MARKERS = ("Ġ", "▁")
"""Leading-space markers in raw token strings: byte-level BPE (GPT-2) and SentencePiece."""


def _word_start(raw: str, text: str) -> bool:
    return raw.startswith(MARKERS) or text.startswith(" ")


def _capitalised(raw: str, text: str) -> bool:
    body = text.strip()
    return body.isalpha() and body[0].isupper()


def _punctuation(raw: str, text: str) -> bool:
    body = text.strip()
    return bool(body) and all(unicodedata.category(c).startswith("P") for c in body)


def _short_word(raw: str, text: str) -> bool:
    body = text.strip()
    return body.isalpha() and len(body) <= 2


TASKS: dict[str, Callable[[str, str], bool]] = {
    "word_start": _word_start, "capitalised": _capitalised, "punctuation": _punctuation, "short_word": _short_word}
"""Task name -> label of a token from (its raw token string, its text decoded alone)."""


def vocab_labels(tokenizer: Any, tasks: list[str], vocab_size: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """({task: bool [vocab_size] label of each token id}, bool [vocab_size] special tokens)."""
    ids = list(range(min(vocab_size, len(tokenizer))))
    raws = tokenizer.convert_ids_to_tokens(ids) + [""] * (vocab_size - len(ids))
    texts = tokenizer.batch_decode([[i] for i in ids]) + [""] * (vocab_size - len(ids))
    special = np.zeros(vocab_size, dtype=bool)
    special[len(ids):] = True  # ids past the tokenizer (a model's padded vocabulary): no string to label
    for i in getattr(tokenizer, "all_special_ids", []) or []:
        if 0 <= i < vocab_size:
            special[i] = True
    labels = {t: np.array([TASKS[t](r or "", s or "") for r, s in zip(raws, texts)], dtype=bool) for t in tasks}
    return labels, special


def split_by_context(contexts: np.ndarray, test_fraction: float = TEST_FRACTION, seed: int = SEED) -> np.ndarray:
    """bool [rows]: whether each row is on the test side; whole contexts go to one side (at least
    one context to each when there are two or more)."""
    unique = np.unique(contexts)
    order = np.random.default_rng(seed).permutation(unique)
    n_test = int(round(len(unique) * test_fraction))
    if len(unique) >= 2:
        n_test = min(max(n_test, 1), len(unique) - 1)
    return np.isin(contexts, order[:n_test])


def balanced_sample(labels: np.ndarray, candidates: np.ndarray, max_per_class: int,
                    rng: np.random.Generator) -> np.ndarray:
    """Indices (sorted) of as many positive as negative rows among `candidates` (bool mask): the
    smaller class's count, at most `max_per_class`, drawn without replacement."""
    pos = np.flatnonzero(candidates & labels)
    neg = np.flatnonzero(candidates & ~labels)
    n = min(len(pos), len(neg), max_per_class)
    return np.sort(np.concatenate([rng.choice(pos, n, replace=False), rng.choice(neg, n, replace=False)]))


def probe_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                   l2: float = L2, steps: int = PROBE_STEPS) -> float:
    """Test accuracy of a logistic regression fitted on standardised train inputs (the module's
    docstring has the variant)."""
    x_train, x_test = x_train.double(), x_test.double()
    mean, std = x_train.mean(0), x_train.std(0, unbiased=False)
    std = torch.where(std > 1e-12, std, torch.ones_like(std))
    a, b = (x_train - mean) / std, (x_test - mean) / std
    y = y_train.double()
    w = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device, requires_grad=True)
    c = torch.zeros((), dtype=torch.float64, device=a.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(a @ w + c, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float(((b @ w + c > 0) == y_test.bool()).double().mean())


def top_k_by_mean_diff(f_train: torch.Tensor, y_train: torch.Tensor, k: int) -> torch.Tensor:
    """The k features (largest first) with the largest |mean over positives - mean over negatives|."""
    y = y_train.bool()
    diff = (f_train[y].double().mean(0) - f_train[~y].double().mean(0)).abs()
    return torch.topk(diff, min(k, f_train.shape[1])).indices


@torch.no_grad()
def encode(sae: SAE, x: torch.Tensor, chunk_rows: int = 8192) -> torch.Tensor:
    return torch.cat([sae.encode(x[i:i + chunk_rows]).float() for i in range(0, len(x), chunk_rows)])


def sparse_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 sae: SAE | None, ks: tuple[int, ...] = KS, features: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> dict[str, Any]:
    """One task: the raw probe on activations `x_*` and, for each k, the k-sparse probe on the SAE's
    features (sae.encode(x_*), or `features` given as (train, test) directly) chosen by mean difference."""
    out: dict[str, Any] = {"n_train": len(y_train), "n_test": len(y_test)}
    if x_train is not None:
        out["raw_accuracy"] = probe_accuracy(x_train, y_train, x_test, y_test)
    f_train, f_test = features if features is not None else (encode(sae, x_train), encode(sae, x_test))
    out["sae_accuracy"], out["sae_features"] = {}, {}
    for k in ks:
        chosen = top_k_by_mean_diff(f_train, y_train, k)
        out["sae_accuracy"][str(k)] = probe_accuracy(f_train[:, chosen], y_train, f_test[:, chosen], y_test)
        out["sae_features"][str(k)] = [int(i) for i in chosen]
    if "raw_accuracy" in out:
        out["sae_relative"] = {k: (a / out["raw_accuracy"] if out["raw_accuracy"] > 0 else None)
                               for k, a in out["sae_accuracy"].items()}
    return out


def sparse_probing_metrics(sae: SAE, dump: Dump, rows: tuple[int, int], tokenizer: Any,
                           device: str | torch.device, tasks: list[str] | None = None, ks: tuple[int, ...] = KS,
                           max_train_per_class: int = 2000, max_test_per_class: int = 500,
                           chunk_rows: int = 8192, progress: bool = False) -> dict[str, Any]:
    """eval.json's sparse probing keys for `sae` on dump rows [start, stop) (the module docstring has
    the method). `tasks` None: every task of `TASKS`, those with too few rows skipped; named tasks
    with too few rows are a UserError, as is no task left to probe."""
    if tokenizer is None:
        raise UserError("sparse probing needs the dump's tokenizer (labels come from its token strings), "
                        "and none could be loaded offline")
    named = tasks is not None
    tasks = list(TASKS) if tasks is None else list(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown or not tasks:
        raise UserError(f"unknown sparse probing task(s) {unknown or tasks}: choose from {', '.join(TASKS)}")
    start, stop = rows
    tokens = dump.column("tokens", start, stop).astype(np.int64)
    contexts = dump.column("context", start, stop).astype(np.int64)
    vocab = max(int(tokens.max()) + 1 if len(tokens) else 0, len(tokenizer))
    labels_of, special = vocab_labels(tokenizer, tasks, vocab)
    keep = ~special[tokens]
    is_test = split_by_context(contexts)
    rng = np.random.default_rng(SEED)
    chosen: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    skipped: dict[str, str] = {}
    for task in tasks:
        y = labels_of[task][tokens]
        counts = [(int((keep & side & y).sum()), int((keep & side & ~y).sum())) for side in (~is_test, is_test)]
        least = (MIN_TRAIN_PER_CLASS, MIN_TEST_PER_CLASS)
        if any(min(c) < m for c, m in zip(counts, least)):
            why = (f"too few rows of a class: train {counts[0][0]} positive / {counts[0][1]} negative, test "
                   f"{counts[1][0]} / {counts[1][1]} (need {least[0]} / {least[1]} of each)")
            if named:
                raise UserError(f"sparse probing task '{task}' has {why} among the held-out rows of {dump.path}: "
                                "pass more --holdout-contexts, or leave the task out (--probe-tasks)")
            skipped[task] = why
            continue
        chosen[task] = (balanced_sample(y, keep & ~is_test, max_train_per_class, rng),
                        balanced_sample(y, keep & is_test, max_test_per_class, rng))
    if not chosen:
        raise UserError(f"no sparse probing task has enough rows among the held-out rows of {dump.path} "
                        f"({'; '.join(f'{t}: {w}' for t, w in skipped.items())}): pass more --holdout-contexts")
    device = torch.device(device)
    wanted = np.unique(np.concatenate([i for pair in chosen.values() for i in pair]))
    parts = []
    with bar(stop - start, "sparse probing: reading rows", "row", progress, unit_scale=True) as shown:
        for a in range(start, stop, chunk_rows):
            b = min(a + chunk_rows, stop)
            local = wanted[(wanted >= a - start) & (wanted < b - start)] - (a - start)
            if len(local):
                parts.append(float_rows(dump, a, b, device)[torch.from_numpy(local).to(device)])
            shown.update(b - a)
    x = torch.cat(parts)  # rows `wanted`, in order
    where = {int(r): i for i, r in enumerate(wanted)}
    results: dict[str, Any] = {}
    with bar(len(chosen), "sparse probing: fitting probes", "task", progress) as shown:
        for task, (train, test) in chosen.items():
            y = torch.from_numpy(labels_of[task][tokens]).to(device)
            tr = torch.tensor([where[int(r)] for r in train], device=device)
            te = torch.tensor([where[int(r)] for r in test], device=device)
            results[task] = sparse_probe(x[tr], y[torch.from_numpy(train).to(device)], x[te],
                                         y[torch.from_numpy(test).to(device)], sae, ks)
            shown.update(1)
    out: dict[str, Any] = {"sparse_probing_tasks": list(results)}
    out["sparse_probing_raw_accuracy"] = float(np.mean([r["raw_accuracy"] for r in results.values()]))
    for k in ks:
        out[f"sparse_probing_top_{k}_accuracy"] = float(np.mean([r["sae_accuracy"][str(k)] for r in results.values()]))
        rel = [r["sae_relative"][str(k)] for r in results.values() if r["sae_relative"][str(k)] is not None]
        out[f"sparse_probing_top_{k}_relative"] = float(np.mean(rel)) if rel else None
    out["sparse_probing"] = results
    out["sparse_probing_skipped"] = skipped
    return out
