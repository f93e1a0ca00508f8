"""A sweep's results at a glance: a table (terminal, CSV, JSON) and PNG plots.

    summary.csv / summary.json    one row per SAE: its swept settings and final metrics
    frontier_l0_ev.png            L0 against explained variance, Pareto frontier marked
    frontier_l0_ce.png            L0 against CE loss recovered (when evaluated with the model)
    frontier_l0_kl.png            L0 against KL(clean || with SAE) (idem; lower is better)
    frontier_l0_absorption.png    L0 against the first-letter absorption rate (evaluate --absorption;
                                  lower is better)
    feature_density.png           log10 feature density histogram per SAE (training's; beside it the
                                  held-out one of eval.json where evaluated)
    loss_curves.png               MSE and L0 against step per SAE
    plots.json                    which SAEs each plot shows

(the file names are `train.run_layout`'s)

Seeds: where `init_seed` is swept, the SAEs equal in every other swept setting form a group, and
each row gets its group's `<column>_mean`, `_std` (sample standard deviation, ddof=1), `_min`,
`_max` and `n_seeds` for every metric column; the frontier plots then draw one point per group at
the means, with min-max error bars on both axes.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
from safetensors.torch import load_file

from shared import atomic
from train import run_layout as layout
from train.run_layout import SweepEntry

EVAL_KEYS = ("mse", "explained_variance", "l0", "frac_dead", "frac_dense", "explained_variance_per_token_mean",
             "cosine_similarity", "l2_norm_ratio")
"""eval.json's keys the summary shows, as eval_<key>."""
ABSORPTION_COLUMNS = ("absorption_first_letter_rate", "absorption_first_letter_rate_of_misses",
                      "absorption_first_letter_f1", "absorption_first_letter_probe_accuracy")
"""eval.json's absorption figures (evaluate --absorption) the summary shows, as they are named there."""
COLUMNS = ("train_mse", "train_mse_raw", "train_explained_variance", "train_l0", "train_frac_dead", "eval_mse", "eval_explained_variance",
           "eval_l0", "eval_frac_dead", "eval_frac_dense", "eval_explained_variance_per_token_mean",
           "eval_cosine_similarity", "eval_l2_norm_ratio", "ce_clean", "ce_with_sae",
           "ce_zero_ablation", "ce_mean_ablation", "ce_loss_recovered", "kl_clean_sae",
           "sparse_probing_raw_accuracy", *(f"sparse_probing_top_{k}_{m}" for k in (1, 2, 5, 20)
                                            for m in ("accuracy", "relative")),
           *ABSORPTION_COLUMNS)
SEED_KEY = "init_seed"
"""The swept setting whose values are repeats of one configuration (aggregated over, not plotted)."""
SEED_STATS = ("mean", "std", "min", "max")


UNITS_NOTE = ("train_mse is in training space (normalised with normalize_activations=expected_norm); "
              "train_mse_raw and every eval_ figure are in raw activations")
"""Printed under the table: which space each squared error is in."""


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = layout.metrics_path(run_dir)
    if not path.is_file():
        return []
    return [row for row in (json.loads(line) for line in path.read_text().splitlines() if line)
            if "mse" in row]


def summary_row(name: str, run_dir: Path, settings: dict[str, Any]) -> dict[str, Any]:
    """Settings + last logged training metrics + eval.json (prefixed eval_ where names clash)."""
    row: dict[str, Any] = {"name": name, **settings, "folder": str(run_dir)}
    logged = read_metrics(run_dir)
    if logged:
        # Last logged training values (mse in the normalized space when inputs were normalized).
        # mse_raw: the same in raw units, as eval_mse (absent from runs written before it existed).
        row.update({f"train_{k}": logged[-1].get(k) for k in ("mse", "mse_raw", "explained_variance", "l0",
                                                              "frac_dead")})
    ev = layout.read_eval(run_dir)
    if ev is not None:
        for k, v in ev.items():
            if k in EVAL_KEYS:
                row[f"eval_{k}"] = v
            elif k.startswith(("ce_", "kl_")) or (k.startswith("sparse_probing_") and k in COLUMNS) \
                    or k in ABSORPTION_COLUMNS:
                row[k] = v
    return row


def seed_groups(rows: list[dict[str, Any]], swept: list[str]) -> list[list[int]] | None:
    """Indices of the rows equal in every swept setting but `init_seed`, in first-seen order;
    None unless init_seed is swept."""
    if SEED_KEY not in swept:
        return None
    others = [k for k in swept if k != SEED_KEY]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(json.dumps([r.get(k) for k in others], default=str), []).append(i)
    return list(groups.values())


def add_seed_stats(rows: list[dict[str, Any]], swept: list[str]) -> list[str]:
    """Give each row its seed group's `n_seeds` and, per metric column that every member of the
    group has, `<column>_mean`, `_std` (ddof=1; None for one seed), `_min` and `_max`. Returns the
    columns added (none unless init_seed is swept)."""
    groups = seed_groups(rows, swept)
    if groups is None:
        return []
    for members in groups:
        for i in members:
            rows[i]["n_seeds"] = len(members)
        for column in COLUMNS:
            values = [rows[i].get(column) for i in members]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                continue
            a = np.array(values, dtype=np.float64)
            stats = {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else None,
                     "min": float(a.min()), "max": float(a.max())}
            for i in members:
                rows[i].update({f"{column}_{name}": v for name, v in stats.items()})
    return ["n_seeds"] + [f"{c}_{name}" for c in COLUMNS for name in SEED_STATS
                          if any(f"{c}_{name}" in r for r in rows)]


def _seed_points(rows: list[dict[str, Any]], swept: list[str], x_key: str, y_key: str) -> list[dict[str, Any]]:
    """One point per seed group for the frontier plots: the swept settings but init_seed, the
    means of x_key and y_key, and their ranges (`xerr`, `yerr`: [mean - min, max - mean]);
    `members` the SAEs' names. Groups where a member lacks either value are left out."""
    points = []
    for members in seed_groups(rows, swept) or []:
        group = [rows[i] for i in members]
        if any(r.get(x_key) is None or r.get(y_key) is None for r in group):
            continue
        xs, ys = np.array([r[x_key] for r in group], float), np.array([r[y_key] for r in group], float)
        others = [k for k in swept if k != SEED_KEY]
        point = {k: group[0].get(k) for k in others}
        point.update({x_key: float(xs.mean()), y_key: float(ys.mean()),
                      "xerr": [float(xs.mean() - xs.min()), float(xs.max() - xs.mean())],
                      "yerr": [float(ys.mean() - ys.min()), float(ys.max() - ys.mean())],
                      "members": [r["name"] for r in group], "name": group[0]["name"],
                      "label": ", ".join(str(group[0].get(k)) for k in others) + f" ({len(group)} seeds)"})
        points.append(point)
    return points


def pareto_front(x: list[float], y: list[float]) -> list[int]:
    """Indices of points no other point beats on both (lower x and higher y), by increasing x."""
    order = sorted(range(len(x)), key=lambda i: (x[i], -y[i]))
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return front


def _series(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, list[int]]:
    """Rows grouped by their swept non-numeric values (architecture, on/off switches), so that one
    line per architecture runs through its numeric settings (k, coefficients)."""
    categorical = [k for k in keys if any(isinstance(r.get(k), (str, bool)) for r in rows)]
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        name = ", ".join(f"{r[k]}" if k == "architecture" else f"{k}={r[k]}" for k in categorical
                         if r.get(k) not in (None, False))
        groups.setdefault(name, []).append(i)
    return groups


def _frontier_plot(rows: list[dict[str, Any]], y_key: str, y_label: str, path: Path, plt,
                   keys: list[str] | None = None, higher_is_better: bool = True) -> list[str]:
    """Draw one point per SAE that has both values; returns the names drawn. With swept
    architectures (or other non-numeric settings), one coloured line per group."""
    x_key = "eval_l0" if all(r.get("eval_l0") is not None for r in rows) else "train_l0"
    seeds = SEED_KEY in (keys or [])
    if seeds:  # one point per seed group: the means, min-max error bars
        have = _seed_points(rows, keys or [], x_key, y_key)
        keys = [k for k in keys or [] if k != SEED_KEY]
    else:
        have = [r for r in rows if r.get(x_key) is not None and r.get(y_key) is not None]
    if not have:
        return []
    fig, ax = plt.subplots(figsize=(7.5, 5))
    groups = _series(have, keys or [])
    for n, (group, members) in enumerate(groups.items()):
        members = sorted(members, key=lambda i: have[i][x_key])
        xs, ys = [have[i][x_key] for i in members], [have[i][y_key] for i in members]
        ax.plot(xs, ys, marker="o", color=f"C{n % 10}", label=group or None, zorder=2,
                linestyle="-" if len(groups) > 1 else "none")
        if seeds:
            ax.errorbar(xs, ys, xerr=np.array([have[i]["xerr"] for i in members]).T,
                        yerr=np.array([have[i]["yerr"] for i in members]).T, fmt="none",
                        ecolor=f"C{n % 10}", capsize=3, zorder=2)
        if len(groups) == 1:
            for i in members:
                ax.annotate(have[i].get("label", have[i]["name"]), (have[i][x_key], have[i][y_key]),
                            fontsize=7, xytext=(4, 4), textcoords="offset points")
    x = [r[x_key] for r in have]
    y = [r[y_key] if higher_is_better else -r[y_key] for r in have]
    front = pareto_front(x, y)
    ax.plot([x[i] for i in front], [have[i][y_key] for i in front], color="black", linestyle=":",
            zorder=3, label="frontier")
    ax.set_xscale("log")
    ax.set_xlabel("L0 (features active per token)" + (" on held-out rows" if x_key == "eval_l0" else ""))
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    _legend(ax)
    if seeds:
        ax.set_title("mean over init seeds, bars min to max", fontsize=9)
    elif len(groups) == 1 and rows and rows[0].get("label_keys"):
        ax.set_title(f"points labelled {rows[0]['label_keys']}", fontsize=9)
    _save(fig, path, plt)
    return [name for r in have for name in r.get("members", [r["name"]])]


def _legend(ax) -> None:
    """A legend where something drawn has a label (matplotlib warns on an empty one)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _save(fig, path: Path, plt) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _density_plot(runs: list[tuple[str, Path, Path]], path: Path, plt) -> list[str]:
    """Training's log10 feature density per SAE (its sparsity file); beside it, where eval.json
    has one, the held-out histogram (fixed bins; never-fired features left out, counted in the
    legend)."""
    drawn = []
    held_out = [(name, ev) for name, _, run_dir in runs
                if (ev := layout.read_eval(run_dir)) is not None and ev.get("feature_density_hist_counts")]
    fig, axes = plt.subplots(1, 2 if held_out else 1, figsize=(12 if held_out else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    bins = np.linspace(-10, 0, 51)
    for name, final, _ in runs:
        sparsity = final / layout.SPARSITY
        if sparsity.is_file():
            values = load_file(str(sparsity))["sparsity"].numpy()
            ax.hist(np.clip(values, -10, 0), bins=bins, histtype="step", label=name)
            drawn.append(name)
    ax.set_xlabel("log10 feature density in training (-10: never fired)")
    ax.set_ylabel("features")
    _legend(ax)
    if held_out:
        b = axes[0][1]
        for name, ev in held_out:
            b.stairs(ev["feature_density_hist_counts"], ev["feature_density_hist_edges"],
                     label=f"{name} ({ev.get('feature_density_hist_never_fired', 0)} never fired)")
            if name not in drawn:
                drawn.append(name)
        b.set_xlabel("log10 feature density on held-out rows (eval.json)")
        b.set_ylabel("features")
        _legend(b)
    _save(fig, path, plt)
    return drawn


def _curves_plot(runs: list[tuple[str, Path]], path: Path, plt) -> list[str]:
    drawn = []
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, run_dir in runs:
        rows = read_metrics(run_dir)
        if rows:
            drawn.append(name)
        steps = [r["step"] for r in rows]
        a.plot(steps, [r["mse"] for r in rows], label=name)
        b.plot(steps, [r["l0"] for r in rows], label=name)
    a.set_yscale("log")
    a.set_xlabel("step")
    a.set_ylabel("MSE")
    b.set_yscale("log")
    b.set_xlabel("step")
    b.set_ylabel("L0")
    _legend(a)
    _save(fig, path, plt)
    return drawn


def format_table(rows: list[dict[str, Any]], keys: list[str]) -> str:
    def cell(v: Any) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    table = [keys] + [[cell(r.get(k)) for k in keys] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(keys))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in table)


def write_summary(root: Path, entries: list[SweepEntry], keys: list[str],
                  log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Write the table and plots for a sweep's SAEs into `root`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rows = [summary_row(e.name, e.run_dir, e.settings) for e in entries]
    for row in rows:  # short point labels for the plots: the swept values only
        row["label"] = ", ".join(str(row[k]) for k in keys)
        row["label_keys"] = ", ".join(keys)
    swept = list(keys)
    seed_columns = add_seed_stats(rows, swept)
    keys = ["name", *keys, *[c for c in COLUMNS if any(r.get(c) is not None for r in rows)]]
    shown = keys + [c for c in seed_columns if c in ("n_seeds", "eval_explained_variance_mean",
                                                      "eval_explained_variance_std")]
    keys += seed_columns
    atomic.write_json(root / layout.SUMMARY_JSON, [{k: v for k, v in r.items() if not k.startswith("label")}
                                                   for r in rows])
    with open(root / layout.SUMMARY_CSV, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys + ["folder"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    ev_key = "eval_explained_variance" if all(r.get("eval_explained_variance") is not None for r in rows) \
        else "train_explained_variance"
    drawn = {
        layout.FRONTIER_EV: _frontier_plot(rows, ev_key, "explained variance", root / layout.FRONTIER_EV,
                                           plt, swept),
        layout.FRONTIER_CE: _frontier_plot(rows, "ce_loss_recovered", "CE loss recovered",
                                           root / layout.FRONTIER_CE, plt, swept),
        layout.FRONTIER_KL: _frontier_plot(rows, "kl_clean_sae", "KL(clean || with SAE)",
                                           root / layout.FRONTIER_KL, plt, swept, higher_is_better=False),
        layout.FRONTIER_ABSORPTION: _frontier_plot(rows, "absorption_first_letter_rate",
                                                   "first-letter absorption rate", root / layout.FRONTIER_ABSORPTION,
                                                   plt, swept, higher_is_better=False),
        layout.DENSITY_PLOT: _density_plot([(e.name, e.final, e.run_dir) for e in entries],
                                           root / layout.DENSITY_PLOT, plt),
        layout.CURVES_PLOT: _curves_plot([(e.name, e.run_dir) for e in entries], root / layout.CURVES_PLOT, plt),
    }
    atomic.write_json(root / layout.PLOTS_INDEX, drawn)  # which SAEs each plot shows
    log(format_table(rows, shown))
    log(UNITS_NOTE)
    log(f"summary: {root / layout.SUMMARY_CSV}, plots: {root}/*.png")
    return rows


def log_summary_to_wandb(project: str, entity: str | None, group: str, root: Path,
                         rows: list[dict[str, Any]]) -> None:
    """The sweep's table and plots as one more run of the sweep's wandb group."""
    import wandb

    run = wandb.init(project=project, entity=entity, group=group,
                     name=f"{group}-summary", job_type="summary", dir=str(root), reinit="create_new")
    keys = sorted({k for r in rows for k in r if not k.startswith("label")})
    run.log({"summary": wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows])})
    for name in layout.PLOTS:
        if (root / name).is_file():  # the CE frontier exists only after evaluation with the model
            run.log({f"plots/{Path(name).stem}": wandb.Image(str(root / name))})
    run.finish()
