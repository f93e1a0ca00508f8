"""The SAE, its training step, schedulers, geometric median and dead-feature resampling (CPU)."""
from __future__ import annotations

import copy
import json
import math
import time

import pytest
import torch
from safetensors.torch import load_file

from shared.errors import UserError
from shared.sae import SAEConfig, SparseAutoencoder
from train.geometric_median import geometric_median
from train.resample import per_row_reconstruction_loss, resample_anthropic_, resample_l2_, sample_by_loss_squared
from train.schedulers import SCHEDULER_NAMES, l1_warmup_factor, make_lr_lambda
from shared.saes import StepContext
from train.step import explained_variance, make_optimizer
from train.step import train_step_ as generic_train_step_

RESAMPLERS = [resample_anthropic_, resample_l2_]


pytestmark = pytest.mark.usefixtures("one_thread")


def make_sae(d_in: int = 8, d_sae: int = 16, seed: int = 0) -> SparseAutoencoder:
    torch.manual_seed(seed)
    return SparseAutoencoder(SAEConfig(d_in=d_in, d_sae=d_sae))


def train_step_(sae, opt, sched, x, l1_coefficient: float, autocast: bool = False):
    """The generic step, with this standard SAE's L1 coefficient set for it."""
    sae.settings.l1_coefficient = l1_coefficient
    return generic_train_step_(sae, opt, sched, x, StepContext(), autocast=autocast)


def losses_of(sae, x, l1_coefficient: float):
    sae.settings.l1_coefficient = l1_coefficient
    return sae.training_forward(x, StepContext())


def randomise_biases_(sae: SparseAutoencoder, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(sae.b_enc.shape, generator=g))
        sae.b_dec.copy_(torch.randn(sae.b_dec.shape, generator=g))


# --- the SAE --------------------------------------------------------------------------------------

def hand_sae() -> SparseAutoencoder:
    sae = make_sae(d_in=2, d_sae=3)
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]]))
        sae.b_enc.copy_(torch.tensor([0.0, -0.5, 0.0]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_dec.copy_(torch.tensor([0.5, -0.5]))
    return sae


def test_forward_and_loss_match_hand_computation():
    sae = hand_sae()
    x = torch.tensor([[1.5, 1.5], [0.5, -0.5]])
    out = sae(x)
    # Row 0: x - b_dec = [1, 2]; pre-acts [1, 1.5, 1]; x_hat = [1.6, 2.3] + b_dec = [2.1, 1.8].
    # Row 1: x - b_dec = 0; pre-acts [0, -0.5, 0] -> f = 0; x_hat = b_dec = x.
    torch.testing.assert_close(out.feature_acts, torch.tensor([[1.0, 1.5, 1.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(out.sae_out, torch.tensor([[2.1, 1.8], [0.5, -0.5]]))
    trained = losses_of(sae, x, l1_coefficient=0.1)
    # mse = (0.6^2 + 0.3^2 + 0) / 2 rows; l1 = (1 + 1.5 + 1 + 0) / 2 rows.
    assert trained.losses["mse"].item() == pytest.approx(0.225, abs=1e-6)
    assert trained.losses["l1_loss"].item() == pytest.approx(0.1 * 1.75, abs=1e-6)
    assert trained.loss.item() == pytest.approx(0.225 + 0.1 * 1.75, abs=1e-6)
    torch.testing.assert_close(trained.sae_out, out.sae_out)


def test_april_update_weights_l1_by_decoder_norms_and_frees_the_decoder():
    from shared.saes.standard import StandardSAE, StandardSettings

    torch.manual_seed(0)
    sae = StandardSAE(SAEConfig(d_in=8, d_sae=16), StandardSettings(l1_coefficient=0.3, anthropic_april_update=True))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((16,), 0.1))  # decoder_init_norm
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    out = sae.training_forward(x, StepContext(sparsity_scale=0.5))
    f = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    expected = 0.3 * 0.5 * (f * sae.W_dec.norm(dim=1)).sum(dim=1).mean()
    torch.testing.assert_close(out.losses["l1_loss"], expected)
    opt = make_optimizer(sae, 1e-2)
    generic_train_step_(sae, opt, None, x, StepContext())
    assert not torch.allclose(sae.W_dec.norm(dim=1), torch.full((16,), 0.1))  # not renormalised


def test_init_is_tied_small_encoder_unit_decoder_and_seeded():
    sae = make_sae(d_in=8, d_sae=16, seed=3)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))
    torch.testing.assert_close(sae.W_enc, 0.1 * sae.W_dec.T)  # decoder_init_norm 0.1
    assert not sae.b_enc.any() and not sae.b_dec.any()
    assert sorted(name for name, _ in sae.named_parameters()) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    assert torch.equal(make_sae(8, 16, seed=3).W_dec, sae.W_dec)
    assert not torch.equal(make_sae(8, 16, seed=4).W_dec, sae.W_dec)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_config_rejects_bad_sizes(bad):
    with pytest.raises(UserError, match="d_sae"):
        SAEConfig(d_in=4, d_sae=bad)


def test_gradient_parallel_to_decoder_rows_is_removed():
    sae = make_sae()
    with torch.no_grad():
        sae.W_dec.mul_(torch.linspace(0.5, 2.0, 16)[:, None])  # must work for non-unit rows too
    grad = torch.randn_like(sae.W_dec)
    sae.W_dec.grad = grad.clone()
    sae.remove_gradient_parallel_to_decoder_directions_()
    unit = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    parallel = (sae.W_dec.grad * unit).sum(dim=1)
    assert parallel.abs().max() < 1e-5
    expected = grad - (grad * unit).sum(dim=1, keepdim=True) * unit
    torch.testing.assert_close(sae.W_dec.grad, expected)
    assert (grad * unit).sum(dim=1).abs().min() > 1e-4  # there was something to remove


def test_decoder_rows_stay_unit_norm_through_training_steps():
    sae = make_sae()
    opt = make_optimizer(sae, lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        train_step_(sae, opt, None, 3.0 * torch.randn(64, 8, generator=g), l1_coefficient=1e-2)
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))
        assert all(p.grad is None for p in sae.parameters())


def test_save_load_round_trip(tmp_path):
    sae = make_sae()
    randomise_biases_(sae)
    sae.settings.l1_coefficient = 3e-4
    folder = sae.save(tmp_path / "sae", {"hook_name": "blocks.0.hook_mlp_out", "l1_coefficient": None})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["d_in"] == 8 and cfg["d_sae"] == 16 and cfg["architecture"] == "standard"
    assert cfg["hook_name"] == "blocks.0.hook_mlp_out" and cfg["l1_coefficient"] == 3e-4  # the SAE's own
    assert cfg["metadata"]["hook_name"] == "blocks.0.hook_mlp_out" and cfg["metadata"]["sae_lens_version"]
    raw = load_file(str(folder / "sae_weights.safetensors"))
    assert sorted(raw) == ["W_dec", "W_enc", "b_dec", "b_enc"]
    assert all(t.dtype == torch.float32 for t in raw.values())
    assert raw["W_enc"].shape == (8, 16) and raw["W_dec"].shape == (16, 8)
    loaded = SparseAutoencoder.load_from_pretrained(folder)
    assert loaded.cfg == sae.cfg
    for (name, p), (_, q) in zip(sae.named_parameters(), loaded.named_parameters()):
        assert torch.equal(p, q), name
    assert sorted(p.name for p in folder.iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def test_loading_does_not_draw_from_torchs_rng(tmp_path):
    folder = make_sae().save(tmp_path / "sae")
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    loaded = SparseAutoencoder.load_from_pretrained(folder)
    assert torch.equal(torch.rand(3), expected)
    assert loaded.W_enc.device.type == "cpu" and loaded.W_enc.requires_grad


def test_save_rejects_a_cfg_that_disagrees_with_the_sae(tmp_path):
    with pytest.raises(UserError, match="d_in"):
        make_sae().save(tmp_path / "sae", {"d_in": 9})


def test_load_errors_are_one_clear_line(tmp_path):
    def message(path) -> str:
        with pytest.raises(UserError) as info:
            SparseAutoencoder.load_from_pretrained(path)
        text = str(info.value)
        assert "\n" not in text
        return text

    assert "not found" in message(tmp_path / "nowhere") and "nowhere" in message(tmp_path / "nowhere")
    folder = make_sae().save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "d_sae": 32}))
    assert "W_enc" in message(folder) and "d_sae=32" in message(folder)
    (folder / "sae_weights.safetensors").unlink()
    assert "sae_weights.safetensors is missing" in message(folder)
    (folder / "cfg.json").unlink()
    assert "cfg.json is missing" in message(folder)


def test_load_refuses_non_finite_weights_and_an_edited_architecture(tmp_path):
    """Metrics of such weights cannot be right: the tensor or the cfg.json key is named."""
    from safetensors.torch import save_file

    def message(path) -> str:
        with pytest.raises(UserError) as info:
            SparseAutoencoder.load_from_pretrained(path)
        return str(info.value)

    folder = make_sae().save(tmp_path / "sae")
    weights = folder / "sae_weights.safetensors"
    good = load_file(str(weights))
    save_file(good | {"b_enc": torch.full_like(good["b_enc"], float("nan"))}, str(weights))
    assert "b_enc holds NaN or infinite values" in message(folder)
    save_file(good | {"W_enc": good["W_enc"].to(torch.int32)}, str(weights))
    assert "W_enc is torch.int32" in message(folder)
    save_file(good, str(weights))
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "topk", "k": 4}))  # the same four tensors
    assert "trained as 'standard'" in message(folder)
    del cfg["trained_architecture"]
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "topk", "k": 4}))
    assert "activation_fn_str is 'relu'" in message(folder)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    assert SparseAutoencoder.load_from_pretrained(folder).cfg.d_sae == 16  # an SAELens folder without it


def test_fold_scaling_is_exact(tmp_path):
    sae = make_sae()
    randomise_biases_(sae)
    scale = 3.7
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(5))
    before = sae(x * scale)
    assert (before.feature_acts > 0).any() and (before.feature_acts == 0).any()
    sae.fold_scaling_(scale)
    after = sae(x)
    torch.testing.assert_close(after.feature_acts, before.feature_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.sae_out, before.sae_out / scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((16,), 1 / scale))
    folder = sae.save(tmp_path / "folded")
    assert json.loads((folder / "cfg.json").read_text())["input_scale_folded"] == pytest.approx(scale)
    assert SparseAutoencoder.load_from_pretrained(folder).input_scale_folded == pytest.approx(scale)


# --- the training step ----------------------------------------------------------------------------

def test_make_optimizer_is_fused_on_cpu():
    assert make_optimizer(make_sae(), lr=1e-3).defaults["fused"] is True


def test_step_metrics_describe_the_batch_it_trains_on():
    sae = make_sae()
    randomise_biases_(sae)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(2)) + 1.0
    before = copy.deepcopy(sae)
    opt = make_optimizer(sae, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda("cosineannealing", 10, 0))
    result = train_step_(sae, opt, sched, x, l1_coefficient=0.05)

    out = before(x)
    losses = losses_of(before, x, 0.05)
    fired = out.feature_acts > 0
    torch.testing.assert_close(result.losses["loss"], losses.loss.detach())
    assert torch.equal(result.feature_acts_fired, fired.sum(dim=0))
    assert result.l0.item() == pytest.approx(fired.sum().item() / 64)
    torch.testing.assert_close(result.sum_sq_err, (x - out.sae_out).pow(2).sum().detach())
    torch.testing.assert_close(result.sum_sq_total, (x - x.mean(0)).pow(2).sum())
    assert all(not t.requires_grad for t in (*result.losses.values(), result.l0, result.sum_sq_err))
    assert not torch.equal(sae.W_enc, before.W_enc)  # the step did update
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi / 10)))


def test_step_follows_the_reference_sequence():
    """forward, loss, backward, project out parallel grads, Adam, renormalise: by hand, compared."""
    sae = make_sae()
    reference = copy.deepcopy(sae)
    opt, ref_opt = make_optimizer(sae, lr=0.05), make_optimizer(reference, lr=0.05)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(64, 8, generator=g)
        train_step_(sae, opt, None, x, l1_coefficient=0.1)
        losses_of(reference, x, 0.1).loss.backward()
        reference.remove_gradient_parallel_to_decoder_directions_()
        ref_opt.step()
        reference.set_decoder_norm_to_unit_norm_()
        ref_opt.zero_grad(set_to_none=True)
    for (name, p), q in zip(sae.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6, msg=name)


def test_explained_variance_definition():
    assert explained_variance(torch.tensor(25.0), torch.tensor(100.0)).item() == pytest.approx(0.75)


def test_bfloat16_autocast_step_keeps_float32_parameters():
    sae = make_sae()
    opt = make_optimizer(sae, lr=1e-2)
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
    result = train_step_(sae, opt, None, x, l1_coefficient=1e-2, autocast=True)
    assert result.losses["loss"].dtype == torch.float32 and torch.isfinite(result.losses["loss"])
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))


# --- schedulers -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name, total, warm, expected", [
    ("constant", 100, 0, {0: 1.0, 50: 1.0, 99: 1.0}),
    ("constantwithwarmup", 100, 10, {0: 0.1, 4: 0.5, 9: 1.0, 99: 1.0}),
    ("linearwarmupdecay", 110, 10, {0: 0.1, 9: 1.0, 10: 1.0, 60: 0.5, 109: 0.01, 110: 0.0}),
    ("cosineannealing", 100, 0, {0: 1.0, 50: 0.5, 100: 0.0, 200: 0.0}),
    ("cosineannealingwarmup", 110, 10, {0: 0.1, 10: 1.0, 60: 0.5, 110: 0.0}),
])
def test_scheduler_values_at_key_steps(name, total, warm, expected):
    multiplier = make_lr_lambda(name, total, warm)
    for step, value in expected.items():
        assert multiplier(step) == pytest.approx(value, abs=1e-12), (name, step)


def test_scheduler_drives_lambda_lr():
    sae = make_sae()
    opt = make_optimizer(sae, lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, make_lr_lambda("constantwithwarmup", 100, 4))
    seen = []
    for _ in range(6):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_unknown_scheduler_lists_valid_names():
    with pytest.raises(UserError) as info:
        make_lr_lambda("cosine", 100, 0)
    assert all(name in str(info.value) for name in SCHEDULER_NAMES)
    with pytest.raises(UserError, match="warm_up_steps"):
        make_lr_lambda("constantwithwarmup", 100, 101)


def test_l1_warmup_factor():
    assert [l1_warmup_factor(s, 100) for s in (0, 25, 100, 500)] == [0.0, 0.25, 1.0, 1.0]
    assert l1_warmup_factor(0, 0) == 1.0


# --- geometric median -----------------------------------------------------------------------------

def test_geometric_median_of_symmetric_points_is_the_centre():
    centre = torch.tensor([1.0, -2.0, 3.0])
    offsets = torch.cat([torch.eye(3), -torch.eye(3), 2 * torch.eye(3), -2 * torch.eye(3)])
    torch.testing.assert_close(geometric_median(centre + offsets), centre, atol=1e-5, rtol=0)


def test_geometric_median_satisfies_optimality_and_ignores_outliers():
    g = torch.Generator().manual_seed(0)
    cluster = torch.randn(200, 4, generator=g, dtype=torch.float64)
    points = torch.cat([cluster, torch.full((20, 4), 1000.0, dtype=torch.float64)])
    median = geometric_median(points, max_iter=500, tol=1e-10)
    # At the minimiser of sum ||p - m||, the unit vectors towards the points cancel out.
    units = (points - median) / (points - median).norm(dim=1, keepdim=True)
    assert units.sum(dim=0).norm() < 1e-4 * len(points)
    assert (median - cluster.mean(0)).norm() < 0.5
    assert (points.mean(0) - cluster.mean(0)).norm() > 100


def test_geometric_median_keeps_dtype():
    assert geometric_median(torch.randn(10, 3, dtype=torch.bfloat16)).dtype == torch.bfloat16


# --- dead-feature resampling ----------------------------------------------------------------------

def trained_sae_and_optimizer(kind: str, params_order: str = "module"):
    """An SAE after a few Adam steps, so every moment is non-zero; optionally with the optimizer
    holding the parameters in another order, to prove state is found by object, not position."""
    sae = make_sae(d_in=8, d_sae=16)
    params = list(sae.parameters())
    if params_order == "reversed":
        params = params[::-1]
    opt = torch.optim.Adam(params, lr=1e-2, **{kind: True})
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        train_step_(sae, opt, None, torch.randn(32, 8, generator=g) + 0.5, l1_coefficient=1e-3)
    return sae, opt


def snapshot(sae, opt):
    params = {name: p.detach().clone() for name, p in sae.named_parameters()}
    state = {name: {k: v.clone() for k, v in opt.state[p].items()} for name, p in sae.named_parameters()}
    return params, state


# Which entries of each parameter belong to feature j.
FEATURE_AXIS = {"W_enc": 1, "b_enc": 0, "W_dec": 0}


def dead_slots(name: str, shape, dead: torch.Tensor) -> torch.Tensor:
    """Bool mask over a parameter's entries: True where a dead feature's numbers live."""
    mask = torch.zeros(shape, dtype=torch.bool)
    if name in FEATURE_AXIS:
        index = [slice(None)] * len(shape)
        index[FEATURE_AXIS[name]] = dead
        mask[tuple(index)] = True
    return mask


@pytest.mark.parametrize("resample", RESAMPLERS)
@pytest.mark.parametrize("kind, order", [("fused", "module"), ("foreach", "reversed")])
def test_resampling_touches_exactly_the_dead_features(resample, kind, order):
    sae, opt = trained_sae_and_optimizer(kind, order)
    dead_mask = torch.zeros(16, dtype=torch.bool)
    dead_mask[[1, 5, 6, 13]] = True
    dead = torch.nonzero(dead_mask).squeeze(1)
    params_before, state_before = snapshot(sae, opt)
    inputs = torch.randn(200, 8, generator=torch.Generator().manual_seed(1)) * 2.0
    n = resample(sae, opt, dead_mask, inputs, feature_reinit_scale=0.2,
                 generator=torch.Generator().manual_seed(2))
    assert n == 4
    params_after, state_after = snapshot(sae, opt)
    for name, before in params_before.items():
        slots = dead_slots(name, before.shape, dead)
        after = params_after[name]
        assert torch.equal(after[~slots], before[~slots]), name
        if slots.any():
            assert not torch.equal(after[slots], before[slots]), name
        for key, moment in state_before[name].items():
            if key == "step":
                assert torch.equal(state_after[name][key], moment)
                continue
            assert torch.equal(state_after[name][key][~slots], moment[~slots]), (name, key)
            assert not state_after[name][key][slots].any(), (name, key)
            if slots.any():
                assert moment[slots].abs().min() > 0  # the reset did something

    alive = ~dead_mask
    W_dec, W_enc = sae.W_dec.detach(), sae.W_enc.detach()
    torch.testing.assert_close(W_dec[dead].norm(dim=1), torch.ones(4))
    expected_norm = 0.2 * params_before["W_enc"][:, alive].norm(dim=0).mean()
    torch.testing.assert_close(W_enc[:, dead].norm(dim=0), expected_norm.expand(4))
    torch.testing.assert_close(W_enc[:, dead].T / expected_norm, W_dec[dead])
    assert not sae.b_enc[dead].any()
    # Every new decoder row points at one of the inputs, seen from b_dec.
    candidates = inputs - sae.b_dec.detach()
    candidates = candidates / candidates.norm(dim=1, keepdim=True)
    assert (W_dec[dead] @ candidates.T).max(dim=1).values.min() > 1 - 1e-5


@pytest.mark.parametrize("resample", RESAMPLERS)
def test_resampling_before_any_step_and_with_nothing_dead(resample):
    sae = make_sae()
    opt = make_optimizer(sae, lr=1e-3)
    inputs = torch.randn(50, 8)
    assert resample(sae, opt, torch.zeros(16, dtype=torch.bool), inputs) == 0
    dead_mask = torch.ones(16, dtype=torch.bool)  # all dead: encoder scale falls back to 1.0
    assert resample(sae, opt, dead_mask, inputs, generator=torch.Generator().manual_seed(0)) == 16
    torch.testing.assert_close(sae.W_enc.norm(dim=0), torch.full((16,), 0.2))
    assert not opt.state


def test_resampling_rejects_a_bad_mask():
    sae = make_sae()
    with pytest.raises(ValueError, match="dead_mask"):
        resample_anthropic_(sae, make_optimizer(sae, 1e-3), torch.zeros(16), torch.randn(5, 8))


def test_sampling_frequencies_follow_loss_squared():
    losses = torch.tensor([1.0, 2.0, 3.0, 0.0])
    draws = sample_by_loss_squared(losses, 28_000, torch.Generator().manual_seed(0), replacement=True)
    freq = torch.bincount(draws, minlength=4).double() / 28_000
    expected = torch.tensor([1.0, 4.0, 9.0, 0.0], dtype=torch.float64) / 14
    assert (freq - expected).abs().max() < 0.015  # ~5 standard deviations at these counts
    assert freq[3] == 0
    distinct = sample_by_loss_squared(losses, 3, torch.Generator().manual_seed(0), replacement=False)
    assert sorted(distinct.tolist()) == [0, 1, 2]
    # More draws than rows with non-zero loss: falls back to replacement instead of failing.
    assert sample_by_loss_squared(losses, 5, None, replacement=False).shape == (5,)


def test_resampling_prefers_high_loss_inputs():
    sae = make_sae()
    with torch.no_grad():
        sae.W_enc.zero_()  # x_hat = b_dec = 0, so each row's loss is ||x||^2
    g = torch.Generator().manual_seed(0)
    quiet = 0.3 * torch.randn(990, 8, generator=g)  # loss ~0.7 each
    loud = 3.0 * torch.randn(10, 8, generator=g)  # loss ~70 each: ~10^4 times more likely per row
    inputs = torch.cat([quiet, loud])[torch.randperm(1000, generator=g)]
    torch.testing.assert_close(per_row_reconstruction_loss(sae, inputs, chunk_rows=64), inputs.pow(2).sum(1))
    dead_mask = torch.zeros(16, dtype=torch.bool)
    dead_mask[:8] = True
    resample_anthropic_(sae, make_optimizer(sae, 1e-3), dead_mask, inputs, generator=torch.Generator().manual_seed(1))
    loud_units = loud / loud.norm(dim=1, keepdim=True)
    matches = (sae.W_dec.detach()[:8] @ loud_units.T).max(dim=1).values
    assert (matches > 1 - 1e-5).all()  # all 8 from the 1% loud rows...
    assert len({int(i) for i in (sae.W_dec.detach()[:8] @ loud_units.T).argmax(dim=1)}) == 8  # ...distinct


# --- training recovers known sparse directions ----------------------------------------------------

def sparse_batch(directions: torch.Tensor, batch: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Rows that each sum k distinct true features with coefficients in [0.5, 1.5)."""
    n_features = directions.shape[0]
    chosen = torch.rand(batch, n_features, generator=g).argsort(dim=1)[:, :k]
    coefficients = torch.zeros(batch, n_features)
    coefficients.scatter_(1, chosen, torch.rand(batch, k, generator=g) + 0.5)
    return coefficients @ directions


def test_training_recovers_known_sparse_directions():
    """48 true features in superposition in 32 dimensions, 3 active per row; an SAE with 96
    features and a strong L1 must find every one (measured: mean max cosine ~0.99)."""
    g = torch.Generator().manual_seed(0)
    directions = torch.randn(48, 32, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=32, d_sae=96))
    opt = make_optimizer(sae, lr=3e-3)
    started = time.perf_counter()
    for _ in range(1500):
        result = train_step_(sae, opt, None, sparse_batch(directions, 256, 3, g), l1_coefficient=0.2)
    elapsed = time.perf_counter() - started
    max_cos = (directions @ sae.W_dec.detach().T).max(dim=1).values
    print(f"mean max cosine {max_cos.mean():.4f} (min {max_cos.min():.4f}), "
          f"l0 {result.l0:.2f}, {elapsed:.1f}s")
    assert max_cos.mean() >= 0.95
    assert explained_variance(result.sum_sq_err, result.sum_sq_total) > 0.85
