"""Feature absorption on the first-letter task (Chanin et al. 2024, "A is for Absorption: Studying
Feature Splitting and Absorption in Sparse Autoencoders"; the absorption metric of SAEBench,
Karvonen et al. 2025), built offline from the model's own vocabulary and the model.

The variant computed here, step by step:

1. Tokens. Every vocabulary entry (special tokens excepted) that, once the tokenizer's leading
   space marker ('Ġ', '▁' or a space) is stripped, is a single ASCII alphabetic word; entries that
   strip to the same lower-cased word are kept once (the marked one where there is one). Its letter is the
   word's first character, lower-cased. Letters with fewer than `MIN_PER_LETTER` tokens are left
   out; fewer than `MIN_LETTERS` letters left is a one-line UserError.
2. Activations. Each token alone after BOS ([BOS, token]; [token] where the tokenizer has no BOS)
   through the model, the activation at the SAE's hook at the token's position.
3. Probe. A train/test split of the tokens, stratified by letter (`test_fraction` of each
   letter's tokens, at least one, to test; seeded). On the train tokens, a logistic-regression
   probe per letter, one-vs-rest (26 or fewer independent binary probes trained together: the
   loss is their sum, each letter's positives weighted up to balance its negatives), linear in
   the raw activations (trained on them standardised per dimension, folded back), full batch,
   Adam (lr 0.03), `probe_steps` (500) steps, small L2. The letter's probe direction p is its
   weight vector over the raw activations, unit-normed.
4. Main feature. For each letter, the k=1 sparse probe: the SAE feature whose firing
   (activation > 0) has the best F1 for the letter on the train tokens.
5. Absorption, on the test tokens. A letter's probe true positives are its tokens the probe
   calls positive (logit > 0). Of those, a miss is one where the main feature does not fire. A
   miss is absorbed when one feature that fires on it, other than the main one, with a decoder
   row at cosine > `cos_threshold` (0.025, SAEBench's) to p, writes along p at least
   `projection_threshold` (0.5) of the token's own projection on p on its own:
   max_j f_j (W_dec_j . p) >= 0.5 (x - b_dec) . p, with (x - b_dec) . p > 0. (One feature, not
   the sum of all of them: summed, the many weak features of a dense or random SAE would pass.)
   (x - b_dec) . p is what the features must write along p (x ~ b_dec + sum_j f_j W_dec_j), so
   the test is the one feature's share of it. The rate is bounded by the main feature's misses:
   an SAE whose main features barely track the letters (low `absorption_first_letter_f1`, e.g. a
   random one) misses most tokens, and can score a high rate; read the two together.

Figures in eval.json (`ABSORPTION_KEYS`; letters averaged with equal weight):
  absorption_first_letter_rate: mean over letters of absorbed / probe true positives (SAEBench's
    "full absorption" rate: the share of the letter's tokens the main feature misses and another
    feature takes);
  absorption_first_letter_rate_of_misses: mean over letters with a miss of absorbed / misses
    (None when the main features miss nothing);
  absorption_first_letter_f1: mean over letters of the main feature's F1 on the test tokens;
  absorption_first_letter_probe_f1: mean over letters of the probe's F1 on the test tokens;
  absorption_first_letter_probe_accuracy: the share of test tokens whose highest probe logit is
    their letter's;
  absorption_first_letter_n_tokens, _n_letters: the tokens and letters used;
  absorption_first_letter_per_letter: per letter {rate, f1, main_feature, n_true_positives,
    n_misses, n_absorbed, absorbing_features}; absorbing_features: which features took the
    letter's absorbed misses, as [{feature, n_absorbed}], most absorbed tokens first (ties: lower
    feature first), at most `ABSORBERS_LISTED` (10) of them (so their n_absorbed can sum to less
    than the letter's). A miss's absorber is the feature with the largest f_j (W_dec_j . p) among
    those eligible (step 5): the one that passed the test, as the test takes the largest.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from shared.errors import UserError
from shared.progress import bar

SPACE_MARKERS = ("Ġ", "▁", " ")
MIN_PER_LETTER = 2
"""A letter needs this many tokens: one to train its probe on, one to test it."""
MIN_LETTERS = 2
"""One-vs-rest needs a rest."""
ABSORPTION_KEYS = ("absorption_first_letter_rate", "absorption_first_letter_rate_of_misses",
                   "absorption_first_letter_f1", "absorption_first_letter_probe_f1",
                   "absorption_first_letter_probe_accuracy", "absorption_first_letter_n_tokens",
                   "absorption_first_letter_n_letters")
"""eval.json's scalar absorption figures (the sweep summary's columns)."""
ABSORBERS_LISTED = 10
"""Absorbing features recorded per letter, the most absorbing first: enough to read who takes a
letter, few enough that eval.json stays small for 26 letters."""


def first_letter_tokens(tokenizer: Any) -> tuple[list[int], list[str]]:
    """(token ids, words) of the vocabulary entries that are single alphabetic words (step 1)."""
    vocab = tokenizer.get_vocab()
    special = set(getattr(tokenizer, "all_special_ids", None) or [])
    chosen: dict[str, tuple[int, str, bool]] = {}  # lower-cased word -> (id, word, marked)
    for entry, tid in sorted(vocab.items(), key=lambda kv: kv[1]):
        if tid in special:
            continue
        marked = entry.startswith(SPACE_MARKERS)
        word = entry[1:] if marked else entry
        if not (word.isascii() and word.isalpha()):
            continue
        key = word.lower()
        if key not in chosen or (marked and not chosen[key][2]):
            chosen[key] = (tid, word, marked)
    pairs = sorted((tid, word) for tid, word, _ in chosen.values())
    return [t for t, _ in pairs], [w for _, w in pairs]


def letters_kept(words: Sequence[str]) -> list[str]:
    """The letters with at least MIN_PER_LETTER words, sorted; a UserError if too few."""
    counts: dict[str, int] = {}
    for w in words:
        counts[w[0].lower()] = counts.get(w[0].lower(), 0) + 1
    kept = sorted(c for c, n in counts.items() if n >= MIN_PER_LETTER)
    if len(kept) < MIN_LETTERS:
        raise UserError(f"absorption needs at least {MIN_LETTERS} first letters with {MIN_PER_LETTER}+ "
                        f"alphabetic word tokens in the vocabulary; this tokenizer has {len(words)} such tokens "
                        f"and {len(kept)} such letters (run without --absorption)")
    return kept


@torch.inference_mode()
def token_activations(model: Any, hook: str, token_ids: Sequence[int], bos_id: int | None,
                      device: str | torch.device, batch_size: int = 256, progress: bool = False) -> torch.Tensor:
    """[n, d] activations at `hook` of each token alone after BOS (step 2), float32 on the CPU."""
    from shared.models import check_hook, stop_at_layer

    check_hook(model, hook)
    stop = stop_at_layer([hook])  # the blocks after the hook's are not run
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    out = []
    with bar(len(ids), "absorption: token activations", "token", progress) as shown:
        for a in range(0, len(ids), batch_size):
            chunk = ids[a : a + batch_size, None]
            if bos_id is not None:
                chunk = torch.cat([torch.full_like(chunk, bos_id), chunk], dim=1)
            _, cache = model.run_with_cache(chunk.to(device), names_filter=[hook], stop_at_layer=stop,
                                            return_cache_object=False)
            out.append(cache[hook][:, -1].float().cpu())
            shown.update(len(chunk))
    return torch.cat(out)


def split_tokens(letters: Sequence[str], kept: Sequence[str], test_fraction: float,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, test) indices of the tokens whose letter is kept, stratified by letter."""
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for c in kept:
        idx = torch.tensor([i for i, l in enumerate(letters) if l == c])
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_test = max(1, round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def train_probe(x: torch.Tensor, y: torch.Tensor, steps: int = 500, lr: float = 3e-2,
                weight_decay: float = 1e-4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One-vs-rest logistic regression (step 3): x [n, d], y [n, L] in {0, 1} -> (W [d, L] over
    raw activations, b [L]); logits = x W + b. Trained on x standardised per dimension (a
    preconditioning: the probe is still linear in x), folded back into W and b."""
    mu, sd = x.mean(0), x.std(0).nan_to_num(1.0).clamp_min(1e-6)
    xs = (x - mu) / sd
    torch.manual_seed(seed)
    w = torch.zeros(x.shape[1], y.shape[1], device=x.device, requires_grad=True)
    b = torch.zeros(y.shape[1], device=x.device, requires_grad=True)
    pos = y.sum(0).clamp_min(1)
    pos_weight = ((len(y) - y.sum(0)) / pos).clamp_min(1.0)  # rare letters: balance the classes
    opt = torch.optim.Adam([w, b], lr=lr)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
    with torch.enable_grad():
        for _ in range(steps):
            loss = loss_fn(xs @ w + b, y) * y.shape[1] + weight_decay * (w * w).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    w = (w / sd[:, None]).detach()
    return w, (b - mu @ w).detach()


def _f1(tp: torch.Tensor, predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    return 2 * tp / (predicted + actual).clamp_min(1)


@torch.inference_mode()
def _main_features(sae: Any, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, p: torch.Tensor,
                   cos_threshold: float, device: torch.device,
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Steps 4-5 over chunks of tokens (never all [tokens, d_sae] at once): (main feature per
    letter [L]; on the test tokens, whether it fires [n_test, L]; the most that one other
    firing feature with decoder cosine > `cos_threshold` to the letter's probe writes along it
    [n_test, L], 0 where none does; and which feature that is [n_test, L], the absorber where the
    token is absorbed, meaningless where the most is 0)."""
    dtype = sae.W_enc.dtype
    enc = lambda xs: sae.encode(xs.to(device, dtype)).float()  # noqa: E731
    tp = torch.zeros(sae.W_dec.shape[0], y_train.shape[1], device=device)
    fired = torch.zeros(sae.W_dec.shape[0], device=device)
    for a in range(0, len(x_train), chunk):
        f = (enc(x_train[a : a + chunk]) > 0).float()
        tp += f.T @ y_train[a : a + chunk].to(device)
        fired += f.sum(0)
    main = _f1(tp, fired[:, None], y_train.sum(0).to(device)[None]).argmax(0)  # [L]
    W_dec = sae.W_dec.detach().float()
    along = W_dec @ p.to(device)  # [d_sae, L]: written along each probe per unit of activation
    cos = along / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    absorbing = cos > cos_threshold
    absorbing[main, torch.arange(len(main), device=device)] = False
    along = along * absorbing
    fires, written, writer = [], [], []
    for a in range(0, len(x_test), chunk):
        f = enc(x_test[a : a + chunk]).clamp_min(0)
        fires.append((f[:, main] > 0).cpu())
        most = [(f * along[:, j]).max(1) for j in range(along.shape[1])]  # (values, features) per letter
        written.append(torch.stack([m.values for m in most], 1).cpu())
        writer.append(torch.stack([m.indices for m in most], 1).cpu())
    return main.cpu(), torch.cat(fires), torch.cat(written), torch.cat(writer)


def absorbing_features(absorbers: torch.Tensor) -> list[dict[str, int]]:
    """[{feature, n_absorbed}] of one letter's absorbed tokens' absorbers (`absorbers`, a feature
    per absorbed token), most tokens first, ties by feature, at most ABSORBERS_LISTED."""
    features, counts = absorbers.unique(return_counts=True)  # sorted by feature
    order = sorted(range(len(features)), key=lambda i: (-int(counts[i]), int(features[i])))
    return [{"feature": int(features[i]), "n_absorbed": int(counts[i])} for i in order[:ABSORBERS_LISTED]]


def absorption_metrics(words: Sequence[str], acts: torch.Tensor, sae: Any, *, test_fraction: float = 0.2,
                       seed: int = 0, probe_steps: int = 500, cos_threshold: float = 0.025,
                       projection_threshold: float = 0.5, device: str | torch.device = "cpu",
                       progress: bool = False) -> dict[str, Any]:
    """The absorption figures (module docstring, steps 3-5) of `sae` on `words` and their
    activations `acts` [n, d] at its hook. Returns eval.json's `absorption_first_letter_*` keys."""
    if acts.ndim != 2 or acts.shape[0] != len(words):
        raise UserError(f"need one activation row per word: {len(words)} words, activations {tuple(acts.shape)}")
    if acts.shape[1] != sae.W_dec.shape[1]:
        raise UserError(f"activations of width {acts.shape[1]} but the SAE writes width {sae.W_dec.shape[1]}")
    device = torch.device(device)
    letters = [w[0].lower() for w in words]
    kept = letters_kept(words)
    train, test = split_tokens(letters, kept, test_fraction, seed)
    x = acts.float()
    label = torch.tensor([kept.index(c) if c in kept else -1 for c in letters])
    y = torch.zeros(len(words), len(kept))
    y[label >= 0, label[label >= 0]] = 1.0
    with bar(4, "absorption: probe, features, absorption", "step", progress) as shown:
        w, b = train_probe(x[train].to(device), y[train].to(device), steps=probe_steps, seed=seed)
        w, b = w.cpu(), b.cpu()
        shown.update(1)
        p = w / w.norm(dim=0).clamp_min(1e-12)  # [d, L] unit probe directions
        logits = x[test] @ w + b  # [n_test, L]
        y_test = y[test]
        probe_pos = logits > 0
        probe_f1 = _f1((probe_pos & (y_test > 0)).sum(0).float(), probe_pos.sum(0).float(), y_test.sum(0))
        accuracy = float((logits.argmax(1) == label[test]).float().mean())
        shown.update(1)
        main, fires_main, written, writer = _main_features(sae, x[train], y[train], x[test], p, cos_threshold, device)
        shown.update(1)
        main_f1 = _f1((fires_main & (y_test > 0)).sum(0).float(), fires_main.sum(0).float(), y_test.sum(0))
        b_dec = sae.b_dec.detach().float().cpu()
        own = (x[test] - b_dec) @ p  # [n_test, L]: each token's projection on each probe
        per_letter: dict[str, Any] = {}
        rates, miss_rates = [], []
        for j, c in enumerate(kept):
            true_pos = probe_pos[:, j] & (y_test[:, j] > 0)
            misses = true_pos & ~fires_main[:, j]
            absorbed = misses & (own[:, j] > 0) & (written[:, j] >= projection_threshold * own[:, j])
            n_tp, n_miss, n_abs = int(true_pos.sum()), int(misses.sum()), int(absorbed.sum())
            rate = n_abs / n_tp if n_tp else 0.0
            rates.append(rate)
            if n_miss:
                miss_rates.append(n_abs / n_miss)
            per_letter[c] = {"rate": rate, "f1": float(main_f1[j]), "main_feature": int(main[j]),
                             "n_true_positives": n_tp, "n_misses": n_miss, "n_absorbed": n_abs,
                             "absorbing_features": absorbing_features(writer[absorbed, j])}
        shown.update(1)
    return {
        "absorption_first_letter_rate": sum(rates) / len(rates),
        "absorption_first_letter_rate_of_misses": sum(miss_rates) / len(miss_rates) if miss_rates else None,
        "absorption_first_letter_f1": float(main_f1.mean()),
        "absorption_first_letter_probe_f1": float(probe_f1.mean()),
        "absorption_first_letter_probe_accuracy": accuracy,
        "absorption_first_letter_n_tokens": int(len(train) + len(test)),
        "absorption_first_letter_n_letters": len(kept),
        "absorption_first_letter_per_letter": per_letter,
    }


ABSORPTION_NOT_MEASURED = ("not measured: {why}; absorption compares decoder rows with a probe of the hook's "
                           "own activations, so it needs an SAE that reconstructs the one hook it reads")


def absorption_of_folder(folder: Any, dump: Any, model: Any, tokenizer: Any, device: str | torch.device,
                         progress: bool = False, token_cache: dict | None = None) -> dict[str, Any]:
    """Absorption figures of the SAE in checkpoint `folder` at its dump's hook (`model`, a
    TransformerBridge, the dump's model), or `absorption_not_measured` for a transcoder or an SAE
    over several hooks.

    `token_cache`: a dict shared by the SAEs of one `evaluate` (a sweep). The words and their
    activations depend only on the model and the hook, so they are computed once per (model, hook)
    and kept there, not once per SAE (16 s a time on SmolLM2-135M's layer 5)."""
    from shared.saes.base import read_cfg
    from shared.saes.io import load_sae
    from train.evaluation.run_eval import is_transcoder, stacked_sides

    cfg = read_cfg(folder)
    if stacked_sides(cfg):
        return {"absorption_not_measured": ABSORPTION_NOT_MEASURED.format(why="the SAE reads several hooks")}
    if is_transcoder(cfg):
        return {"absorption_not_measured": ABSORPTION_NOT_MEASURED.format(why="a transcoder writes another hook")}
    if tokenizer is None:
        raise UserError(f"--absorption needs the tokenizer of {dump.manifest.model}, which could not be loaded "
                        "offline (run without --absorption)")
    key = (dump.manifest.model, dump.manifest.hook)
    if token_cache is None or key not in token_cache:
        ids, words = first_letter_tokens(tokenizer)
        letters_kept(words)  # fail before the model runs
        acts = token_activations(model, dump.manifest.hook, ids, getattr(tokenizer, "bos_token_id", None), device,
                                 progress=progress)
        if token_cache is not None:
            token_cache[key] = (words, acts)
    else:
        words, acts = token_cache[key]
    return absorption_metrics(words, acts, load_sae(folder, device=device), device=device, progress=progress)
