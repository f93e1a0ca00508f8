"""Did each SAE land at the L0 it was asked for? One markdown table and one frontier figure from
evaluated sweep folders (their summary.json, written by `evaluate SWEEP`, and each SAE's cfg.json).

    python benchmarks/target_l0.py data/runs/target_l0_l5 [MORE_SWEEPS ...] --plot docs/target_l0_frontier.png

The L0 asked for is `target_l0` (standard, gated, jumprelu: the coefficient is steered toward it)
or `k` (the TopK family); "off by" is the held-out L0 against it. The coefficient column is the
configured (starting) coefficient and the one the run ended with (`sparsity_coefficient_reached`).
Where `init_seed` is swept (`--seeds`), one row per architecture and asked L0 gives the mean and
the spread (min-max) across seeds of each figure instead.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from statistics import mean

ORDER = ("standard", "gated", "jumprelu", "topk", "batchtopk", "matryoshka_batchtopk")
COEFFICIENT = {"standard": "l1_coefficient", "gated": "l1_coefficient", "jumprelu": "l0_coefficient"}
FIGURES = (("eval_explained_variance", "explained variance"), ("ce_loss_recovered", "CE loss recovered"),
           ("kl_clean_sae", "KL(clean ‖ SAE)"))


def rows_of(folders: list[Path]) -> list[dict]:
    """Every SAE of the sweeps, with `asked` (its target L0 or k) and its final cfg.json's figures."""
    rows = []
    for folder in folders:
        if not (folder / "summary.json").is_file():
            raise SystemExit(f"{folder} has no summary.json: run evaluate {folder} first")
        for r in json.loads((folder / "summary.json").read_text()):
            if r.get("eval_l0") is None:
                raise SystemExit(f"{r['folder']} has no held-out L0: run evaluate {folder} first")
            cfg = json.loads((Path(r["folder"]) / "final" / "cfg.json").read_text())
            asked = cfg.get("target_l0") or cfg.get("k")
            rows.append(r | {"asked": float(asked), "cfg": cfg})
    return sorted(rows, key=lambda r: (ORDER.index(r["architecture"]), r["asked"], r["cfg"].get("init_seed") or 0))


def off_by(r: dict) -> float:
    return r["eval_l0"] / r["asked"] - 1


def fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def coefficient(r: dict) -> str:
    name = COEFFICIENT.get(r["architecture"])
    if name is None:
        return "- (k)"
    start, reached = r["cfg"].get(name), r["cfg"].get("sparsity_coefficient_reached")
    return f"{name.split('_')[0].upper()} {start:g} -> {reached:.2f}" if reached is not None else f"{start:g}"


def table(rows: list[dict]) -> str:
    lines = ["| architecture | L0 asked | held-out L0 | off by | explained variance | CE loss recovered | "
             "KL(clean ‖ SAE) | coefficient: start -> reached |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [r["architecture"], f"{r['asked']:g}", f"{r['eval_l0']:.1f}", f"{100 * off_by(r):+.1f}%",
                 *(fmt(r.get(k)) for k, _ in FIGURES), coefficient(r)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


SEED_FIGURES = (("eval_l0", "held-out L0", 1), ("eval_explained_variance", "explained variance", 3),
                ("ce_loss_recovered", "CE loss recovered", 3), ("kl_clean_sae", "KL(clean ‖ SAE)", 3),
                ("sparse_probing_top_1_accuracy", "1-sparse probe accuracy", 3),
                ("absorption_first_letter_f1", "first-letter F1", 3),
                ("absorption_first_letter_rate", "absorption rate", 3))
"""The seed table's columns, where any SAE has them (absorption and probing: evaluate's options)."""


def seed_table(rows: list[dict]) -> str:
    """Mean and min-max across seeds, per architecture and asked L0."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["architecture"], r["asked"]), []).append(r)
    shown = [f for f in SEED_FIGURES if any(r.get(f[0]) is not None for r in rows)]
    lines = ["| architecture | L0 asked | seeds | " + " | ".join(label for _, label, _ in shown) + " |",
             "|---|---|---|" + "---|" * len(shown)]
    for (arch, asked), group in groups.items():
        cells = [arch, f"{asked:g}", str(len(group))]
        for key, _, digits in shown:
            values = [g[key] for g in group if g.get(key) is not None]
            cells.append("-" if not values else
                         f"{mean(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    panels = [(k, label) for k, label in FIGURES if any(r.get(k) is not None for r in rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    asked = sorted({r["asked"] for r in rows})
    for ax, (key, label) in zip(axes[0], panels):
        for arch in ORDER:
            points = sorted((r["eval_l0"], r[key]) for r in rows if r["architecture"] == arch and r.get(key) is not None)
            if points:
                ax.plot(*zip(*points), marker="o", label=arch)
        for a in asked:  # where the points were asked to land
            ax.axvline(a, color="grey", linestyle=":", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xticks(asked, [f"{a:g}" for a in asked])
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel("held-out L0 (dotted: the L0 asked for)")
        ax.set_ylabel(label)
    axes[0][-1].legend(fontsize=8, loc="upper right")
    fig.suptitle("target_l0 x architecture: where each SAE landed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweeps", nargs="+", type=Path, help="evaluated sweep folders")
    p.add_argument("--plot", type=Path, help="write the frontier figure here (PNG)")
    p.add_argument("--seeds", action="store_true", help="one row per architecture and L0: mean (min-max) over seeds")
    a = p.parse_args()
    rows = rows_of(a.sweeps)
    print(seed_table(rows) if a.seeds else table(rows))
    if not a.seeds:
        worst = max(rows, key=lambda r: abs(off_by(r)))
        print(f"\nworst: {worst['architecture']} asked {worst['asked']:g}, off by {100 * off_by(worst):+.1f}%")
    if a.plot:
        plot(rows, a.plot)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
