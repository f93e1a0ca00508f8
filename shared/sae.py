"""The ReLU sparse autoencoder of the seed, saved as `cfg.json` + `sae_weights.safetensors`.

Math (Towards Monosemanticity, Anthropic 2023; the seed's `SparseAutoencoder`):
    f     = ReLU((x - b_dec) @ W_enc + b_enc)      f: [batch, d_sae]
    x_hat = f @ W_dec + b_dec                      x_hat: [batch, d_in]
with the rows of W_dec kept at unit norm during training, so the L1 penalty on f cannot be
dodged by shrinking f and growing W_dec.

Lives in `shared` because `train` writes it and evaluation/analysis code reads it. The file layout
and tensor names follow SAELens' "standard" SAE, so its loaders read our checkpoints too. Nothing
is pickled: the config is JSON and the weights are safetensors.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.atomic import commit, temp_path, write_json
from shared.errors import UserError

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
PARAM_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
# Written into cfg.json unless the caller says otherwise: facts about this module's math that
# SAELens reads when it loads the folder.
_CFG_DEFAULTS = {"architecture": "standard", "apply_b_dec_to_input": True, "dtype": "float32"}


@dataclass
class SAEConfig:
    """Shape of an SAE; everything about how it was trained belongs to the caller's config."""

    d_in: int
    """Width of the activations it reads (the hook point's d_model)."""
    d_sae: int
    """Number of features (dictionary size)."""

    def __post_init__(self) -> None:
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise UserError(f"SAE {name} must be a positive integer, got {value!r}")


class SAEOutput(NamedTuple):
    sae_out: torch.Tensor  # [batch, d_in]: the reconstruction x_hat
    feature_acts: torch.Tensor  # [batch, d_sae]: f, non-negative


class SAELosses(NamedTuple):
    """Scalars, each averaged over the batch (sums over the feature/input dimension)."""

    mse: torch.Tensor  # mean over rows of ||x - x_hat||^2
    l1: torch.Tensor  # mean over rows of sum_i |f_i|
    total: torch.Tensor  # mse + l1_coefficient * l1


class SparseAutoencoder(torch.nn.Module):
    """ReLU SAE with a tied pre-encoder bias (b_dec is subtracted before encoding)."""

    W_enc: torch.nn.Parameter  # [d_in, d_sae]
    b_enc: torch.nn.Parameter  # [d_sae]
    W_dec: torch.nn.Parameter  # [d_sae, d_in]
    b_dec: torch.nn.Parameter  # [d_in]

    def __init__(self, cfg: SAEConfig, device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.input_scale_folded = 1.0
        """Product of the scales passed to `fold_scaling_` (recorded in cfg.json on save)."""
        W_dec = torch.empty(cfg.d_sae, cfg.d_in, device=device)
        torch.nn.init.kaiming_uniform_(W_dec)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        # Encoder starts as the decoder's transpose: each feature first reads its own direction.
        self.W_enc = torch.nn.Parameter(W_dec.T.contiguous())  # row-major, like a loaded one
        self.b_enc = torch.nn.Parameter(torch.zeros(cfg.d_sae, device=device))
        self.W_dec = torch.nn.Parameter(W_dec)
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_in, device=device))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x: [batch, d_in] -> feature activations [batch, d_sae]."""
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """feature_acts: [batch, d_sae] -> reconstruction [batch, d_in]."""
        return feature_acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        feature_acts = self.encode(x)
        return SAEOutput(sae_out=self.decode(feature_acts), feature_acts=feature_acts)

    @staticmethod
    def loss(x: torch.Tensor, out: SAEOutput, l1_coefficient: float) -> SAELosses:
        """Losses of `out = sae(x)`; x: [batch, d_in]. Computed in the dtype of `out`."""
        mse = (x - out.sae_out).pow(2).sum(dim=-1).mean()
        l1 = out.feature_acts.abs().sum(dim=-1).mean()
        return SAELosses(mse=mse, l1=l1, total=mse + l1_coefficient * l1)

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm_(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions_(self) -> None:
        """Project out of each W_dec.grad row its component along that row.

        Why: the row is renormalised after the step anyway, so the parallel component would only
        change its length; removing it makes Adam's moments track the useful (tangent) part.
        """
        grad = self.W_dec.grad
        if grad is None:
            return
        direction = self.W_dec / self.W_dec.norm(dim=1, keepdim=True)  # [d_sae, d_in]
        parallel = (grad * direction).sum(dim=1, keepdim=True)  # [d_sae, 1]
        grad -= parallel * direction

    @torch.no_grad()
    def fold_scaling_(self, scale: float) -> None:
        """Make a model trained on `x * scale` work on raw `x`.

        With W_enc' = s W_enc, b_dec' = b_dec / s, W_dec' = W_dec / s, b_enc' = b_enc:
            (x - b_dec') W_enc' + b_enc' = (s x - b_dec) W_enc + b_enc   (same features)
            f W_dec' + b_dec' = (f W_dec + b_dec) / s                    (reconstruction / s)
        The decoder rows then have norm 1/s (not 1): `input_scale_folded` records the scale and
        `save` writes it to cfg.json. Do not call `set_decoder_norm_to_unit_norm_` afterwards.
        """
        if not scale > 0:
            raise UserError(f"input scale to fold must be positive, got {scale}")
        self.W_enc *= scale
        self.b_dec /= scale
        self.W_dec /= scale
        self.input_scale_folded *= scale

    def save(self, folder: str | Path, cfg_dict: dict[str, Any] | None = None) -> Path:
        """Write `cfg.json` (the caller's config + shape + facts) and float32 safetensors weights.

        Each file is written to a temp name and renamed into place, weights first, so a crash never
        leaves a cfg.json describing weights that are not there.
        """
        folder = Path(folder)
        cfg = self._cfg_for_saving(cfg_dict or {})
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().to("cpu", torch.float32).contiguous()
                   for name in PARAM_NAMES}
        tmp = temp_path(folder / WEIGHTS_NAME)
        save_file(tensors, str(tmp))
        commit(tmp, folder / WEIGHTS_NAME)
        write_json(folder / CFG_NAME, cfg)
        return folder

    def _cfg_for_saving(self, cfg_dict: dict[str, Any]) -> dict[str, Any]:
        for key, value in asdict(self.cfg).items():
            if key in cfg_dict and cfg_dict[key] != value:
                raise UserError(f"cfg {key}={cfg_dict[key]} disagrees with the SAE's {key}={value}")
        cfg = {**_CFG_DEFAULTS, **cfg_dict, **asdict(self.cfg)}
        if self.input_scale_folded != 1.0:
            cfg["input_scale_folded"] = self.input_scale_folded
        return cfg

    @classmethod
    def load_from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "SparseAutoencoder":
        """Rebuild an SAE from a folder written by `save` (or a SAELens "standard" SAE folder)."""
        folder = Path(path)
        cfg = read_cfg(folder)
        tensors = _read_weights(folder / WEIGHTS_NAME, device)
        # Built on the meta device: no memory, and no draw from torch's RNG for an init that the
        # saved weights replace (loading must not change what a seeded run does next).
        sae = cls(SAEConfig(d_in=cfg["d_in"], d_sae=cfg["d_sae"]), device="meta")
        _check_shapes(folder, tensors, sae)
        sae.load_state_dict({name: tensors[name].to(torch.float32) for name in PARAM_NAMES}, assign=True)
        sae.input_scale_folded = float(cfg.get("input_scale_folded", 1.0))
        return sae


def read_cfg(folder: Path) -> dict[str, Any]:
    """The cfg.json of an SAE folder; a one-line UserError if it is missing or unusable."""
    if not folder.is_dir():
        raise UserError(f"SAE folder not found: {folder}")
    cfg_path = folder / CFG_NAME
    if not cfg_path.is_file():
        raise UserError(f"{cfg_path} is missing: not an SAE folder written by `save`")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{cfg_path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(k), int) for k in ("d_in", "d_sae")):
        raise UserError(f"{cfg_path} must hold integer 'd_in' and 'd_sae'")
    return cfg


def _read_weights(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{path} is missing: the SAE folder holds no weights")
    try:
        tensors = load_file(str(path), device=str(device))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} could not be read as safetensors ({e})") from None
    missing = [name for name in PARAM_NAMES if name not in tensors]
    if missing:
        raise UserError(f"{path} lacks tensors {missing} (has {sorted(tensors)})")
    return tensors


def _check_shapes(folder: Path, tensors: dict[str, torch.Tensor], sae: SparseAutoencoder) -> None:
    for name in PARAM_NAMES:
        want, got = tuple(getattr(sae, name).shape), tuple(tensors[name].shape)
        if want != got:
            raise UserError(f"{folder / WEIGHTS_NAME}: {name} has shape {got}, but cfg.json "
                            f"(d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae}) implies {want}")
