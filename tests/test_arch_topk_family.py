"""The TopK family: `topk` (Gao et al. 2024), `batchtopk` (Bussmann et al. 2024) and
`matryoshka_batchtopk` (Bussmann et al. 2025). Every expected value here is computed independently
of the modules' helpers (sorts instead of top-k, loops instead of gathers)."""
from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from shared.errors import UserError
from shared.saes.base import SAEConfig, StepContext
from shared.saes.batchtopk import BatchTopKSAE, BatchTopKSettings, batch_topk_selection
from shared.saes.io import load_sae
from shared.saes.matryoshka import MatryoshkaBatchTopKSAE, MatryoshkaBatchTopKSettings
from shared.saes.registry import ARCHITECTURES
from shared.saes.topk import TopKSAE, TopKSettings
from train.step import make_optimizer, train_step_

ARCHS = [TopKSAE, BatchTopKSAE, MatryoshkaBatchTopKSAE]
IDS = [cls.architecture for cls in ARCHS]


pytestmark = pytest.mark.usefixtures("one_thread")


def make(cls, d_in: int = 8, d_sae: int = 32, seed: int = 0, **settings):
    """An SAE of `cls` with random biases (so b_enc and b_dec matter in every formula)."""
    torch.manual_seed(seed)
    sae = cls(SAEConfig(d_in=d_in, d_sae=d_sae), cls.Settings(**settings))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        sae.b_enc.copy_(0.3 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(torch.randn(d_in, generator=g))
        sae.W_enc.copy_(torch.randn(d_in, d_sae, generator=g))
    return sae


def batch(rows: int, d_in: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, d_in, generator=torch.Generator().manual_seed(seed))


# --- independent references --------------------------------------------------------------------

def ref_pre(sae, x):
    return (x - sae.b_dec) @ sae.W_enc + sae.b_enc


def keep_largest(values: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the n largest entries of a 1-D tensor (by a full sort)."""
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[torch.sort(values, descending=True).indices[:n]] = True
    return mask


def ref_topk_acts(h: torch.Tensor, k: int) -> torch.Tensor:
    return torch.stack([torch.relu(row) * keep_largest(row, k) for row in h])


def ref_batchtopk_acts(h: torch.Tensor, k: int) -> torch.Tensor:
    acts = torch.relu(h)
    return acts * keep_largest(acts.flatten(), k * h.shape[0]).reshape(h.shape)


def ref_train_acts(sae, x):
    h = ref_pre(sae, x)
    if isinstance(sae, BatchTopKSAE):
        return ref_batchtopk_acts(h, sae.settings.k)
    return ref_topk_acts(h, sae.settings.k)


def ref_inference_acts(sae, x):
    h = ref_pre(sae, x)
    if isinstance(sae, BatchTopKSAE):
        return torch.where(h > sae.threshold, torch.relu(h), torch.zeros_like(h))
    return ref_topk_acts(h, sae.settings.k)


def mean_sq(a, b):
    return ((a - b) ** 2).sum(dim=1).mean()


def ref_auxk(sae, x, x_hat, dead: torch.Tensor, aux_k: int, coefficient: float):
    """coefficient * mean_rows ||e_hat - e||^2, e_hat from each row's aux_k largest pre-activations
    among the dead latents (all of them if fewer), ReLU'd; 0 if none is dead."""
    dead_idx = torch.nonzero(dead).flatten().tolist()
    if not dead_idx:
        return torch.tensor(0.0)
    h = ref_pre(sae, x)
    e = (x - x_hat).detach()
    e_hat = torch.zeros_like(x)
    for r in range(x.shape[0]):
        ranked = sorted(dead_idx, key=lambda j: -h[r, j].item())[:aux_k]
        for j in ranked:
            e_hat[r] += torch.relu(h[r, j]) * sae.W_dec[j]
    return coefficient * mean_sq(e_hat, e)


# --- encode / decode / losses -----------------------------------------------------------------

@pytest.mark.parametrize("cls", ARCHS, ids=IDS)
def test_encode_decode_match_reference(cls):
    sae = make(cls, k=4)
    if isinstance(sae, BatchTopKSAE):
        sae.threshold.fill_(0.8)
    x = batch(16, 8)
    f = sae.encode(x)
    torch.testing.assert_close(f, ref_inference_acts(sae, x))
    assert (f > 0).any() and (f >= 0).all()
    if cls is TopKSAE:
        assert ((f > 0).sum(dim=1) <= 4).all()
    torch.testing.assert_close(sae.decode(f), f @ sae.W_dec + sae.b_dec)
    out = sae(x)
    torch.testing.assert_close(out.sae_out, f @ sae.W_dec + sae.b_dec)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("cls", ARCHS, ids=IDS)
def test_training_losses_match_reference(cls, sparse):
    extra = {"matryoshka_widths": [4, 12]} if cls is MatryoshkaBatchTopKSAE else {}
    # 5 dead latents, aux_k 3 (< dead) and 8 (> dead: all dead are used)
    for aux_k in (3, 8):
        sae = make(cls, k=3, aux_k=aux_k, aux_loss_coefficient=0.25, sparse_decode=sparse, **extra)
        x = batch(12, 8)
        dead = torch.zeros(32, dtype=torch.bool)
        dead[[1, 7, 8, 20, 31]] = True
        out = sae.training_forward(x, StepContext(dead_mask=dead))
        with torch.no_grad():
            f = ref_train_acts(sae, x)
            x_hat = f @ sae.W_dec + sae.b_dec
            torch.testing.assert_close(out.feature_acts, f)
            torch.testing.assert_close(out.sae_out, x_hat)
            expected = {"mse": mean_sq(x, x_hat),
                        "auxk_loss": ref_auxk(sae, x, x_hat, dead, aux_k, 0.25)}
            if cls is MatryoshkaBatchTopKSAE:
                for m in (4, 12):
                    expected[f"inner_mse_{m}"] = mean_sq(x, f[:, :m] @ sae.W_dec[:m] + sae.b_dec)
        assert set(out.losses) == set(expected)
        for name, value in expected.items():
            torch.testing.assert_close(out.losses[name], value, msg=name)
        assert out.losses["auxk_loss"] > 0
        torch.testing.assert_close(out.loss, sum(expected.values()))


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("cls", ARCHS, ids=IDS)
def test_auxk_is_zero_when_nothing_is_dead(cls, sparse):
    sae = make(cls, k=3, sparse_decode=sparse)
    x = batch(12, 8)
    for dead in (None, torch.zeros(32, dtype=torch.bool)):
        out = sae.training_forward(x, StepContext(dead_mask=dead))
        assert "auxk_loss" in out.losses and out.losses["auxk_loss"].item() == 0.0
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in sae.parameters())
        sae.zero_grad()


def grads(sae, x, dead, drop_auxk: bool = False):
    sae.zero_grad()
    out = sae.training_forward(x, StepContext(dead_mask=dead))
    (out.loss - out.losses["auxk_loss"] if drop_auxk else out.loss).backward()
    return {name: p.grad.clone() for name, p in sae.named_parameters()}, out


@pytest.mark.parametrize("cls", ARCHS, ids=IDS)
def test_sparse_and_dense_paths_agree(cls):
    extra = {"matryoshka_widths": [16, 64]} if cls is MatryoshkaBatchTopKSAE else {}
    dense = make(cls, d_in=16, d_sae=128, k=4, aux_k=6, sparse_decode=False, **extra)
    sparse = copy.deepcopy(dense)
    sparse.settings.sparse_decode = True
    assert sparse.sparse_decode and not dense.sparse_decode
    x = batch(40, 16)
    dead = torch.rand(128, generator=torch.Generator().manual_seed(5)) < 0.3
    g_dense, out_dense = grads(dense, x, dead)
    g_sparse, out_sparse = grads(sparse, x, dead)
    torch.testing.assert_close(out_sparse.feature_acts, out_dense.feature_acts)
    torch.testing.assert_close(out_sparse.sae_out, out_dense.sae_out)
    assert out_sparse.losses.keys() == out_dense.losses.keys()
    for name in out_dense.losses:
        torch.testing.assert_close(out_sparse.losses[name], out_dense.losses[name], msg=name)
    for name in g_dense:
        torch.testing.assert_close(g_sparse[name], g_dense[name], msg=name)


def test_sparse_decode_auto_follows_the_shape():
    assert TopKSAE(SAEConfig(8, 256), TopKSettings(k=32)).sparse_decode
    assert not TopKSAE(SAEConfig(8, 255), TopKSettings(k=32)).sparse_decode
    assert not TopKSAE(SAEConfig(8, 256), TopKSettings(k=32, sparse_decode=False)).sparse_decode


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse", "dense"])
@pytest.mark.parametrize("cls", ARCHS, ids=IDS)
def test_auxk_changes_only_dead_latents_gradients(cls, sparse):
    sae = make(cls, d_in=8, d_sae=32, k=3, aux_k=4, aux_loss_coefficient=1.0, sparse_decode=sparse)
    x = batch(24, 8)
    dead = torch.zeros(32, dtype=torch.bool)
    dead[[0, 5, 6, 13, 22, 30]] = True
    with_aux, out = grads(sae, x, dead)
    without, _ = grads(sae, x, dead, drop_auxk=True)
    assert out.losses["auxk_loss"] > 0
    changed_enc = (with_aux["W_enc"] - without["W_enc"]).abs().amax(dim=0)  # per latent
    changed_b = (with_aux["b_enc"] - without["b_enc"]).abs()
    changed_dec = (with_aux["W_dec"] - without["W_dec"]).abs().amax(dim=1)
    for changed in (changed_enc, changed_b, changed_dec):
        assert changed[~dead].max() <= 1e-6
        assert changed[dead].max() > 1e-3


# --- BatchTopK ----------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [BatchTopKSAE, MatryoshkaBatchTopKSAE], ids=IDS[1:])
def test_batchtopk_keeps_k_times_batch_activations(cls):
    sae = make(cls, d_in=8, d_sae=64, k=5)
    with torch.no_grad():
        sae.b_enc.add_(3.0)  # nearly every pre-activation positive: exactly k * rows kept
    x = batch(20, 8)
    x[3] *= 12  # one loud row takes far more than k
    f = sae.training_forward(x, StepContext()).feature_acts
    per_row = (f > 0).sum(dim=1)
    assert per_row.sum().item() == 5 * 20
    assert per_row.max() > 5 and per_row.min() < 5  # a batch budget, not k per row
    torch.testing.assert_close(f, ref_batchtopk_acts(ref_pre(sae, x), 5))


@pytest.mark.parametrize("loud", [False, True], ids=["candidates", "fallback"])
def test_batch_topk_selection_is_exact(loud):
    """The CPU path picks among each row's top 4k candidates; a row that keeps them all (loud)
    must fall back to the whole batch and still give the exact top n."""
    g = torch.Generator().manual_seed(3)
    acts = torch.rand(30, 200, generator=g)
    if loud:
        acts[7] += 10  # row 7 holds the 150 largest values
    sel = batch_topk_selection(acts, 150)
    got = torch.zeros_like(acts, dtype=torch.bool)
    got[sel.rows, sel.cols] = True
    assert torch.equal(got, keep_largest(acts.flatten(), 150).reshape(acts.shape))
    assert torch.equal(sel.rows, torch.sort(sel.rows).values)
    assert sel.offsets.tolist() == [int((sel.rows < r).sum()) for r in range(30)]


@pytest.mark.parametrize("cls", [BatchTopKSAE, MatryoshkaBatchTopKSAE], ids=IDS[1:])
def test_threshold_is_a_buffer_and_tracks_the_smallest_kept_activation(cls):
    sae = make(cls, d_in=8, d_sae=32, k=3, topk_threshold_lr=0.1)
    assert "threshold" in dict(sae.named_buffers()) and sae.threshold.item() == 0.0
    assert "threshold" in sae.state_dict()
    opt = make_optimizer(sae, 1e-3)
    expected = 0.0
    for step in range(3):
        x = batch(16, 8, seed=10 + step)
        with torch.no_grad():
            f = ref_batchtopk_acts(ref_pre(sae, x), 3)
            smallest = f[f > 0].min().item()
        train_step_(sae, opt, None, x)
        # First update takes the batch's value outright; then an exponential average.
        expected = smallest if step == 0 else 0.9 * expected + 0.1 * smallest
        assert sae.threshold.item() == pytest.approx(expected, rel=1e-5)
    # An update with no training_forward since the last one leaves the threshold alone.
    before = sae.threshold.clone()
    sae.update_threshold_()
    assert torch.equal(sae.threshold, before)
    # Inference uses the threshold, not the batch: each row alone encodes the same.
    x = batch(16, 8, seed=99)
    f = sae.encode(x)
    torch.testing.assert_close(f, ref_inference_acts(sae, x))
    torch.testing.assert_close(torch.cat([sae.encode(x[i:i + 1]) for i in range(16)]), f)
    # A resume restores it.
    fresh = cls(sae.cfg, sae.settings)
    fresh.load_state_dict(sae.state_dict())
    assert fresh.threshold.item() == sae.threshold.item()


@pytest.mark.parametrize("cls,settings", [
    (BatchTopKSAE, {}), (MatryoshkaBatchTopKSAE, {"matryoshka_widths": [48, 64]}),
], ids=IDS[1:])
def test_calibrated_threshold_lands_at_k_where_the_running_one_lags(cls, settings, tmp_path):
    """The saved threshold, estimated from sample rows, fires k per row on held-out rows; the
    running average (the fallback) is far off this early in training (about 14 at k 3 here)."""
    k, steps, rows = 3, 50, 256
    x, _ = planted_data(steps * rows + 2 * 4096)
    train_rows, sample, held_out = x[:steps * rows], x[steps * rows:-4096], x[-4096:]
    torch.manual_seed(0)
    sae = cls(SAEConfig(32, 64), cls.Settings(k=k, **settings))
    opt = make_optimizer(sae, 1e-2)
    for i in range(steps):
        train_step_(sae, opt, None, train_rows[i * rows:(i + 1) * rows])
    mean_l0 = lambda model, rows: (model.encode(rows) > 0).sum(dim=-1).float().mean().item()  # noqa: E731
    running = mean_l0(sae, held_out)
    assert running > 2 * k, running  # the lag the calibration fixes
    # Without a calibration, the plain save writes the running threshold and says so.
    plain = sae.save(tmp_path / "plain")
    assert json.loads((plain / "cfg.json").read_text())["threshold_calibrated_rows"] == 0
    assert torch.equal(load_sae(plain).threshold, sae.threshold.expand(64))
    # Calibrated: exactly BatchTopK's selection on the sample, and k per row on held-out rows.
    state = copy.deepcopy(sae.state_dict())
    sae.calibrate_inference_(sample)
    assert torch.equal(sae.state_dict()["threshold"], state["threshold"])  # the buffer is untouched
    with torch.no_grad():
        assert int((sae.encode(sample) > 0).sum()) == k * sample.shape[0]
        h = ref_pre(sae, sample)
        torch.testing.assert_close(sae.encode(sample), ref_batchtopk_acts(h, k))
    calibrated = mean_l0(sae, held_out)
    assert abs(calibrated - k) <= 0.1 * k, calibrated
    folder = sae.save(tmp_path / "calibrated")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["threshold_calibrated_rows"] == sample.shape[0]
    assert cfg["threshold_running"] == pytest.approx(sae.threshold.item())
    loaded = load_sae(folder)
    from safetensors.torch import load_file  # SAELens' JumpReLU tensors, as before the calibration
    weights = load_file(str(folder / "sae_weights.safetensors"))
    assert sorted(weights) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"] and weights["threshold"].shape == (64,)
    assert torch.equal(weights["threshold"], sae.inference_threshold.expand(64))
    assert abs(mean_l0(loaded, held_out) - k) <= 0.1 * k
    # The next training step makes it stale: encode falls back to the running threshold.
    train_step_(sae, opt, None, train_rows[:rows])
    with torch.no_grad():
        torch.testing.assert_close(sae.encode(held_out), ref_inference_acts(sae, held_out))


def test_calibration_with_too_few_positive_activations_lets_every_positive_one_fire():
    sae = make(BatchTopKSAE, d_in=8, d_sae=32, k=4)
    with torch.no_grad():
        sae.b_enc.fill_(-100.0)
        sae.b_enc[:2] = 100.0  # two features fire on every row: fewer than k
    x = batch(16, 8, seed=5)
    sae.calibrate_inference_(x)
    assert sae.inference_threshold.item() == 0.0
    assert int((sae.encode(x) > 0).sum()) == 2 * 16


# --- Matryoshka ---------------------------------------------------------------------------------

def test_matryoshka_widths():
    def widths(d_sae, k=4, w=None):
        return MatryoshkaBatchTopKSAE(SAEConfig(8, d_sae), MatryoshkaBatchTopKSettings(k=k, matryoshka_widths=w)).widths
    assert widths(64) == [4, 16, 64]
    assert widths(64, k=8) == [8, 16, 64]
    assert widths(64, k=20) == [20, 64]
    assert widths(16, k=16) == [16]
    assert widths(64, w=[8, 32]) == [8, 32, 64]
    assert widths(64, w=[8, 64]) == [8, 64]


def test_matryoshka_prefix_losses_are_full_reconstructions_from_each_prefix():
    sae = make(MatryoshkaBatchTopKSAE, d_in=8, d_sae=32, k=4, matryoshka_widths=[2, 10, 20])
    x = batch(16, 8)
    out = sae.training_forward(x, StepContext())
    assert list(out.losses) == ["mse", "inner_mse_2", "inner_mse_10", "inner_mse_20", "auxk_loss"]
    f = out.feature_acts.detach()
    for m in (2, 10, 20):
        recon = torch.stack([sae.b_dec + sum((f[r, j] * sae.W_dec[j] for j in range(m)), torch.zeros(8))
                             for r in range(16)])
        torch.testing.assert_close(out.losses[f"inner_mse_{m}"], mean_sq(x, recon))
    # the prefix terms differ from each other (the prefixes reconstruct differently)
    values = [out.losses[n].item() for n in ("inner_mse_2", "inner_mse_10", "inner_mse_20", "mse")]
    assert len(set(values)) == 4


# --- saving and loading -------------------------------------------------------------------------

@pytest.mark.parametrize("cls", ARCHS, ids=IDS)
def test_save_load_round_trip(cls, tmp_path):
    # The real registry: loading goes through it (BatchTopK saves as jumprelu), so a missing or
    # miswired entry must fail here, not be patched in or skipped.
    assert ARCHITECTURES.get(cls.architecture) is cls, cls.architecture
    sae = make(cls, k=4)
    if isinstance(sae, BatchTopKSAE):
        sae.threshold.fill_(0.7)
    folder = sae.save(tmp_path / "sae", {"hook_name": "blocks.0.hook_resid_post"})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["trained_architecture"] == cls.architecture
    if cls is TopKSAE:
        assert cfg["architecture"] == "topk" and cfg["k"] == 4 and cfg["activation_fn_str"] == "topk"
        assert cfg["rescale_acts_by_decoder_norm"] is False
    else:
        assert cfg["architecture"] == "jumprelu"
    loaded = load_sae(folder)
    assert type(loaded) is ARCHITECTURES[cfg["architecture"]]
    x = batch(16, 8, seed=4)
    f = sae.encode(x)
    assert (f > 0).any()
    torch.testing.assert_close(loaded.encode(x), f)
    torch.testing.assert_close(loaded.decode(f), sae.decode(f))
    torch.testing.assert_close(loaded(x).sae_out, sae(x).sae_out)


# --- settings -----------------------------------------------------------------------------------

BAD = [
    (TopKSAE, {"k": 0}), (TopKSAE, {"k": 33}), (TopKSAE, {"k": 2.5}), (TopKSAE, {"k": True}),
    (TopKSAE, {"aux_k": 0}), (TopKSAE, {"aux_loss_coefficient": -1.0}),
    (TopKSAE, {"aux_loss_coefficient": math.nan}), (TopKSAE, {"sparse_decode": "yes"}),
    (TopKSAE, {"decoder_init_norm": 0.0}),
    (BatchTopKSAE, {"topk_threshold_lr": 0.0}), (BatchTopKSAE, {"topk_threshold_lr": 1.5}),
    (BatchTopKSAE, {"k": 40}),
    (MatryoshkaBatchTopKSAE, {"matryoshka_widths": [16, 8]}),
    (MatryoshkaBatchTopKSAE, {"matryoshka_widths": [8, 8, 32]}),
    (MatryoshkaBatchTopKSAE, {"matryoshka_widths": [0, 32]}),
    (MatryoshkaBatchTopKSAE, {"matryoshka_widths": [8, 64]}),
    (MatryoshkaBatchTopKSAE, {"matryoshka_widths": []}),
    (MatryoshkaBatchTopKSAE, {"matryoshka_widths": "8,32"}),
]


@pytest.mark.parametrize("cls,settings", BAD, ids=[f"{c.architecture}-{next(iter(s))}={next(iter(s.values()))}" for c, s in BAD])
def test_bad_settings_are_one_line_user_errors(cls, settings):
    with pytest.raises(UserError) as e:
        cls(SAEConfig(8, 32), cls.Settings(**settings))
    assert "\n" not in str(e.value) and next(iter(settings)) in str(e.value)


def test_settings_defaults():
    s = TopKSettings()
    assert (s.k, s.aux_k, s.aux_loss_coefficient, s.sparse_decode) == (32, None, 1 / 32, None)
    assert BatchTopKSettings().topk_threshold_lr == 0.01
    assert MatryoshkaBatchTopKSettings().matryoshka_widths is None
    sae = TopKSAE(SAEConfig(64, 4096))
    assert sae.aux_k == 32 and sae.dead_feature_policy == "auxk" and sae.unit_norm_decoder
    assert TopKSAE(SAEConfig(64, 16), TopKSettings(k=4)).aux_k == 16  # clamped to d_sae
    assert {n for n, _ in sae.named_parameters()} == {"W_enc", "b_enc", "W_dec", "b_dec"}


# --- training recovers planted features ---------------------------------------------------------

def planted_data(rows: int, d_in: int = 32, n_features: int = 32, active: int = 3, seed: int = 0):
    """Rows that are sums of `active` of n_features random unit directions, coefficients in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d_in, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    which = torch.rand(rows, n_features, generator=g).argsort(dim=1)[:, :active]
    coefficients = torch.zeros(rows, n_features).scatter_(1, which, 0.5 + torch.rand(rows, active, generator=g))
    return coefficients @ directions, directions


@pytest.mark.parametrize("cls,settings", [
    (TopKSAE, {}), (BatchTopKSAE, {}), (MatryoshkaBatchTopKSAE, {"matryoshka_widths": [48, 64]}),
], ids=IDS)
def test_recovers_planted_features(cls, settings):
    steps, rows, window = 300, 256, 50
    x, directions = planted_data(steps * rows)
    torch.manual_seed(0)
    sae = cls(SAEConfig(32, 64), cls.Settings(k=3, **settings))
    assert sae.sparse_decode  # 3 * 8 <= 64: trains through the sparse path
    opt = make_optimizer(sae, 1e-2)
    steps_since_fired = torch.zeros(64, dtype=torch.long)
    for i in range(steps):
        res = train_step_(sae, opt, None, x[i * rows:(i + 1) * rows], StepContext(dead_mask=steps_since_fired >= window))
        steps_since_fired = torch.where(res.feature_acts_fired > 0, 0, steps_since_fired + 1)
    rows_unit = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    best = (directions @ rows_unit.T).amax(dim=1)
    assert best.mean().item() >= 0.95, best
