"""Feature statistics for dashboards: every number equals a brute-force computation written here.

The SAE and the activations are small dyadic rationals, so every activation is exact in float32
whatever the chunking, and the pass's results can be compared with equality.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.dump_writer import write_dump
from shared.errors import UserError
from shared.reader import open_dump
from shared.sae import SAEConfig, SparseAutoencoder
from train.evaluation.feature_stats import FeatureStatsConfig, feature_stats
from train.evaluation.geometry import decoder_neighbours, duplicate_fraction
from train.evaluation.logit_table import logit_effects, unembedding

pytestmark = pytest.mark.usefixtures("one_thread_module")

D_IN, D_SAE, CONTEXT, N_CONTEXTS = 8, 24, 10, 30


def dyadic_sae(seed: int = 0) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(seed)
    sae = SparseAutoencoder(SAEConfig(D_IN, D_SAE))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randint(-4, 5, (D_IN, D_SAE), generator=g) / 4)
        sae.b_enc.copy_(torch.randint(-8, 3, (D_SAE,), generator=g) / 8)
        sae.b_dec.copy_(torch.randint(-2, 3, (D_IN,), generator=g) / 8)
        sae.b_enc[0] = -100.0  # feature 0 never fires
    return sae


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(-8, 9, (CONTEXT * N_CONTEXTS, D_IN), generator=g) / 8
    tokens = torch.randint(0, 50, (x.shape[0],), generator=g).numpy().astype(np.int32)
    folder = tmp_path_factory.mktemp("fs") / "d"
    write_dump(folder, x, context_size=CONTEXT, shard_rows=70, tokens=tokens)  # shards cut contexts
    sae = dyadic_sae()
    with torch.no_grad():
        acts = sae.encode(x)  # [rows, d_sae], exact
    return open_dump(folder), sae, acts, tokens


CFG = FeatureStatsConfig(top_k=5, samples=7, window_before=3, window_after=2, hist_bins=8, chunk_rows=25)


def brute_window(acts: torch.Tensor, tokens: np.ndarray, row: int, f: int) -> tuple[list[float], list[int]]:
    start = row // CONTEXT * CONTEXT
    window_acts, window_tokens = [], []
    for r in range(row - CFG.window_before, row + CFG.window_after + 1):
        inside = start <= r < start + CONTEXT
        window_acts.append(float(acts[r, f]) if inside else 0.0)
        window_tokens.append(int(tokens[r]) if inside else -1)
    return window_acts, window_tokens


def test_counts_max_mean_and_histogram_equal_brute_force(data):
    dump, sae, acts, _ = data
    stats = feature_stats(sae, dump, CFG)
    assert stats.n_rows == acts.shape[0]
    for f in range(D_SAE):
        v = acts[:, f][acts[:, f] > 0].double().numpy()
        assert int(stats.fired[f]) == len(v)
        assert float(stats.density[f]) == len(v) / acts.shape[0]
        if len(v) == 0:
            assert float(stats.act_max[f]) == 0 and int(stats.hist_counts[f].sum()) == 0
            continue
        assert float(stats.act_max[f]) == v.max()
        assert float(stats.mean_when_firing[f]) == pytest.approx(v.mean(), rel=1e-12)
        top = 2.0 ** (np.floor(np.log2(v.max())) + 1)  # the smallest power of two above the max
        assert float(stats.hist_top[f]) == top
        want = np.bincount(np.floor(v * CFG.hist_bins / top).astype(int), minlength=CFG.hist_bins)
        assert stats.hist_counts[f].tolist() == want.tolist()
    assert int(stats.fired[0]) == 0 and int(stats.fired.sum()) > 0


def test_top_examples_and_their_windows_equal_brute_force(data):
    dump, sae, acts, tokens = data
    stats = feature_stats(sae, dump, CFG)
    for f in range(D_SAE):
        column = acts[:, f]
        want = sorted(column[column > 0].tolist(), reverse=True)[: CFG.top_k]
        rows = [r for r in stats.top.rows[f].tolist() if r >= 0]
        assert len(rows) == len(want) and len(set(rows)) == len(rows)
        got = stats.top.acts[f, : len(rows)].tolist()
        assert got == want  # ties may pick other rows, but with these very values
        for j, row in enumerate(rows):
            assert float(column[row]) == got[j]
            window_acts, window_tokens = brute_window(acts, tokens, row, f)
            assert stats.top.window_acts[f, j].tolist() == window_acts
            assert stats.top.window_tokens[f, j].tolist() == window_tokens


def test_samples_are_distinct_firing_rows_with_windows_and_reproducible(data):
    dump, sae, acts, tokens = data
    stats = feature_stats(sae, dump, CFG)
    for f in range(D_SAE):
        firing = set((acts[:, f] > 0).nonzero().flatten().tolist())
        rows = [r for r in stats.sample.rows[f].tolist() if r >= 0]
        assert len(rows) == min(CFG.samples, len(firing)) and len(set(rows)) == len(rows)
        assert set(rows) <= firing
        for j, row in enumerate(rows):
            assert float(stats.sample.acts[f, j]) == float(acts[row, f])
            window_acts, window_tokens = brute_window(acts, tokens, row, f)
            assert stats.sample.window_acts[f, j].tolist() == window_acts
            assert stats.sample.window_tokens[f, j].tolist() == window_tokens
    again = feature_stats(sae, dump, CFG)
    assert torch.equal(again.sample.rows, stats.sample.rows)


def test_samples_cover_the_firing_rows_uniformly(tmp_path):
    """One feature firing on every row, 7 of 300 rows sampled per run, 150 seeds: a biased
    reservoir (e.g. favouring late chunks) shows as a large gap between the draws from the first
    and the second half of the rows (seeded, so the outcome is fixed)."""
    x = torch.ones(CONTEXT * N_CONTEXTS, D_IN)
    write_dump(tmp_path / "d", x, context_size=CONTEXT, shard_rows=300)
    dump = open_dump(tmp_path / "d")
    sae = SparseAutoencoder(SAEConfig(D_IN, 2))
    with torch.no_grad():
        sae.b_enc.fill_(1.0)
    counts = np.zeros(x.shape[0])
    for seed in range(150):
        cfg = FeatureStatsConfig(top_k=1, samples=7, chunk_rows=30, seed=seed)
        rows = feature_stats(sae, dump, cfg).sample.rows[0]
        counts[rows.numpy()] += 1
    assert counts.sum() == 150 * 7
    first, second = counts[:150].sum(), counts[150:].sum()
    assert abs(first - second) < 0.1 * counts.sum()  # one sd of the gap is ~32 of 1050


def test_memory_stays_bounded_on_a_dump_larger_than_a_chunk(data, tmp_path):
    """Each read is at most one chunk, and the state's size does not grow with the dump."""
    dump, sae, acts, _ = data
    reads: list[int] = []
    original = dump.activations

    def recording(start: int, stop: int) -> torch.Tensor:
        reads.append(stop - start)
        return original(start, stop)

    dump.activations = recording  # type: ignore[method-assign]
    small = feature_stats(sae, dump, CFG, rows=(0, 100))
    big = feature_stats(sae, dump, CFG)
    dump.activations = original  # type: ignore[method-assign]
    assert max(reads) <= CFG.chunk_rows and len(reads) == 100 // 20 + acts.shape[0] // 20

    def state_bytes(s) -> int:
        tensors = [s.fired, s.act_sum, s.act_max, s.hist_counts, s.hist_top, *vars(s.top).values(),
                   *vars(s.sample).values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    assert state_bytes(small) == state_bytes(big)


def test_bad_settings_and_ranges_are_refused(data):
    dump, sae, _, _ = data
    with pytest.raises(UserError, match="power of two"):
        FeatureStatsConfig(hist_bins=6)
    with pytest.raises(UserError, match="whole contexts"):
        feature_stats(sae, dump, CFG, rows=(3, 40))


def test_decoder_neighbours_equal_brute_force():
    torch.manual_seed(0)
    W = torch.randn(40, 6)
    W[7] = 3 * W[2] + 0.01 * torch.randn(6)  # a near-duplicate pair
    cos, idx = decoder_neighbours(W, k=3, chunk=9)
    unit = W / W.norm(dim=1, keepdim=True)
    full = unit @ unit.T
    full.fill_diagonal_(-2)
    want = full.topk(3, dim=1)
    assert torch.equal(idx, want.indices)
    assert torch.allclose(cos, want.values, atol=1e-6)
    assert idx[7, 0] == 2 and idx[2, 0] == 7
    assert duplicate_fraction(cos[:, 0]) == float((want.values[:, 0] > 0.9).double().mean())
    assert duplicate_fraction(cos[:, 0]) >= 2 / 40


def test_logit_table_equals_decoder_times_unembedding(tiny_model):
    from shared.models import load_model

    model = load_model(str(tiny_model), "cpu")
    W_U = unembedding(model)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_model)
    folded = hf.transformer.ln_f.weight.detach().unsqueeze(1) * hf.lm_head.weight.detach().T
    assert torch.allclose(W_U, folded, atol=1e-6)
    torch.manual_seed(0)
    W_dec = torch.randn(13, W_U.shape[0])
    got = logit_effects(W_dec, W_U, k=4, chunk=5)
    for f in range(13):
        logits = W_dec[f] @ W_U
        order = torch.argsort(logits, descending=True)
        assert got["top_tokens"][f].tolist() == order[:4].tolist()
        assert got["bottom_tokens"][f].tolist() == order.flip(0)[:4].tolist()
        assert torch.allclose(got["top_values"][f], logits[order[:4]], atol=1e-5)
    with pytest.raises(UserError, match="no direct path"):
        logit_effects(torch.randn(3, W_U.shape[0] + 1), W_U)
