"""The JumpReLU and Gated SAE architectures: forward passes, losses and straight-through gradients
against independent computations, SAELens-form save/load, scaling, and recovery of planted
features (CPU, seconds)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import shared.saes.registry
from shared.errors import UserError
from shared.saes.base import SAEConfig, StepContext
from shared.saes.gated import GatedSAE, GatedSettings
from shared.saes.io import load_sae
from shared.saes.jumprelu import JumpReLUFunction, JumpReLUSAE, JumpReLUSettings, log_of_threshold
from train.step import make_optimizer, train_step_


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def registered():
    """Loading goes through the real registry: a missing or miswired entry fails the test (it is
    not patched in)."""
    assert shared.saes.registry.ARCHITECTURES.get("jumprelu") is JumpReLUSAE
    assert shared.saes.registry.ARCHITECTURES.get("gated") is GatedSAE


def make_jumprelu(d_in: int = 8, d_sae: int = 16, seed: int = 0, **settings) -> JumpReLUSAE:
    torch.manual_seed(seed)
    return JumpReLUSAE(SAEConfig(d_in=d_in, d_sae=d_sae), JumpReLUSettings(**settings))


def make_gated(d_in: int = 8, d_sae: int = 16, seed: int = 0, **settings) -> GatedSAE:
    torch.manual_seed(seed)
    return GatedSAE(SAEConfig(d_in=d_in, d_sae=d_sae), GatedSettings(**settings))


def randomise_(sae, seed: int = 1) -> None:
    """Every parameter away from its init (biases, thresholds, r_mag), at the scale it trains to."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(sae.W_enc.shape, generator=g) / math.sqrt(sae.cfg.d_in))
        sae.b_dec.copy_(0.3 * torch.randn(sae.b_dec.shape, generator=g))
        for name in ("b_enc", "b_gate", "r_mag", "b_mag"):
            if hasattr(sae, name):
                getattr(sae, name).copy_(0.2 * torch.randn(sae.cfg.d_sae, generator=g))
        if isinstance(sae, JumpReLUSAE):
            sae.log_threshold.copy_(torch.log(0.1 + 0.5 * torch.rand(sae.cfg.d_sae, generator=g)))
        else:  # free decoder: rows of various norms
            sae.W_dec.mul_(1 + 5 * torch.rand(sae.cfg.d_sae, 1, generator=g))


def inputs(rows: int = 64, d_in: int = 8, seed: int = 2) -> torch.Tensor:
    return torch.randn(rows, d_in, generator=torch.Generator().manual_seed(seed))


def parameters(sae) -> dict[str, torch.Tensor]:
    return {name: p.detach() for name, p in sae.named_parameters()}


# --- JumpReLU -------------------------------------------------------------------------------------

def test_jumprelu_encode_decode_match_an_independent_computation():
    sae = make_jumprelu()
    randomise_(sae)
    x = inputs()
    p = parameters(sae)
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    theta = torch.exp(p["log_threshold"])
    expected = torch.where(h > theta, h, torch.zeros_like(h))
    f = sae.encode(x)
    assert (f > 0).any() and ((h > 0) & (f == 0)).any()  # some fire, some positive ones are cut
    torch.testing.assert_close(f, expected)
    torch.testing.assert_close(sae.decode(f), expected @ p["W_dec"] + p["b_dec"])
    out = sae(x)
    torch.testing.assert_close(out.sae_out, expected @ p["W_dec"] + p["b_dec"])


def test_jumprelu_loss_terms_match_an_independent_computation():
    sae = make_jumprelu(l0_coefficient=0.7)
    randomise_(sae)
    x = inputs()
    p = parameters(sae)
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    fires = h > torch.exp(p["log_threshold"])
    x_hat = torch.where(fires, h, 0.0) @ p["W_dec"] + p["b_dec"]
    out = sae.training_forward(x, StepContext(sparsity_scale=0.5))
    assert set(out.losses) == {"mse", "l0_loss"}
    mse = ((x - x_hat) ** 2).sum(dim=1).mean()
    l0_loss = 0.7 * 0.5 * fires.sum(dim=1).float().mean()
    torch.testing.assert_close(out.losses["mse"], mse)
    torch.testing.assert_close(out.losses["l0_loss"], l0_loss)
    torch.testing.assert_close(out.loss, mse + l0_loss)
    torch.testing.assert_close(out.feature_acts, sae.encode(x))
    torch.testing.assert_close(out.sae_out, x_hat)


def test_jumprelu_threshold_gradients_follow_the_straight_through_estimators():
    eps, coefficient, scale = 0.5, 0.7, 0.5
    sae = make_jumprelu(d_in=6, d_sae=5, jumprelu_bandwidth=eps, l0_coefficient=coefficient)
    with torch.no_grad():
        sae.log_threshold.copy_(torch.log(torch.tensor([0.2, 0.3, 0.4, 0.5, 0.6])))
        sae.W_enc.copy_(torch.randn(6, 5, generator=torch.Generator().manual_seed(3)) / math.sqrt(6))
    x = inputs(rows=128, d_in=6)  # h ~ N(0, 1): many rows within eps/2 of each threshold
    p = parameters(sae)
    h = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    theta = torch.exp(p["log_threshold"])
    in_window = (((h - theta) / eps).abs() < 0.5).float()  # rect((h - theta) / eps)
    assert (in_window.sum(dim=0) >= 5).all()
    x_hat = torch.where(h > theta, h, 0.0) @ p["W_dec"] + p["b_dec"]
    rows = x.shape[0]

    out = sae.training_forward(x, StepContext(sparsity_scale=scale))
    out.losses["mse"].backward(retain_graph=True)
    mse_grad = sae.log_threshold.grad.clone()
    sae.zero_grad(set_to_none=True)
    out.losses["l0_loss"].backward()
    l0_grad = sae.log_threshold.grad.clone()

    # d mse / d f = 2 (x_hat - x) . W_dec_j / rows; d f / d theta = -(theta / eps) rect;
    # d theta / d log_threshold = theta.
    d_mse_d_f = 2 * (x_hat - x) @ p["W_dec"].T / rows
    expected_mse = (d_mse_d_f * -(theta / eps) * in_window).sum(dim=0) * theta
    expected_l0 = coefficient * scale * (-(1 / eps) * in_window).sum(dim=0) / rows * theta
    torch.testing.assert_close(mse_grad, expected_mse)
    torch.testing.assert_close(l0_grad, expected_l0)
    assert (mse_grad != 0).all() and (l0_grad != 0).all()
    assert (l0_grad < 0).all()  # descent raises every threshold
    # The L0 term reaches the model only through the thresholds.
    assert all(sae.get_parameter(name).grad is None for name in ("W_enc", "b_enc", "W_dec", "b_dec"))


def test_jumprelu_pre_activation_gradient_is_the_firing_mask():
    sae = make_jumprelu()
    randomise_(sae)
    x = inputs()
    h = sae.hidden_pre(x).detach().requires_grad_(True)
    f = JumpReLUFunction.apply(h, sae.threshold.detach(), 0.05)
    upstream = torch.randn(f.shape, generator=torch.Generator().manual_seed(4))
    (f * upstream).sum().backward()
    torch.testing.assert_close(h.grad, upstream * (h > sae.threshold).float())


def test_jumprelu_saves_the_saelens_form_and_round_trips(tmp_path, registered):
    sae = make_jumprelu()
    randomise_(sae)
    folder = sae.save(tmp_path / "sae", {"hook_name": "blocks.0.hook_resid_post"})
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["d_sae"] == 16
    assert cfg["l0_coefficient"] == 1.0 and cfg["jumprelu_bandwidth"] == 0.05
    raw = load_file(str(folder / "sae_weights.safetensors"))
    assert sorted(raw) == ["W_dec", "W_enc", "b_dec", "b_enc", "threshold"]
    assert torch.equal(raw["threshold"], sae.threshold.detach())
    loaded = load_sae(folder)
    assert type(loaded) is JumpReLUSAE and loaded.cfg == sae.cfg
    assert torch.equal(loaded.threshold, sae.threshold)  # exact: the same inputs fire
    x = inputs()
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x).sae_out, sae(x).sae_out)
    assert loaded.log_threshold.requires_grad and loaded.log_threshold.device.type == "cpu"


def test_log_of_threshold_is_exact_for_saved_thresholds():
    logs = torch.empty(20_000).uniform_(-12.0, 4.0, generator=torch.Generator().manual_seed(0))
    thresholds = torch.exp(logs)
    assert torch.equal(torch.exp(log_of_threshold(thresholds)), thresholds)
    # Thresholds <= 0 all fire where relu(h) > 0: -inf, whose exp is exactly 0.
    assert torch.equal(log_of_threshold(torch.tensor([0.0, -0.5])), torch.full((2,), -math.inf))


@pytest.mark.parametrize("value", [0.0, -0.25])
def test_jumprelu_folder_with_a_threshold_at_or_below_zero_encodes_as_relu(tmp_path, registered, value):
    """BatchTopK SAEs are saved as JumpReLU with one shared threshold, which can be 0."""
    sae = make_jumprelu()
    randomise_(sae)
    folder = sae.save(tmp_path / "sae")
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors["threshold"] = torch.full((16,), value)
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    loaded = load_sae(folder)
    x = inputs()
    h = (x - tensors["b_dec"]) @ tensors["W_enc"] + tensors["b_enc"]
    assert torch.equal(loaded.encode(x), torch.relu(h))
    assert torch.equal(loaded.threshold, torch.zeros(16))
    # Saved again, it writes threshold 0, and a training step keeps everything finite.
    assert not load_file(str(loaded.save(tmp_path / "again") / "sae_weights.safetensors"))["threshold"].any()
    result = train_step_(loaded, make_optimizer(loaded, 1e-3), None, x)
    assert all(torch.isfinite(t) for t in result.losses.values())
    assert torch.equal(loaded.threshold, torch.zeros(16))


def test_jumprelu_training_steps_keep_unit_decoder_and_positive_thresholds():
    sae = make_jumprelu()
    opt = make_optimizer(sae, lr=1e-2)
    for seed in range(3):
        train_step_(sae, opt, None, inputs(seed=seed), StepContext(sparsity_scale=1.0))
        torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(16))
        assert (sae.threshold > 0).all()
    assert not torch.equal(sae.threshold, torch.full((16,), 0.1))  # the thresholds did train


# --- Gated ----------------------------------------------------------------------------------------

def gated_reference(p: dict[str, torch.Tensor], x: torch.Tensor):
    s = x - p["b_dec"]
    pi = s @ p["W_enc"] + p["b_gate"]
    magnitude = (s @ (p["W_enc"] * torch.exp(p["r_mag"])) + p["b_mag"]).clamp(min=0)
    f = torch.where(pi > 0, magnitude, torch.zeros_like(magnitude))
    return pi, f, f @ p["W_dec"] + p["b_dec"]


def test_gated_encode_decode_match_an_independent_computation():
    sae = make_gated()
    randomise_(sae)
    x = inputs()
    pi, f, x_hat = gated_reference(parameters(sae), x)
    encoded = sae.encode(x)
    assert (encoded > 0).any() and ((pi <= 0) & (encoded == 0)).any()
    torch.testing.assert_close(encoded, f)
    torch.testing.assert_close(sae.decode(encoded), x_hat)
    torch.testing.assert_close(sae(x).sae_out, x_hat)


def test_gated_init():
    sae = make_gated()
    assert not sae.unit_norm_decoder
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((16,), 0.1))
    assert not sae.b_gate.any() and not sae.r_mag.any() and not sae.b_mag.any()
    assert sorted(dict(sae.named_parameters())) == ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]


def test_gated_loss_terms_match_an_independent_computation():
    sae = make_gated(l1_coefficient=0.8)
    randomise_(sae)
    x = inputs()
    p = parameters(sae)
    pi, f, x_hat = gated_reference(p, x)
    out = sae.training_forward(x, StepContext(sparsity_scale=0.25))
    assert set(out.losses) == {"mse", "l1_loss", "aux_loss"}
    mse = ((x - x_hat) ** 2).sum(dim=1).mean()
    l1 = 0.8 * 0.25 * (pi.clamp(min=0) * p["W_dec"].norm(dim=1)).sum(dim=1).mean()
    aux = ((pi.clamp(min=0) @ p["W_dec"] + p["b_dec"] - x) ** 2).sum(dim=1).mean()
    torch.testing.assert_close(out.losses["mse"], mse)
    torch.testing.assert_close(out.losses["l1_loss"], l1)
    torch.testing.assert_close(out.losses["aux_loss"], aux)
    torch.testing.assert_close(out.loss, mse + l1 + aux)
    torch.testing.assert_close(out.feature_acts, f)


def test_gated_gradients_flow_where_the_paper_says():
    """The gate passes no gradient (mse trains only the magnitude path and the decoder); the
    decoder is frozen in the auxiliary loss and in the L1 penalty's norms."""
    sae = make_gated()
    randomise_(sae)
    out = sae.training_forward(inputs(), StepContext())

    def grads(term: str) -> dict[str, torch.Tensor | None]:
        sae.zero_grad(set_to_none=True)
        out.losses[term].backward(retain_graph=True)
        return {name: p.grad for name, p in sae.named_parameters()}

    mse = grads("mse")
    assert mse["b_gate"] is None and all(mse[n].abs().sum() > 0 for n in ("W_enc", "r_mag", "b_mag", "W_dec", "b_dec"))
    l1 = grads("l1_loss")
    assert {n for n, g in l1.items() if g is not None} == {"W_enc", "b_gate", "b_dec"}
    aux = grads("aux_loss")
    assert {n for n, g in aux.items() if g is not None} == {"W_enc", "b_gate", "b_dec"}  # b_dec via s only


def test_gated_saves_the_saelens_form_and_round_trips(tmp_path, registered):
    sae = make_gated()
    randomise_(sae)
    folder = sae.save(tmp_path / "sae")
    cfg = json.loads((folder / "cfg.json").read_text())
    assert cfg["architecture"] == "gated" and cfg["l1_coefficient"] == 3.0
    raw = load_file(str(folder / "sae_weights.safetensors"))
    assert sorted(raw) == ["W_dec", "W_enc", "b_dec", "b_gate", "b_mag", "r_mag"]
    loaded = load_sae(folder)
    assert type(loaded) is GatedSAE
    for name, p in sae.named_parameters():
        assert torch.equal(loaded.get_parameter(name), p), name
    x = inputs()
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert torch.equal(loaded(x).sae_out, sae(x).sae_out)


# --- shared behaviour -----------------------------------------------------------------------------

@pytest.mark.parametrize("make, settings, name", [
    (make_jumprelu, {"l0_coefficient": -1.0}, "l0_coefficient"),
    (make_jumprelu, {"l0_coefficient": math.nan}, "l0_coefficient"),
    (make_jumprelu, {"jumprelu_bandwidth": 0.0}, "jumprelu_bandwidth"),
    (make_jumprelu, {"jumprelu_bandwidth": -0.05}, "jumprelu_bandwidth"),
    (make_jumprelu, {"jumprelu_init_threshold": 0.0}, "jumprelu_init_threshold"),
    (make_jumprelu, {"jumprelu_init_threshold": -0.1}, "jumprelu_init_threshold"),
    (make_jumprelu, {"jumprelu_init_threshold": math.inf}, "jumprelu_init_threshold"),
    (make_jumprelu, {"decoder_init_norm": 0.0}, "decoder_init_norm"),
    (make_gated, {"l1_coefficient": -0.5}, "l1_coefficient"),
])
def test_bad_settings_are_one_line_user_errors(make, settings, name):
    with pytest.raises(UserError) as info:
        make(**settings)
    assert name in str(info.value) and "\n" not in str(info.value)


def test_settings_from_a_cfg_mapping():
    values = {"l0_coefficient": 2.0, "jumprelu_bandwidth": None, "l1_coefficient": 9.0, "k": 4}
    assert JumpReLUSAE.settings_from(values) == JumpReLUSettings(l0_coefficient=2.0)
    assert GatedSAE.settings_from(values) == GatedSettings(l1_coefficient=9.0)


@pytest.mark.parametrize("make", [make_jumprelu, make_gated])
def test_fold_scaling_keeps_features_and_scales_the_reconstruction(make):
    sae = make()
    randomise_(sae)
    scale = 3.7
    x = inputs()
    before = sae(x * scale)
    assert (before.feature_acts > 0).any() and (before.feature_acts == 0).any()
    sae.fold_scaling_(scale)
    after = sae(x)
    torch.testing.assert_close(after.feature_acts, before.feature_acts, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after.sae_out, before.sae_out / scale, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [make_jumprelu, make_gated])
def test_bfloat16_autocast_step(make):
    sae = make()
    randomise_(sae)
    opt = make_optimizer(sae, lr=1e-3)
    result = train_step_(sae, opt, None, inputs(), StepContext(), autocast=True)
    assert all(t.dtype == torch.float32 and torch.isfinite(t) for t in result.losses.values())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in sae.parameters())


# --- training recovers planted features -----------------------------------------------------------

def planted_batch(directions: torch.Tensor, rows: int, k: int, g: torch.Generator) -> torch.Tensor:
    """Rows summing k distinct planted directions with coefficients in [0.5, 1.5)."""
    chosen = torch.rand(rows, directions.shape[0], generator=g).argsort(dim=1)[:, :k]
    coefficients = torch.zeros(rows, directions.shape[0])
    coefficients.scatter_(1, chosen, torch.rand(rows, k, generator=g) + 0.5)
    return coefficients @ directions


def train_on_planted(sae, steps: int, lr: float, warm_up: int, d_in: int, seed: int = 0):
    """32 planted unit directions in d_in dimensions, 3 active per row, inputs scaled so
    E||x|| = sqrt(d_in) (the trainer's expected_norm normalisation, for which the defaults are
    set); the sparsity coefficient ramps up over `warm_up` steps."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(32, d_in, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    scale = math.sqrt(d_in) / planted_batch(directions, 4096, 3, g).norm(dim=1).mean()
    opt = make_optimizer(sae, lr)
    for step in range(steps):
        context = StepContext(sparsity_scale=min(1.0, (step + 1) / warm_up) if warm_up else 1.0)
        result = train_step_(sae, opt, None, scale * planted_batch(directions, 256, 3, g), context)
    rows = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
    max_cos = (directions @ rows.T).max(dim=1).values
    explained = 1 - result.sum_sq_err / result.sum_sq_total
    print(f"{sae.architecture}: mean max cosine {max_cos.mean():.4f} (min {max_cos.min():.3f}), "
          f"l0 {result.l0:.2f}, explained variance {explained:.3f}")
    return max_cos, result.l0, explained


def test_jumprelu_recovers_planted_features():
    """Defaults, lr 1e-2, 400 steps, L0 warm-up over the first 100 (measured over 6 seeds: mean
    max cosine 0.988-1.0; without the warm-up 0.96-0.99, a feature or two lost to splits)."""
    sae = make_jumprelu(d_in=32, d_sae=64)
    max_cos, l0, explained = train_on_planted(sae, steps=400, lr=1e-2, warm_up=100, d_in=32)
    assert max_cos.mean() >= 0.95
    assert 2.0 < l0 < 5.0 and explained > 0.9


def test_gated_recovers_planted_features():
    """Defaults, lr 1e-2, 400 steps (measured over 6 seeds: mean max cosine 0.996-0.997)."""
    sae = make_gated(d_in=32, d_sae=64)
    max_cos, l0, explained = train_on_planted(sae, steps=400, lr=1e-2, warm_up=0, d_in=32)
    assert max_cos.mean() >= 0.95
    assert 2.0 < l0 < 5.0 and explained > 0.9
