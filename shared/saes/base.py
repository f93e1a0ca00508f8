"""The interface every SAE architecture implements, and what they all share.

An architecture is one file in this package: a subclass of `SAE` with its own `Settings`
dataclass, registered by its `architecture` name in `shared.saes.registry`. Generic code (the
training step, checkpoints, evaluation) talks only to this interface:

    encode(x) -> f                      x: [batch, d_in] -> f: [batch, d_sae], inference form
    decode(f) -> x_hat                  f: [batch, d_sae] -> x_hat: [batch, d_out]
    training_forward(x, step, target) -> TrainOutput   named loss terms whose sum is the loss;
                                        target: [batch, d_out], x itself when omitted
    before_optimizer_step_() / after_optimizer_step_(out)   constraints and running estimates
    calibrate_inference_(x)             fit the inference form to sample rows before a save
    inference_form() -> (architecture, tensors, cfg)        what `save` writes (SAELens' layout;
                                        `saved_form` names it as a transcoder where it is one)

The input is what the dictionary reads, the target what it writes: for an SAE both are the same
activations (d_out = d_in), for a transcoder they come from different hooks of one harvest pass
(the MLP's input and output). Every reconstruction term is measured against the target
(`reconstruction_error`).

Every architecture is also a transcoder (`SAEConfig.apply_b_dec_to_input` False): an SAE's encoder
reads `s = x - b_dec` (the pre-encoder bias of Towards Monosemanticity), a transcoder's reads x
itself, its b_dec living in the target's space (`encoder_input`); so input and target scaling fold
into W_enc, W_dec, b_dec and the encoder bias the same way for every one of them (`fold_scaling_`).
A transcoder may add a linear skip path, out = decode(f) + x @ W_skip.T (`skip_connection`, Paulo
et al. 2025, "Transcoders Beat Sparse Autoencoders for Interpretability"); every loss term then
reconstructs the target minus the skip path's output, which is the same loss as the skip path's
sum reconstructing the target (`training_forward`).
Parameters and buffers (thresholds, running estimates) are all a resume needs: the trainer saves
`named_parameters()` and `named_buffers()` with their Adam state.
"""
from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch

from shared.atomic import commit, save_tensors, temp_path, write_json
from shared.errors import UserError
from shared.saes.settings_base import BaseSettings, SAEConfig
from shared.saes.transcoder_names import saved_name

CFG_NAME = "cfg.json"
WEIGHTS_NAME = "sae_weights.safetensors"
SAE_LENS_VERSION = "6.54.12"
"""The SAELens release our on-disk form was checked against. SAELens reads `metadata` as written
only when `metadata.sae_lens_version` is present; without it the folder is treated as pre-6.0."""


class SAEOutput(NamedTuple):
    """What `sae(x)` returns for x [batch, d_in]: the reconstruction and the feature activations
    (`sae.encode(x)`, in the inference form; training's losses come from `training_forward`)."""

    sae_out: torch.Tensor  # [batch, d_out]: the reconstruction x_hat of the target
    feature_acts: torch.Tensor  # [batch, d_sae]: f, non-negative


class StepContext(NamedTuple):
    """What the trainer knows about this step that a loss may need."""

    sparsity_scale: float = 1.0
    """Multiplier of the sparsity coefficient (L1 or L0), for the warm-up: 0 -> 1."""
    sparsity_multiplier: torch.Tensor | float = 1.0
    """A further multiplier of the sparsity coefficient: the target-L0 controller's (a scalar tensor
    on the device, so that steering it costs no host sync; `train.sparsity_control`), else 1."""
    dead_mask: torch.Tensor | None = None
    """[d_sae] bool: features that have not fired for `dead_feature_window` steps (AuxK)."""


class TrainOutput(NamedTuple):
    sae_out: torch.Tensor  # [batch, d_out]
    feature_acts: torch.Tensor  # [batch, d_sae], as training used them
    losses: dict[str, torch.Tensor]  # named scalar terms, each already weighted; always "mse" (`sum_sq_err`)
    loss: torch.Tensor  # their sum: what backward() runs on
    fired: torch.Tensor | None = None
    """[d_sae]: rows of the batch on which each feature fired, when the architecture counts them
    cheaper than a scan of the dense feature_acts (the sparse TopK path: a bincount of k pairs)."""


def sum_sq_err(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ||x - x_hat||^2 (summed over the width), in float32 whatever autocast did.
    x, x_hat: [batch, width]."""
    return (x.float() - x_hat.float()).pow(2).sum(dim=-1).mean()


class SAE(torch.nn.Module):
    """Base of every architecture: W_enc [d_in, d_sae], W_dec [d_sae, d_out], b_dec [d_out], and
    for a skip transcoder W_skip [d_out, d_in]."""

    architecture: ClassVar[str]
    Settings: ClassVar[type[BaseSettings]] = BaseSettings
    unit_norm_decoder: ClassVar[bool] = True
    """Decoder rows are renormalised to 1 after every step (and their parallel gradient removed)."""
    dead_feature_policy: ClassVar[str] = "none"
    """How training revives dead features: 'resample' (Anthropic 2023), 'auxk' (Gao et al. 2024) or 'none'."""
    batch_wide_selection: ClassVar[bool] = False
    """Features are chosen over the whole batch (BatchTopK), so a batch cannot be split over processes."""
    sparsity_setting: ClassVar[str | None] = None
    """The setting that sets the sparsity (a coefficient, or k): swept for frontiers, named in run names."""
    sparsity_label: ClassVar[str] = ""
    """How run names write `sparsity_setting` ('L1' -> '...-L1-1.2-...')."""
    sparsity_warm_up: ClassVar[str | None] = None
    """The training setting (steps) over which the sparsity coefficient ramps up from 0, if it does."""
    transcoder_only: ClassVar[bool] = False
    """Always reads other hooks than it writes (a cross-layer transcoder): saved under its own name."""
    shape_settings: ClassVar[tuple[str, ...]] = ("skip_connection",)
    """Settings beyond d_in and d_sae that make a trained SAE the one it is (its tensors mean
    something else under other values): a resume may not change them."""

    W_enc: torch.nn.Parameter
    W_dec: torch.nn.Parameter
    b_dec: torch.nn.Parameter

    def __init__(self, cfg: SAEConfig, settings: BaseSettings | None = None,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        self.cfg = cfg
        self.settings = settings if settings is not None else self.Settings()
        if not isinstance(self.settings, self.Settings):
            raise TypeError(f"{type(self).__name__} takes {self.Settings.__name__}, got {type(self.settings).__name__}")
        self.settings.validate(cfg)  # first: a bad value is named whatever the shape
        self.check_shape(cfg)
        self.input_scale_folded = 1.0
        """Product of the input scales passed to `fold_scaling_` (recorded in cfg.json on save)."""
        self.target_scale_folded = 1.0
        """Product of the target scales passed to `fold_scaling_` (recorded where it differs)."""
        self.init_parameters_(cfg, device)

    def init_parameters_(self, cfg: SAEConfig, device: str | torch.device) -> None:
        """Create every parameter and buffer: W_enc, W_dec, b_dec here, then the architecture's
        own (`init_extra_`) and the skip path (an architecture of other tensors overrides this)."""
        init_norm = self.settings.decoder_init_norm
        directions = _kaiming_unit_rows(cfg.d_sae, cfg.d_in, device)  # [d_sae, d_in]
        # Encoder tied to the decoder's directions but small (see BaseSettings.decoder_init_norm).
        self.W_enc = torch.nn.Parameter((directions * init_norm).T.contiguous())  # row-major, like a loaded one
        if cfg.transcoder:  # the target is another space: the decoder's directions are its own draw
            directions = _kaiming_unit_rows(cfg.d_sae, cfg.d_out, device)
        self.W_dec = torch.nn.Parameter(directions if self.unit_norm_decoder else directions * init_norm)
        self.b_dec = torch.nn.Parameter(torch.zeros(cfg.d_out, device=device))
        self.init_extra_(device)
        if self.settings.skip_connection:  # zero: training starts as the plain transcoder
            self.W_skip = torch.nn.Parameter(torch.zeros(cfg.d_out, cfg.d_in, device=device))

    @staticmethod
    def training_bytes(d_in: int, d_out: int, d_sae: int, n_layers: int, batch: int) -> int:
        """Rough peak memory of one in training (float32): weights, gradients and two Adam moments
        (16 bytes per parameter), a checkpoint copy, and about five [batch, d_sae] activations
        (`n_layers`, the input's hooks, matters only to architectures whose tensors depend on it)."""
        params = d_in * d_sae + d_sae * d_out + d_sae + d_out
        return 20 * params + 5 * 4 * batch * d_sae

    def init_extra_(self, device: str | torch.device) -> None:
        """Create the architecture's other parameters and buffers (called by __init__)."""

    def check_shape(self, cfg: SAEConfig) -> None:
        """Refuse shapes the architecture cannot have: an SAE subtracts b_dec before the encoder
        and adds it after the decoder, so it writes the width it reads; a transcoder
        (apply_b_dec_to_input False) writes any width."""
        if cfg.d_out != cfg.d_in and cfg.apply_b_dec_to_input:
            raise UserError(f"a {self.architecture} SAE reconstructs its input: d_out ({cfg.d_out}) must equal "
                            f"d_in ({cfg.d_in}); to write another hook's activations, train a transcoder "
                            "(--target-shards)")

    # ---- the interface ---------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, feature_acts: torch.Tensor) -> torch.Tensor:
        """feature_acts: [batch, d_sae] -> reconstruction of the target [batch, d_out]."""
        return feature_acts @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> SAEOutput:
        feature_acts = self.encode(x)
        return SAEOutput(sae_out=self.decode(feature_acts) + self.skip(x), feature_acts=feature_acts)

    def skip(self, x: torch.Tensor) -> torch.Tensor | float:
        """The skip path's output x @ W_skip.T ([..., d_out]); 0.0 without one."""
        if not self.settings.skip_connection:
            return 0.0
        return x @ self.W_skip.T

    def encoder_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder multiplies: x - b_dec for an SAE, x for a transcoder."""
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def training_forward(self, x: torch.Tensor, step: StepContext = StepContext(),
                         target: torch.Tensor | None = None) -> TrainOutput:
        """The loss terms of one batch: x [batch, d_in] read, target [batch, d_out] reconstructed
        (x itself when None, as for an SAE). With a skip path, the architecture reconstructs
        target - skip(x) (the gradient reaching W_skip through it) and sae_out adds skip(x) back."""
        target = self.checked_target(x, target)
        if not self.settings.skip_connection:
            return self.training_losses(x, target, step)
        skip = self.skip(x)
        out = self.training_losses(x, target - skip, step)
        return out._replace(sae_out=out.sae_out + skip)

    def training_losses(self, x: torch.Tensor, target: torch.Tensor, step: StepContext) -> TrainOutput:
        """The architecture's loss terms, every reconstruction term against `target`."""
        raise NotImplementedError

    def checked_target(self, x: torch.Tensor, target: torch.Tensor | None) -> torch.Tensor:
        """The target of a batch: x when None, else `target` once its shape is checked."""
        if target is None:
            if self.cfg.transcoder:
                raise ValueError("a transcoder's training_forward needs its target (another hook's activations)")
            return x
        if target.shape[:-1] != x.shape[:-1] or target.shape[-1] != self.cfg.d_out:
            raise UserError(f"target of shape {tuple(target.shape)} does not fit an input of shape "
                            f"{tuple(x.shape)} and d_out={self.cfg.d_out}")
        return target

    @staticmethod
    def reconstruction_error(target: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
        """The reconstruction loss, the same for every architecture and every term that
        reconstructs: mean over rows of ||target - x_hat||^2 (`sum_sq_err`). [batch, d_out] each."""
        return sum_sq_err(target, x_hat)

    def hidden_pre(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations (x - b_dec) @ W_enc + b_enc: [..., d_in] -> [..., d_sae] (architectures with b_enc)."""
        s = self.encoder_input(x).reshape(-1, self.cfg.d_in)  # any leading dims ([batch, pos, d_in] in evaluation)
        h = torch.addmm(self.b_enc, s, self.W_enc)  # bias fused: one pass fewer over [batch, d_sae]
        return h.reshape(*x.shape[:-1], self.cfg.d_sae)

    @torch.no_grad()
    def before_optimizer_step_(self) -> None:
        if self.unit_norm_decoder:
            self.remove_gradient_parallel_to_decoder_directions_()

    @torch.no_grad()
    def after_optimizer_step_(self, out: TrainOutput) -> None:
        if self.unit_norm_decoder:
            self.set_decoder_norm_to_unit_norm_()

    @property
    def calibration_rows(self) -> int:
        """Training rows `calibrate_inference_` wants before each save (0: it calibrates nothing)."""
        return 0

    @torch.no_grad()
    def calibrate_inference_(self, x: torch.Tensor) -> None:
        """Fit what the inference form estimates from data (BatchTopK's threshold) to training
        rows x [n, d_in] (training space); never a parameter or buffer, so training and its
        resume do not see it. The trainer calls it before every save (`SAETrainer`)."""

    def inference_form(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        """(architecture name SAELens loads, its tensors, extra cfg.json keys), as an SAE: what
        the architecture computes at inference (`saved_form` adds the transcoder's part)."""
        return self.architecture, dict(self.named_parameters()), {}

    def saved_form(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        """What `save` writes: `inference_form`, named as a transcoder where this is one
        (`shared.saes.transcoder_names`), with W_skip where it has a skip path."""
        architecture, tensors, extra = self.inference_form()
        if not self.cfg.transcoder:
            return architecture, tensors, extra
        if self.settings.skip_connection:
            tensors = {**tensors, "W_skip": self.W_skip}
        return saved_name(architecture, True, self.settings.skip_connection), tensors, extra

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups; an architecture may give a parameter its own rate
        (JumpReLU's threshold). The first group's lr is the one logged."""
        return [{"params": list(self.parameters()), "lr": lr}]

    def load_inference_(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take the tensors `inference_form` wrote (float32, on the target device) as this SAE's
        own; built on the meta device, so nothing was allocated or drawn from the RNG before."""
        self.load_state_dict(tensors, strict=True, assign=True)

    # ---- shared mechanics ------------------------------------------------------------------
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
    def fold_scaling_(self, input_scale: float, target_scale: float | None = None) -> None:
        """Make a model trained on inputs `x * a` and targets `t * b` work on raw x and t
        (b = a when target_scale is None: an SAE, whose input is its target).

        Trained: h = (a x - b_dec) W_enc + b_enc, t_hat' = f W_dec + b_dec ~ b t. With
            W_enc' = a W_enc,  b_dec' = b_dec / b,  W_dec' = W_dec / b,
            b_enc' = b_enc + (a / b - 1) b_dec W_enc
        every pre-activation is unchanged, hence every feature and threshold:
            (x - b_dec') W_enc' + b_enc' = a x W_enc - (a / b) b_dec W_enc + b_enc'
                                         = (a x - b_dec) W_enc + b_enc        (same features)
            f W_dec' + b_dec' = (f W_dec + b_dec) / b = t_hat' / b            (raw target's scale)
        The encoder-bias shift (`shift_encoder_bias_`) is zero when a = b, and skipped then, so an
        SAE's fold is the plain one: W_enc' = a W_enc, b_dec' = b_dec / a, W_dec' = W_dec / a.
        A transcoder's encoder reads x itself, h = a x W_enc + b_enc: no shift at all; its skip
        path a x W_skip^T ~ b t folds as W_skip' = W_skip a / b.
        Unit-norm decoder rows then have norm 1/b: `input_scale_folded` and `target_scale_folded`
        record the scales.
        """
        target_scale = input_scale if target_scale is None else target_scale
        for name, scale in (("input", input_scale), ("target", target_scale)):
            if not scale > 0:
                raise UserError(f"{name} scale to fold must be positive, got {scale}")
        if input_scale != target_scale and self.cfg.apply_b_dec_to_input:
            self.shift_encoder_bias_((input_scale / target_scale - 1.0) * (self.b_dec @ self.W_enc))
        if self.settings.skip_connection:
            self.W_skip *= input_scale / target_scale
        self.W_enc *= input_scale
        self.b_dec /= target_scale
        self.W_dec /= target_scale
        self.input_scale_folded *= input_scale
        self.target_scale_folded *= target_scale

    @torch.no_grad()
    def shift_encoder_bias_(self, delta: torch.Tensor) -> None:
        """Add delta [d_sae] to every pre-activation: h = s @ W_enc + b_enc (an architecture with
        other encoder biases overrides this)."""
        self.b_enc += delta

    def save(self, folder: str | Path, cfg_dict: dict[str, Any] | None = None) -> Path:
        """Write `cfg.json` (the caller's config + shape + facts) and float32 safetensors weights,
        in the inference form SAELens loads. Weights first, each file renamed into place, so a
        crash never leaves a cfg.json describing weights that are not there."""
        folder = Path(folder)
        architecture, tensors, extra = self.saved_form()
        cfg = self._cfg_for_saving(cfg_dict or {}, architecture, extra)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in tensors.items()}
        tmp = temp_path(folder / WEIGHTS_NAME)
        save_tensors(tensors, tmp)
        commit(tmp, folder / WEIGHTS_NAME)
        write_json(folder / CFG_NAME, cfg)
        return folder

    def _cfg_for_saving(self, cfg_dict: dict[str, Any], architecture: str, extra: dict[str, Any]) -> dict[str, Any]:
        shape = self.cfg.saved_shape()
        for key, value in shape.items():
            if key in cfg_dict and cfg_dict[key] != value:
                raise UserError(f"cfg {key}={cfg_dict[key]} disagrees with the SAE's {key}={value}")
        metadata = {**cfg_dict.get("metadata", {}), "sae_lens_version": SAE_LENS_VERSION}
        for key in ("hook_name", "model_name", "context_size", "prepend_bos", "hook_head_index"):
            if key in cfg_dict:
                metadata.setdefault(key, cfg_dict[key])
        cfg = {**cfg_dict, **asdict(self.settings), **extra, **shape,
               "architecture": architecture, "trained_architecture": self.architecture,
               "apply_b_dec_to_input": self.cfg.apply_b_dec_to_input, "dtype": "float32", "normalize_activations": "none",
               "reshape_activations": "none", "metadata": metadata}
        if self.input_scale_folded != 1.0:
            cfg["input_scale_folded"] = self.input_scale_folded
        if self.target_scale_folded != self.input_scale_folded:
            cfg["target_scale_folded"] = self.target_scale_folded
        return cfg

    @classmethod
    def settings_from(cls, values: dict[str, Any]) -> BaseSettings:
        """This architecture's settings from a flat mapping (a cfg.json or the training config);
        keys it does not use are ignored, None means the default."""
        names = {f.name for f in fields(cls.Settings)}
        return cls.Settings(**{k: v for k, v in values.items() if k in names and v is not None})

    @classmethod
    def load_from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu") -> "SAE":
        """Rebuild an SAE from a folder written by `save` (or a SAELens folder of a registered
        architecture), whatever its architecture."""
        from shared.saes.io import load_sae

        return load_sae(path, device)


def _kaiming_unit_rows(rows: int, cols: int, device: str | torch.device) -> torch.Tensor:
    """[rows, cols], Kaiming-uniform then each row scaled to unit norm (random directions)."""
    weight = torch.empty(rows, cols, device=device)
    if weight.device.type != "meta":
        torch.nn.init.kaiming_uniform_(weight)
        weight /= weight.norm(dim=1, keepdim=True)
    return weight


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
    if not isinstance(cfg.get("d_out", cfg["d_in"]), int):
        raise UserError(f"{cfg_path}: 'd_out' must be an integer when present")
    return cfg
