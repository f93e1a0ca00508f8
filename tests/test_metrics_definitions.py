"""Every reconstruction metric of eval.json against its definition (docs/evaluate.md), computed here
by hand in float64 numpy from the held-out rows and the SAE's output, never with our helpers.

Two peer bugs are caught on purpose: a metric that depends on the batch size (an MSE scaled by
the batch, or a per-token explained variance centred on each batch's mean: the same rows in other
batch sizes must give the same figures), and an explained variance on data with a large mean
(pooled must divide by the variance around the mean, not by sum ||t||^2).
"""
from __future__ import annotations

import bisect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.dump_writer import write_dump
from shared.reader import open_dump
from shared.sae import SAEConfig, SparseAutoencoder
from train.evaluation.reconstruction import DENSITY_HIST_EDGES, density_histogram, reconstruction_metrics
from train.evaluation.run_eval import EvalConfig, evaluate_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

CONTEXT = 10
HOLDOUT = 4  # contexts: the dump's last 40 rows


def _sae(d_in: int, d_sae: int, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(d_in, d_sae))
    with torch.no_grad():
        sae.W_enc.normal_(0, d_in ** -0.5)
        sae.b_enc.uniform_(-0.3, 0.1)
        sae.b_dec.normal_(0, 0.1)
        sae.b_enc[:2] = -1e3  # never fire
        sae.b_enc[2:4] = 5.0  # always fire here (dense)
    return sae


def _data(n: int = 100, d: int = 8, mean: float = 3.0, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.5, 2, d) + mean


def by_hand(t: np.ndarray, t_hat: np.ndarray, acts: np.ndarray) -> dict:
    """Each metric from its one-line definition (t, t_hat: [rows, d] float64; acts: [rows, d_sae])."""
    n = t.shape[0]
    err = ((t - t_hat) ** 2).sum(1)  # ||t - t_hat||^2 per row
    var = ((t - t.mean(0)) ** 2).sum(1)  # ||t - mean(t)||^2 per row, mean over ALL rows
    t_norm, out_norm = np.linalg.norm(t, axis=1), np.linalg.norm(t_hat, axis=1)
    fired = (acts > 0).sum(0)
    density = fired / n
    keep = var > 0
    counts = [0] * (len(DENSITY_HIST_EDGES) - 1)
    for d in density[density > 0]:
        i = bisect.bisect_right(DENSITY_HIST_EDGES, max(math.log10(d), DENSITY_HIST_EDGES[0])) - 1
        counts[min(i, len(counts) - 1)] += 1  # the last bin is closed: density 1 lies in it
    return {
        "n_rows": n,
        "mse": err.sum() / n,
        "explained_variance": 1 - err.sum() / var.sum(),
        "explained_variance_per_token_mean": float(np.mean(1 - err[keep] / var[keep])),
        "cosine_similarity": float(np.mean((t * t_hat).sum(1) / (t_norm * out_norm))),
        "l2_norm_ratio": float(np.mean(out_norm / t_norm)),
        "relative_reconstruction_bias": (out_norm ** 2).sum() / (t * t_hat).sum(),
        "l0": (acts > 0).sum() / n,
        "frac_dead": float((fired == 0).mean()),
        "frac_dense": float((density > 0.1).mean()),
        "frac_density_below_1e-5": float((density < 1e-5).mean()),
        "frac_density_below_1e-6": float((density < 1e-6).mean()),
        "feature_density_hist_counts": counts,
        "feature_density_hist_never_fired": int((fired == 0).sum()),
    }


def _forward(sae: SparseAutoencoder, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        out = sae(x)
    return out.sae_out.double().numpy(), out.feature_acts.double().numpy()


def _check(got: dict, want: dict) -> None:
    for key, value in want.items():
        if isinstance(value, list):
            assert got[key] == value, key
        else:
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-6), key


def test_evaluate_reports_each_metric_as_defined(tmp_path):
    x = _data()
    write_dump(tmp_path / "d", x, context_size=CONTEXT, shard_rows=30)
    sae = _sae(8, 24)
    folder = sae.save(tmp_path / "sae", {"shards": str(tmp_path / "d"), "eval_holdout_contexts": HOLDOUT})
    got = evaluate_checkpoint(folder, EvalConfig(device="cpu", with_model=False))
    json.dumps(got)  # eval.json holds it as it is
    held = x[-HOLDOUT * CONTEXT:]
    t_hat, acts = _forward(sae, held)
    want = by_hand(held.double().numpy(), t_hat, acts)
    assert 0 < want["frac_dead"] < 1 and 0 < want["frac_dense"] < 1
    _check(got, want)
    assert got["feature_density_hist_edges"] == DENSITY_HIST_EDGES == [-10 + 0.5 * i for i in range(21)]
    assert sum(got["feature_density_hist_counts"]) + got["feature_density_hist_never_fired"] == 24
    # The two explained variances differ on these rows: they are two metrics, not one.
    assert abs(got["explained_variance"] - got["explained_variance_per_token_mean"]) > 1e-3
    # Every key has its line in docs/evaluate.md's table of eval.json.
    doc = (Path(__file__).parents[1] / "docs" / "evaluate.md").read_text()
    table = doc[doc.index("### What each key of eval.json means"):]
    table = table[:table.index("\n\n", table.index("| key |"))]
    assert not [k for k in got if f"`{k}`" not in table]


def test_metrics_do_not_depend_on_the_batch_size(tmp_path):
    x = _data(n=90, mean=5.0, seed=3)
    write_dump(tmp_path / "d", x, context_size=CONTEXT, shard_rows=40)
    dump = open_dump(tmp_path / "d")
    sae = _sae(8, 24, seed=4)
    t_hat, acts = _forward(sae, x[7:83])
    want = by_hand(x[7:83].double().numpy(), t_hat, acts)
    runs = [reconstruction_metrics(sae, dump, (7, 83), "cpu", chunk_rows=c) for c in (1, 4, 13, 76, 8192)]
    for got in runs:
        got.pop("density")
        _check(got, want)
        for key, value in got.items():  # and to each other (float32 forwards of other shapes)
            assert value == pytest.approx(runs[0][key], rel=1e-7, abs=1e-12), key
    # What the test guards against: centring each batch on its own mean (SAELens' legacy
    # explained variance) or summing per-batch mean errors gives figures that move with the batch.
    t = x[7:83].double().numpy()

    def peer_ev(batch: int) -> float:
        values = []
        for a in range(0, len(t), batch):
            b = t[a:a + batch]
            values += list(1 - ((b - t_hat[a:a + batch]) ** 2).sum(1) / ((b - b.mean(0)) ** 2).sum(1))
        return float(np.mean(values))

    assert abs(peer_ev(4) - peer_ev(76)) > 1e-2
    assert peer_ev(76) == pytest.approx(want["explained_variance_per_token_mean"], rel=1e-9)


def test_explained_variance_on_data_with_a_large_mean(tmp_path):
    """t_hat = t + c for a constant c: every row's error is ||c||^2. Pooled explained variance is
    1 - ||c||^2 / (mean variance per row), about 0.5 here; dividing by sum ||t||^2 instead (the
    mean left in) would give about 1 - 1e-7."""
    d, offset = 6, 1000.0
    x = _data(n=60, d=d, mean=offset, seed=5)
    write_dump(tmp_path / "d", x, context_size=CONTEXT, shard_rows=25)
    t = x[20:60].double().numpy()
    per_row_var = ((t - t.mean(0)) ** 2).sum(1).mean()
    c = np.full(d, math.sqrt(per_row_var / 2 / d))
    sae = SparseAutoencoder(SAEConfig(d, 2 * d))  # features [ReLU(x) + c, ReLU(-x)]: x_hat = x + c
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.copy_(torch.cat([torch.tensor(c, dtype=torch.float32), torch.zeros(d)]))
        sae.b_dec.zero_()
    got = reconstruction_metrics(sae, open_dump(tmp_path / "d"), (20, 60), "cpu", chunk_rows=9)
    t_hat, acts = _forward(sae, x[20:60])
    want = by_hand(t, t_hat, acts)
    _check(got, want)
    assert got["explained_variance"] == pytest.approx(0.5, abs=1e-3)
    assert 1 - ((t - t_hat) ** 2).sum() / (t ** 2).sum() > 0.999999  # the uncentred peer formula
    assert got["cosine_similarity"] > 0.999999 and got["l2_norm_ratio"] == pytest.approx(1.0, abs=1e-2)


def test_density_histogram_bins_by_hand():
    n = 1000
    fired = torch.tensor([0, 0, 1, 10, 100, 1000, 999, 316, 3, 2])
    got = density_histogram(fired, n)
    assert got["feature_density_hist_edges"] == DENSITY_HIST_EDGES
    assert got["feature_density_hist_never_fired"] == 2
    # log10 densities: -3, -2, -1, 0, -0.0004, -0.5003, -2.52, -2.70 -> bins [e, e + 0.5)
    want = [0] * 20
    for log_d in (-3, -2, -1, 0, math.log10(0.999), math.log10(0.316), math.log10(0.003), math.log10(0.002)):
        want[min(int((log_d + 10) // 0.5), 19)] += 1
    assert got["feature_density_hist_counts"] == want
    assert want[14] == 3 and want[19] == 2  # -3, -2.52, -2.70 in [-3, -2.5); 0 and -0.0004 the last bin
    tiny = density_histogram(torch.tensor([1]), 10 ** 12)  # density 1e-12: clipped into the first bin
    assert tiny["feature_density_hist_counts"][0] == 1
