"""A static, self-contained feature dashboard: `index.html`, its script and style, and data files.

The data are JavaScript files that assign to `window.DASH` rather than JSON fetched at run time:
browsers refuse `fetch()` from `file://`, and the dashboard must open from disk as well as from any
static file server, with no network. Per-feature details come in files of `CHUNK` features, loaded
when a feature is opened, so the index stays quick with tens of thousands of features.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from train.evaluation.feature_stats import Examples, FeatureStats

ASSETS = Path(__file__).parent / "assets"
CHUNK = 256
"""Features per data file."""
RANGES = 4
"""Activation ranges sampled: the histogram's bins over [0, max] in this many runs."""
PER_RANGE = 5
"""Examples shown per activation range."""
TOP_TOKENS = 3
"""Tokens listed in the index: the most frequent firing tokens among the top examples."""


@dataclass
class DashboardInputs:
    """Everything the dashboard shows, computed elsewhere."""

    stats: FeatureStats
    neighbours: tuple[torch.Tensor, torch.Tensor]  # cosine [d_sae, k], index [d_sae, k]
    logits: dict[str, torch.Tensor] | None  # from logit_table.logit_effects, or None without a model
    token_text: dict[int, str]  # token id -> text, for the ids the dashboard shows
    title: str
    subtitle: str
    metrics: dict[str, float]


def used_token_ids(stats: FeatureStats, logits: dict[str, torch.Tensor] | None) -> list[int]:
    """Every token id the dashboard shows (so only those need decoding)."""
    ids = set(stats.top.window_tokens.unique().tolist()) | set(stats.sample.window_tokens.unique().tolist())
    if logits is not None:
        ids |= set(logits["top_tokens"].unique().tolist()) | set(logits["bottom_tokens"].unique().tolist())
    ids.discard(-1)
    return sorted(ids)


def write_dashboard(folder: Path, inputs: DashboardInputs) -> Path:
    """Write the dashboard to `folder` (replaced whole: built beside it, then renamed into place)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the pages from a static file server's user
        for asset in ("index.html", "app.js", "style.css"):
            shutil.copyfile(ASSETS / asset, tmp / asset)
        data = tmp / "data"
        data.mkdir()
        stats = inputs.stats
        d_sae = stats.fired.shape[0]
        _write_js(data / "meta.js", "DASH.meta = ", {
            "title": inputs.title, "subtitle": inputs.subtitle, "metrics": inputs.metrics,
            "n_features": d_sae, "n_rows": stats.n_rows, "chunk_size": CHUNK,
            "window_before": stats.config.window_before, "has_logits": inputs.logits is not None})
        _write_js(data / "vocab.js", "DASH.vocab = ", {str(k): v for k, v in inputs.token_text.items()})
        mean = stats.mean_when_firing  # [d_sae], computed once
        index = []
        for c in range(0, d_sae, CHUNK):  # one file's records in memory at a time
            chunk = {f: feature_record(inputs, f, mean) for f in range(c, min(c + CHUNK, d_sae))}
            index += [_index_row(r) for r in chunk.values()]
            _write_js(data / f"features_{c // CHUNK:04d}.js", f"DASH.addFeatures({c // CHUNK}, ", chunk, ");")
        _write_js(data / "index.js", "DASH.index = ", {"rows": index})
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder / "index.html"


def feature_record(inputs: DashboardInputs, f: int, mean: torch.Tensor | None = None) -> dict[str, Any]:
    """What the page shows for feature f (JSON-able, floats to 4 significant digits); `mean`:
    every feature's mean activation when firing, if already computed."""
    s = inputs.stats
    fired = int(s.fired[f])
    top = _examples(s.top, f)
    mean = s.mean_when_firing if mean is None else mean
    rec: dict[str, Any] = {
        "feature": f, "fired": fired, "density": fired / s.n_rows, "max": _num(s.act_max[f]),
        "mean": _num(mean[f]), "top": top, "ranges": _ranges(s, f),
        "hist": _histogram(s, f), "top_tokens": _top_tokens(top, s.config.window_before),
        "neighbours": [[int(i), _num(c)] for c, i in zip(*(t[f].tolist() for t in inputs.neighbours))],
    }
    if inputs.logits is not None:
        lg = inputs.logits
        rec["promoted"] = [[int(t), _num(v)] for t, v in zip(lg["top_tokens"][f].tolist(), lg["top_values"][f].tolist())]
        rec["suppressed"] = [[int(t), _num(v)] for t, v in
                             zip(lg["bottom_tokens"][f].tolist(), lg["bottom_values"][f].tolist())]
    return rec


def _examples(e: Examples, f: int, order: list[int] | None = None) -> list[list[Any]]:
    """[activation, dump row, window token ids, window activations] per example that exists.
    One conversion to Python per tensor and feature (not per element: tensor indexing is slow)."""
    acts, rows = e.acts[f].tolist(), e.rows[f].tolist()
    tokens, window_acts = e.window_tokens[f].tolist(), e.window_acts[f].tolist()
    js = order if order is not None else range(len(rows))
    return [[_num(acts[j]), rows[j], tokens[j], [_num(a) for a in window_acts[j]]] for j in js if rows[j] >= 0]


def _ranges(s: FeatureStats, f: int) -> list[dict[str, Any]]:
    """The histogram's bins over [0, max] in RANGES runs of adjacent bins (as even as the bin
    count allows), each with its exact share of the feature's firing rows (from the histogram's
    counts, so the shares agree with it and add up to 1) and up to PER_RANGE rows of the uniform
    sample whose activation falls inside, largest first. Intervals are [lo, hi), as the bins."""
    hist = _histogram(s, f)
    counts, width = hist["counts"], hist["width"]
    total = sum(counts)
    if not counts or total == 0:
        return []
    acts, rows = s.sample.acts[f].tolist(), s.sample.rows[f].tolist()
    picked = [j for j, r in enumerate(rows) if r >= 0]
    n = min(RANGES, len(counts))
    cuts = [round(i * len(counts) / n) for i in range(n + 1)]
    out = []
    for i in range(n):
        a, b = cuts[i], cuts[i + 1]
        lo, hi = a * width, b * width
        last = i == n - 1  # the sample's largest values belong to the last bin, as in the histogram
        inside = [j for j in picked if lo <= acts[j] < hi or (last and acts[j] >= hi)]
        shown = sorted(inside, key=lambda j: -acts[j])[:PER_RANGE]
        out.append({"lo": _num(lo), "hi": _num(hi), "share": sum(counts[a:b]) / total,
                    "examples": _examples(s.sample, f, shown)})
    return out


def _histogram(s: FeatureStats, f: int) -> dict[str, Any]:
    """The bins that cover [0, max] (the rest of [0, top) is empty by construction)."""
    bins = s.config.hist_bins
    top = float(s.hist_top[f])
    if top <= 0:
        return {"width": 0.0, "counts": []}
    width = top / bins
    used = min(bins, int(float(s.act_max[f]) // width) + 1)
    return {"width": width, "counts": s.hist_counts[f, :used].tolist()}


def _top_tokens(top: list[list[Any]], centre: int) -> list[int]:
    """The most frequent firing tokens among the top examples (most activating first on ties);
    `centre` is the example's own token's index in its window."""
    return [t for t, _ in Counter(ex[2][centre] for ex in top).most_common(TOP_TOKENS)]


def _index_row(rec: dict[str, Any]) -> list[Any]:
    density = rec["density"]
    promoted = [t for t, _ in rec.get("promoted", [])[:TOP_TOKENS]]
    return [rec["feature"], _num(math.log10(density)) if density > 0 else None, rec["max"], rec["mean"],
            rec["top_tokens"], promoted]


def _num(x: Any) -> float | None:
    x = float(x)
    return float(f"{x:.4g}") if math.isfinite(x) else None


def _write_js(path: Path, prefix: str, obj: Any, suffix: str = ";") -> None:
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    path.write_text(f"window.DASH = window.DASH || {{}};\n{prefix}{text}{suffix}\n", encoding="utf-8")
