"""Several dumps of one harvest pass read as one aligned stream (a transcoder's input and target),
dumps of different passes refused, and the training interface's input/target split: metrics
against the target, per-side scale folding, and the run plan with a target dump."""
from __future__ import annotations

import copy
import itertools
import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from conftest import write_token_dataset
from helpers import NARROW, SAME_WIDTH, WIDE, assert_aligned, harvest_pass
from shared import shard_files
from shared.errors import UserError
from shared.reader import open_dump
from shared.saes import SAEConfig, architecture_class
from shared.saes.base import StepContext
from train.batch import Batch
from train.loader import ActivationLoader, AlignedLoader
from train import same_pass
from train.same_pass import check_same_pass
from train.step import explained_variance, make_optimizer, train_step_

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory, vocab_size) -> Path:
    return write_token_dataset(tmp_path_factory.mktemp("ds") / "tokens", n_docs=100, doc_len=100,
                               vocab=vocab_size)


@pytest.fixture(scope="module")
def pair(tiny_model, big_dataset, tmp_path_factory) -> list[Path]:
    return harvest_pass(tiny_model, big_dataset, tmp_path_factory.mktemp("pair"))


def test_pair_of_one_pass_loads_as_one_aligned_stream(pair):
    dumps = [open_dump(p) for p in pair]
    assert [d.d_in for d in dumps] == [32, 128]
    loader = AlignedLoader(dumps, batch_size=100, seed=3, buffer_rows=1000, block_rows=8)
    batches = list(itertools.islice(loader.batches(), 25))  # across buffers
    assert assert_aligned(dumps, batches) == 2500
    # The order is the input dump's own: the single-dump loader's batches, row for row.
    alone = ActivationLoader(dumps[0], batch_size=100, seed=3, buffer_rows=1000, block_rows=8)
    for mine, single in zip(batches, itertools.islice(alone.batches(), 25)):
        assert torch.equal(mine[0], single)
    # A whole epoch visits every row of both once; a resume at batch k continues the same stream.
    epoch = list(itertools.islice(loader.batches(), loader.batches_per_epoch))
    assert sum(len(b[0]) for b in epoch) == dumps[0].n_rows
    resumed = next(AlignedLoader(dumps, batch_size=100, seed=3, buffer_rows=1000, block_rows=8).batches(17))
    assert all(torch.equal(a, b) for a, b in zip(resumed, batches[17]))


def test_pair_in_whole_chunk_reads_stays_aligned_whatever_the_widths(pair, monkeypatch):
    # Small chunks, so that they differ by width: 2048 rows at d_in 32, 1024 at 128 (a shard of
    # 2480 rows: chunks of 2048 + 432 rows in the narrow dump, 1024 + 1024 + 432 in the wide one).
    monkeypatch.setattr(shard_files, "REMOTE_CHUNK_BYTES", 1 << 18)
    monkeypatch.setenv("MATS_SAE_READ", "chunks")
    dumps = [open_dump(p) for p in pair]
    for order in (dumps, dumps[::-1]):
        loader = AlignedLoader(order, batch_size=128, seed=1, buffer_rows=2048)
        assert loader.whole_chunks
        assert [r._chunk_rows[0] for r in loader.readers] == ([2048, 1024] if order is dumps else [1024, 2048])
        starts, lens = loader._blocks()
        # The narrow dump's chunks (cut at every shard boundary): the same blocks in either order.
        assert list(lens) == [2048, 432] * 3 + [310]
        assert assert_aligned(order, list(itertools.islice(loader.batches(), 20))) == 20 * 128
    wide_first = AlignedLoader(dumps[::-1], batch_size=128, seed=1, buffer_rows=2048)
    narrow_first = AlignedLoader(dumps, batch_size=128, seed=1, buffer_rows=2048)
    for a, b in zip(itertools.islice(narrow_first.batches(), 10), itertools.islice(wide_first.batches(), 10)):
        assert torch.equal(a[0], b[1]) and torch.equal(a[1], b[0])  # the order ignores which is first


def test_single_dump_whole_chunk_order_is_unchanged_by_the_aligned_grid(pair, monkeypatch):
    # With the dump of the largest chunks first, the aligned order is that dump's own order.
    monkeypatch.setattr(shard_files, "REMOTE_CHUNK_BYTES", 1 << 18)
    monkeypatch.setenv("MATS_SAE_READ", "chunks")
    dumps = [open_dump(p) for p in pair]
    alone = ActivationLoader(dumps[0], batch_size=128, seed=1, buffer_rows=2048)
    aligned = AlignedLoader(dumps, batch_size=128, seed=1, buffer_rows=2048)
    for single, both in zip(itertools.islice(alone.batches(), 12), itertools.islice(aligned.batches(), 12)):
        assert torch.equal(single, both[0])


def test_data_parallel_shares_of_an_aligned_stream_are_its_global_batches(pair):
    dumps = [open_dump(p) for p in pair]
    make = lambda share=None: AlignedLoader(dumps, batch_size=100, seed=5, buffer_rows=1000, share=share)
    whole = list(itertools.islice(make().batches(), 12))
    parts = [list(itertools.islice(make((rank, 3)).batches(), 12)) for rank in range(3)]
    for i, batch in enumerate(whole):
        for side in range(2):
            torch.testing.assert_close(torch.cat([p[i][side] for p in parts]), batch[side], rtol=0, atol=0)


def test_dumps_of_different_passes_are_refused_in_one_line(tiny_model, big_dataset, pair, tmp_path, vocab_size,
                                                           monkeypatch):
    narrow = open_dump(pair[0])
    # The same settings harvested again: a different pass_id.
    [again] = harvest_pass(tiny_model, big_dataset, tmp_path / "again", hooks=(WIDE,))
    with pytest.raises(UserError, match=r"pass_id [0-9a-f]{32} != [0-9a-f]{32}") as e:
        AlignedLoader([narrow, open_dump(again)], batch_size=10, seed=0)
    assert "\n" not in str(e.value) and "one harvest pass" in str(e.value)
    # Another dataset (pass_ids unknown, as in older dumps): the manifests say so.
    other_ds = write_token_dataset(tmp_path / "other_ds", n_docs=100, doc_len=100, vocab=vocab_size, seed=1)
    [other] = harvest_pass(tiny_model, other_ds, tmp_path / "other", hooks=(WIDE,), pass_ids=False)
    with pytest.raises(UserError, match="dataset .* != ") as e:
        check_same_pass([narrow, open_dump(other)])
    assert "\n" not in str(e.value)
    # The same dataset path holding other tokens: only the columns show it.
    ds = tmp_path / "reused_ds"
    write_token_dataset(ds, n_docs=100, doc_len=100, vocab=vocab_size, seed=2)
    [first] = harvest_pass(tiny_model, ds, tmp_path / "first", hooks=(NARROW,), pass_ids=False)
    shutil.rmtree(ds)
    write_token_dataset(ds, n_docs=100, doc_len=100, vocab=vocab_size, seed=3)
    [second] = harvest_pass(tiny_model, ds, tmp_path / "second", hooks=(WIDE,), pass_ids=False)
    with pytest.raises(UserError, match="tokens differ at row") as e:
        AlignedLoader([open_dump(first), open_dump(second)], batch_size=10, seed=0)
    assert "\n" not in str(e.value)
    # Larger dumps are compared on their shard boundaries and a sample: caught there too.
    monkeypatch.setattr(same_pass, "WHOLE_CHECK_ROWS", 1000)
    with pytest.raises(UserError, match="tokens differ at row"):
        check_same_pass([open_dump(first), open_dump(second)])
    check_same_pass([open_dump(p) for p in pair])


def test_column_check_covers_every_shard_boundary_of_large_dumps(pair, monkeypatch):
    dumps = [open_dump(p) for p in pair]
    assert same_pass.checked_ranges(*dumps) == [(0, dumps[0].n_rows)]  # small: whole
    monkeypatch.setattr(same_pass, "WHOLE_CHECK_ROWS", 1000)
    ranges = same_pass.checked_ranges(*dumps)
    covered = {r for a, b in ranges for r in range(a, b)}
    for i in range(dumps[0].n_shards):
        lo, hi = dumps[0].shard_range(i)
        assert {lo, hi - 1} <= covered
    assert len(covered) < dumps[0].n_rows  # a sample, not every row
    started = time.perf_counter()
    check_same_pass(dumps)
    assert time.perf_counter() - started < 5.0


def test_step_metrics_are_against_the_target():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    mix = torch.randn(8, 8, generator=g)
    target = x @ mix + 0.5  # a fixed affine map of the input, not the input
    cls = architecture_class("standard")
    torch.manual_seed(0)
    sae = cls(SAEConfig(d_in=8, d_sae=16), cls.settings_from({"l1_coefficient": 0.01}))
    with torch.no_grad():
        sae.b_dec.copy_(torch.randn(8, generator=g))
    before = copy.deepcopy(sae)
    result = train_step_(sae, make_optimizer(sae, 1e-3), None, Batch(x, target), StepContext())
    with torch.no_grad():
        x_hat = before(x).sae_out
    sse = (target - x_hat).pow(2).sum()
    total = (target - target.mean(dim=0)).pow(2).sum()
    torch.testing.assert_close(result.sum_sq_err, sse)
    torch.testing.assert_close(result.sum_sq_total, total)
    torch.testing.assert_close(explained_variance(result.sum_sq_err, result.sum_sq_total), 1 - sse / total)
    torch.testing.assert_close(result.l2_ratio, (x_hat.norm(dim=1) / target.norm(dim=1)).mean())
    torch.testing.assert_close(result.losses["mse"], sse / 64)
    # Against the input instead, the error would be another number: the target was used.
    assert not torch.allclose(result.sum_sq_err, (x - x_hat).pow(2).sum())


def test_sae_with_a_tensor_batch_trains_exactly_as_with_its_own_target():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g)
    cls = architecture_class("topk")
    torch.manual_seed(0)
    a = cls(SAEConfig(d_in=8, d_sae=32), cls.settings_from({"k": 4}))
    b = copy.deepcopy(a)
    ra = train_step_(a, make_optimizer(a, 1e-3), None, x)
    rb = train_step_(b, make_optimizer(b, 1e-3), None, Batch(x, x.clone()))
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert torch.equal(ra.sum_sq_err, rb.sum_sq_err)


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "gated"])
def test_per_side_fold_gives_the_raw_targets_reconstruction(architecture):
    """Trained on inputs a x and targets b t, folded: on raw x the SAE gives the trained output / b
    (the raw target's scale), with the same features."""
    g = torch.Generator().manual_seed(2)
    cls = architecture_class(architecture)
    torch.manual_seed(0)
    sae = cls(SAEConfig(d_in=6, d_sae=12), cls.settings_from({"k": 4}))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
    x = torch.randn(20, 6, generator=g)
    a, b = 2.5, 0.4
    with torch.no_grad():
        trained = sae(a * x)
        folded = copy.deepcopy(sae)
        folded.fold_scaling_(a, b)
        got = folded(x)
    torch.testing.assert_close(got.feature_acts, trained.feature_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sae_out, trained.sae_out / b, rtol=1e-5, atol=1e-5)
    assert (folded.input_scale_folded, folded.target_scale_folded) == (a, b)


def test_per_side_fold_by_hand():
    """A 1-d, 1-feature standard SAE: every number checked by hand."""
    cls = architecture_class("standard")
    sae = cls(SAEConfig(d_in=1, d_sae=1))
    with torch.no_grad():
        sae.W_enc.fill_(2.0), sae.b_enc.fill_(0.5), sae.W_dec.fill_(3.0), sae.b_dec.fill_(1.0)
    # Trained on x' = 2x, t' = 4t: f = relu((2x - 1) 2 + 0.5); t_hat' = 3f + 1; raw t_hat = t_hat' / 4.
    sae.fold_scaling_(2.0, 4.0)
    # W_enc' = 4, b_dec' = 1/4, W_dec' = 3/4, b_enc' = 0.5 + (2/4 - 1) * 1 * 2 = -0.5.
    assert [float(t.detach()) for t in (sae.W_enc, sae.b_dec, sae.W_dec, sae.b_enc)] == [4.0, 0.25, 0.75, -0.5]
    x = torch.tensor([[1.5]])
    f = max(0.0, (2 * 1.5 - 1) * 2 + 0.5)  # 4.5
    assert float(sae(x).sae_out.detach()) == pytest.approx((3 * f + 1) / 4)


def test_shape_d_out_is_refused_by_the_sae_architectures_and_not_saved(tmp_path):
    cls = architecture_class("standard")
    with pytest.raises(UserError, match=r"reconstructs its input: d_out \(5\) must equal d_in \(4\)"):
        cls(SAEConfig(d_in=4, d_sae=8, d_out=5))
    sae = cls(SAEConfig(d_in=4, d_sae=8))
    assert sae.cfg.d_out == 4
    folder = sae.save(tmp_path / "sae")
    assert "d_out" not in json.loads((folder / "cfg.json").read_text())  # SAELens' plain SAE has none
    x = torch.randn(3, 4)
    with pytest.raises(UserError, match="target of shape"):
        sae.training_forward(x, StepContext(), torch.randn(3, 5))


# ---- the run plan -------------------------------------------------------------------------------
def _cfg(shards: Path, tmp_path: Path, **kw):
    from train.config import LanguageModelSAERunnerConfig

    base = dict(shards=str(shards), d_sae=64, train_batch_size=128, total_training_tokens=128 * 12,
                lr=1e-3, l1_coefficient=0.01, device="cpu", feature_sampling_method="anthropic",
                feature_sampling_window=5, dead_feature_window=2, resample_sample_rows=256,
                wandb_log_frequency=3, normalize_activations="expected_norm", b_dec_init_method="mean",
                checkpoint_path=str(tmp_path / "run"), eval_holdout_contexts=4)
    return LanguageModelSAERunnerConfig(**(base | kw))


def test_plan_with_a_target_dump_trains_against_it(tiny_model, big_dataset, tmp_path):
    from train.run import check_resume, make_slot, plan_data, run_slots
    from train.checkpoint import read_state

    source, target = harvest_pass(tiny_model, big_dataset, tmp_path / "dumps", hooks=(NARROW, SAME_WIDTH))
    cfg = _cfg(source, tmp_path)
    data = plan_data(cfg, verify=False, target_shards=target)
    assert data.paired and isinstance(data.loader, AlignedLoader)
    assert data.input_scale != data.target_scale  # each side from its own dump's statistics
    assert data.ident["target"]["hook_point"] == SAME_WIDTH and data.ident["hook_point"] == NARROW
    # The SAE alone: the identity it always had, with no target.
    alone = plan_data(cfg, verify=False)
    assert not alone.paired and "target" not in alone.ident
    assert plan_data(cfg, verify=False, target_shards=source).ident == alone.ident

    slot = make_slot(cfg, data, tmp_path / "run", "pair", None)
    assert (slot.trainer.input_scale, slot.trainer.target_scale) == (data.input_scale, data.target_scale)
    [final] = run_slots([slot], data, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("explained_variance" in r for r in rows)
    cfg_json = json.loads((final / "cfg.json").read_text())
    assert cfg_json["target"]["hook_point"] == SAME_WIDTH and "d_out" not in cfg_json

    # The saved (folded) SAE on raw inputs gives the trained SAE's output in raw target units.
    from shared.saes import load_sae

    saved = load_sae(final)
    x = open_dump(source).activations(0, 50).float()
    with torch.no_grad():
        want = slot.trainer.sae(x * data.input_scale).sae_out / data.target_scale
        torch.testing.assert_close(saved(x).sae_out, want, rtol=1e-4, atol=1e-4)

    # Resuming with another target, or none, is refused in one line.
    state = read_state(final)
    check_resume(state, data.ident, final)
    with pytest.raises(UserError, match="different target") as e:
        check_resume(state, alone.ident, final)
    assert "\n" not in str(e.value)


def test_reconstruction_metrics_against_a_target_dump(tiny_model, big_dataset, tmp_path):
    from train.evaluation.reconstruction import reconstruction_metrics

    source, target = (open_dump(p) for p in harvest_pass(tiny_model, big_dataset, tmp_path / "d",
                                                           hooks=(NARROW, SAME_WIDTH), tokens=2000))
    cls = architecture_class("standard")
    torch.manual_seed(0)
    sae = cls(SAEConfig(d_in=32, d_sae=64))
    got = reconstruction_metrics(sae, source, (10, 300), "cpu", chunk_rows=64, target=target)
    x, t = source.activations(10, 300).float().double(), target.activations(10, 300).float().double()
    with torch.no_grad():
        x_hat = sae(x.float()).sae_out.double()
    sse = float((t - x_hat).pow(2).sum())
    total = float((t - t.mean(0)).pow(2).sum())
    assert got["explained_variance"] == pytest.approx(1 - sse / total, rel=1e-6)
    assert got["mse"] == pytest.approx(sse / 290, rel=1e-6)
    assert got["l2_norm_ratio"] == pytest.approx(float((x_hat.norm(dim=1) / t.norm(dim=1)).mean()), rel=1e-6)
