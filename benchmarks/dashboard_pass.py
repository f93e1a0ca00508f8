"""Benchmark: the dashboard of every feature of an SAE, from its dump, against the budget.

    python benchmarks/dashboard_pass.py                      # the quickstart's SAE and dump
    python benchmarks/dashboard_pass.py --run data/runs/quickstart --out /tmp/dash

Prints, in one run: the rows and features, the time of the SAE's encoder alone over every row
(the floor: the pass cannot be faster than encoding the dump), the streaming statistics pass, the
decoder's nearest neighbours, and writing the files; then the pass's rows/s and its overhead over
the bare encoder. No language model is loaded (no logit table), so the figure is the pass itself.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from shared.reader import open_dump
from shared.run_paths import dump_path_for
from shared.saes import load_sae
from train.evaluation.dashboard import DashboardInputs, write_dashboard
from train.evaluation.feature_stats import feature_stats
from train.evaluation.geometry import decoder_neighbours


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", default="data/runs/quickstart", help="run folder (with final/)")
    ap.add_argument("--out", default=None, help="dashboard folder [a temporary one]")
    ap.add_argument("--chunk-rows", type=int, default=8192)
    args = ap.parse_args()
    final = Path(args.run) / "final"
    sae = load_sae(final)
    dump = open_dump(dump_path_for(final, json.loads((final / "cfg.json").read_text())))
    print(f"{dump.n_rows:,} rows of d_in {dump.d_in}; {sae.cfg.d_sae:,} features; "
          f"{torch.get_num_threads()} threads")

    t = time.perf_counter()
    with torch.inference_mode():
        for a in range(0, dump.n_rows, args.chunk_rows):
            sae.encode(dump.activations(a, min(a + args.chunk_rows, dump.n_rows)).float())
    encode_s = time.perf_counter() - t

    t = time.perf_counter()
    stats = feature_stats(sae, dump)
    pass_s = time.perf_counter() - t
    t = time.perf_counter()
    neighbours = decoder_neighbours(sae.W_dec.detach(), k=6)
    neighbours_s = time.perf_counter() - t
    t = time.perf_counter()
    out = Path(args.out or tempfile.mkdtemp()) / "dashboard"
    write_dashboard(out, DashboardInputs(stats, neighbours, None, {}, "benchmark", "", {}))
    write_s = time.perf_counter() - t
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())

    total = pass_s + neighbours_s + write_s
    print(f"{'step':<28}{'seconds':>9}")
    for name, s in (("encoder alone (floor)", encode_s), ("statistics pass", pass_s),
                    ("nearest neighbours", neighbours_s), ("write files", write_s), ("dashboard total", total)):
        print(f"{name:<28}{s:>9.1f}")
    print(f"pass: {dump.n_rows / pass_s:,.0f} rows/s, {pass_s / encode_s:.2f}x the encoder alone; "
          f"files {size / 1e6:.1f} MB in {out}")


if __name__ == "__main__":
    main()
