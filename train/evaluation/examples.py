"""A feature's strongest rows, found from the dump alone (no model run), for reading."""
from __future__ import annotations

from typing import Any

import torch

from shared.errors import UserError
from shared.models import resolve_model_name
from shared.progress import bar
from shared.reader import Dump
from shared.saes import SAE
from train.evaluation.rows import float_rows
from train.evaluation.tokens import context_tokens


@torch.inference_mode()
def top_examples(sae: SAE, dump: Dump, features: list[int], n: int,
                 rows: tuple[int, int] | None = None, device: str | torch.device = "cpu",
                 chunk_rows: int = 8192, progress: bool = False) -> dict[int, list[dict[str, Any]]]:
    """The `n` rows where each feature fires hardest, strongest first, from the dump alone.

    A running top-n per feature is kept across chunks, so memory stays [n + chunk_rows, features].
    Rows where a feature does not fire are never examples: a rare feature may get fewer than n.
    `progress`: a bar over the rows on stderr.
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
    with bar(stop - start, "top examples", "row", progress, unit_scale=True) as shown:
        for a in range(start, stop, chunk_rows):
            b = min(a + chunk_rows, stop)
            acts = sae.encode(float_rows(dump, a, b, device))[:, index]  # [chunk, features]
            ids = torch.arange(a, b, device=device).unsqueeze(1).expand_as(acts)
            best = torch.cat([best, acts])
            best_rows = torch.cat([best_rows, ids])
            best, order = best.topk(min(n, best.shape[0]), dim=0)
            best_rows = best_rows.gather(0, order)
            shown.update(b - a)
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
