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
    absorption: dict[str, Any] | None = None  # eval.json's absorption_first_letter_per_letter, if measured


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
            "window_before": stats.config.window_before, "has_logits": inputs.logits is not None,
            "absorption": absorption_letters(inputs.absorption)})
        _write_js(data / "vocab.js", "DASH.vocab = ", {str(k): v for k, v in inputs.token_text.items()})
        mean = stats.mean_when_firing  # [d_sae], computed once
        roles = absorption_roles(inputs.absorption)
        index = []
        for c in range(0, d_sae, CHUNK):  # one file's records in memory at a time
            chunk = {f: feature_record(inputs, f, mean, roles) for f in range(c, min(c + CHUNK, d_sae))}
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


def feature_record(inputs: DashboardInputs, f: int, mean: torch.Tensor | None = None,
                   roles: dict[int, list[dict[str, Any]]] | None = None) -> dict[str, Any]:
    """What the page shows for feature f (JSON-able, floats to 4 significant digits); `mean`:
    every feature's mean activation when firing, `roles`: absorption_roles(inputs.absorption),
    if already computed."""
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
    roles = absorption_roles(inputs.absorption) if roles is None else roles
    if f in roles:  # only the few features that have a part in a letter's absorption
        rec["absorption"] = roles[f]
    if inputs.logits is not None:
        lg = inputs.logits
        rec["promoted"] = [[int(t), _num(v)] for t, v in zip(lg["top_tokens"][f].tolist(), lg["top_values"][f].tolist())]
        rec["suppressed"] = [[int(t), _num(v)] for t, v in
                             zip(lg["bottom_tokens"][f].tolist(), lg["bottom_values"][f].tolist())]
    return rec


def absorption_letters(per_letter: dict[str, Any] | None) -> list[dict[str, Any]] | None:
    """The index's absorption table, a row per letter in letter order: {letter, main_feature, f1,
    rate, n_true_positives, n_absorbed, absorbing_features}; None when absorption was not measured.
    `absorbing_features` is None for an eval.json written before they were recorded (the page
    then says to rerun), not [] (which means no miss was absorbed). A damaged entry leaves the
    table out, as read_evaluation leaves out a damaged eval.json: the rest of the dashboard is
    still worth writing."""
    if not isinstance(per_letter, dict) or not per_letter:
        return None
    try:
        return [{"letter": c, "main_feature": int(v["main_feature"]), "f1": _num(v["f1"]), "rate": _num(v["rate"]),
                 "n_true_positives": int(v["n_true_positives"]), "n_absorbed": int(v["n_absorbed"]),
                 "absorbing_features": _absorbers(v)} for c, v in sorted(per_letter.items())]
    except (KeyError, TypeError, ValueError):
        return None


def absorption_roles(per_letter: dict[str, Any] | None) -> dict[int, list[dict[str, Any]]]:
    """feature -> its parts in the letters' absorption, for its page: {letter, role: "main", f1,
    rate} where it is the letter's main feature, {letter, role: "absorbs", n_absorbed} where it
    takes some of the letter's misses."""
    roles: dict[int, list[dict[str, Any]]] = {}
    for row in absorption_letters(per_letter) or []:
        c = row["letter"]
        roles.setdefault(row["main_feature"], []).append({"letter": c, "role": "main", "f1": row["f1"],
                                                          "rate": row["rate"]})
        for a in row["absorbing_features"] or []:
            roles.setdefault(a["feature"], []).append({"letter": c, "role": "absorbs", "n_absorbed": a["n_absorbed"]})
    return roles


def _absorbers(letter: dict[str, Any]) -> list[dict[str, int]] | None:
    got = letter.get("absorbing_features")
    if got is None:
        return None
    return [{"feature": int(a["feature"]), "n_absorbed": int(a["n_absorbed"])} for a in got]


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
