"""The architectures compared at equal L0: one markdown table and one frontier figure from the
evaluated sweep folders (their summary.json, written by `evaluate SWEEP`).

    python benchmarks/architecture_quality.py data/runs/arch_quality [MORE_SWEEPS ...] \\
        --plot docs/architectures_frontier.png

One line per architecture (standard, gated, jumprelu: their coefficient sets L0; the TopK family:
k does), L0 on held-out rows against explained variance, CE loss recovered and KL(clean || SAE).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

SETTING = {"standard": "l1_coefficient", "gated": "l1_coefficient", "jumprelu": "l0_coefficient",
           "topk": "k", "batchtopk": "k", "matryoshka_batchtopk": "k"}
PANELS = (("eval_explained_variance", "explained variance"), ("ce_loss_recovered", "CE loss recovered"),
          ("kl_clean_sae", "KL(clean || with SAE)"))


def rows_of(folders: list[Path]) -> list[dict]:
    """Every SAE of the sweeps; a later sweep's SAE replaces an earlier one with the same
    architecture and setting (a re-run after a fix)."""
    rows: dict[tuple, dict] = {}
    for folder in folders:
        for r in json.loads((folder / "summary.json").read_text()):
            rows[(r["architecture"], r[SETTING[r["architecture"]]])] = r
    return sorted(rows.values(), key=lambda r: (list(SETTING).index(r["architecture"]), r.get("eval_l0") or 0))


def table(rows: list[dict]) -> str:
    lines = ["| architecture | setting | L0 | explained variance | CE loss recovered | KL(clean ‖ SAE) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        key = SETTING[r["architecture"]]
        cells = [r.get("eval_l0"), r.get("eval_explained_variance"), r.get("ce_loss_recovered"), r.get("kl_clean_sae")]
        shown = ["-" if v is None else f"{v:.1f}" if i == 0 else f"{v:.3f}" for i, v in enumerate(cells)]
        lines.append(f"| {r['architecture']} | {key} {r[key]:g} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (key, label) in zip(axes, PANELS):
        for n, arch in enumerate(SETTING):
            pts = sorted((r["eval_l0"], r[key]) for r in rows if r["architecture"] == arch
                         and r.get("eval_l0") is not None and r.get(key) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{n}", label=arch)
        ax.set_xscale("log")
        ax.set_xlabel("L0 on held-out rows")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweeps", nargs="+", type=Path)
    p.add_argument("--plot", type=Path, default=None)
    a = p.parse_args()
    rows = rows_of(a.sweeps)
    print(table(rows))
    if a.plot:
        plot(rows, a.plot)
        print(f"plot: {a.plot}")


if __name__ == "__main__":
    main()
