"""One SAE being trained: its model, optimizer, schedule, dead-feature state and metric sums.

The loop feeds it batches (`update`); a sweep feeds several of these the same batch. All state a
resumed run needs lives in tensors and numbers that `train.checkpoint` saves.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from shared.saes import SAE, SAEConfig, StepContext, architecture_class
from shared.saes.settings_base import TargetL0Settings
from train.arch_settings import resolved
from train.batch import Batch
from train.config import LanguageModelSAERunnerConfig
from train.geometric_median import geometric_median
from train.resample import resample_anthropic_, resample_l2_
from train.schedulers import make_lr_lambda, sparsity_warmup_factor
from train.sparsity_control import SparsityControl
from train.step import StepResult, explained_variance, make_optimizer, train_step_
from train.units import raw_mse

CALIBRATION_SALT = 2**40
"""Added to the step to seed the rows of `calibrate_inference_` (resampling's salt is the step
itself, b_dec's sample 0): its draws never coincide with theirs."""

RowSampler = Callable[[int, int], "Batch | torch.Tensor"]  # (n_rows, seed) -> n raw rows (input, target)


@dataclass
class Counters:
    """Plain numbers of a trainer's state (tensors live on the trainer itself)."""

    step: int = 0
    tokens_seen: int = 0
    window_rows: int = 0  # rows since the density window was last reset
    n_resampled_total: int = 0
    n_resampled_last: int = 0
    auxk_active: bool = False  # some feature was dead at the last check (see `auxk_mask`)


class SAETrainer:
    def __init__(self, cfg: LanguageModelSAERunnerConfig, d_in: int, input_scale: float,
                 total_steps: int, device: torch.device, target_scale: float | None = None,
                 d_out: int | None = None, transcoder: bool = False, n_hooks: int = 1):
        self.cfg = cfg
        self.d_in = d_in
        self.d_out = d_in if d_out is None else d_out
        """Width of the target (d_in for an SAE, whose target is its input)."""
        self.input_scale = input_scale  # x_train = x_raw * input_scale (1.0 unless expected_norm)
        self.target_scale = input_scale if target_scale is None else target_scale
        """t_train = t_raw * target_scale: the target dump's own scale (the input's for an SAE)."""
        self.total_steps = total_steps
        self.device = device
        self.settings = resolved(cfg, total_steps)
        """Effective run-level settings of this SAE (resampling, warm-ups, lr decay)."""
        cls = architecture_class(cfg.architecture)
        torch.manual_seed(cfg.seed if cfg.init_seed is None else cfg.init_seed)  # the init: a pure function of it
        shape = SAEConfig(d_in=d_in, d_sae=cfg.sae_width(d_in), d_out=self.d_out, apply_b_dec_to_input=not transcoder,
                          n_hooks=n_hooks)
        self.sae: SAE = cls(shape, cls.settings_from(cfg.to_dict()), device=device)
        self.optimizer = make_optimizer(self.sae, cfg.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, make_lr_lambda(cfg.lr_scheduler_name, total_steps, cfg.lr_warm_up_steps,
                                           self.settings["lr_decay_steps"]))
        d_sae = self.sae.cfg.d_sae
        self.tokens_since_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.window_fired = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.fired_total = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.counters = Counters()
        target_l0 = self.sae.settings.target_l0 if isinstance(self.sae.settings, TargetL0Settings) else None
        self.sparsity_control = None if target_l0 is None else \
            SparsityControl(target_l0, self.settings["sparsity_warm_up_steps"], device, total_steps)
        """The target-L0 controller of the sparsity coefficient (`train.sparsity_control`), if any."""
        self.shard = None
        """Data-parallel: this rank's `train.distributed.DataShard`; `update` then takes this rank's
        rows of each global batch and keeps every count and metric of the whole batch (the same on
        every rank)."""
        self.row_sampler: RowSampler | None = None
        """(n_rows, salt) -> n raw training rows drawn seeded by (seed, salt), as resampling draws
        them; set by the run (`train.run.make_slot`). Feeds `calibrate_inference_` before saves."""
        self._last_batch_rows = 0  # rows of the last global batch (data-parallel: more than this rank saw)
        self._sums: dict[str, torch.Tensor] = {}
        self._sum_steps = 0
        # Divergence watch, kept on the device so that no step syncs: whether every loss since
        # the last check was finite, and how many steps were before the first that was not.
        self._all_finite = torch.ones((), dtype=torch.bool, device=device)
        self._finite_steps = torch.zeros((), dtype=torch.int64, device=device)
        self._checked_step: int | None = None  # counters.step at the last clean check

    # ---- initialisation --------------------------------------------------------------------
    @torch.no_grad()
    def init_b_dec_(self, mean: torch.Tensor, sample: Callable[[], torch.Tensor]) -> None:
        """b_dec from the target's dump (the input's, for an SAE): geometric median of a sample
        of its raw rows, its mean (raw, [d_out]), or zeros."""
        method = self.cfg.b_dec_init_method
        if method == "mean":
            self.sae.b_dec.copy_(mean.to(self.device) * self.target_scale)
        elif method == "geometric_median":
            points = sample().to(self.device, torch.float32) * self.target_scale
            self.sae.b_dec.copy_(geometric_median(points).to(self.sae.b_dec.dtype))

    # ---- the step --------------------------------------------------------------------------
    def update(self, batch: Batch | torch.Tensor, rows: int | None = None) -> StepResult:
        """One optimizer step on batch (input [batch, d_in], target [batch, d_out]; a tensor is an
        SAE's batch, its own target), already scaled; no host sync but every
        `wandb_log_frequency` steps (AuxK's check, on a log step, which syncs anyway).

        Data-parallel, batch is this rank's rows of a global batch of `rows` rows."""
        c = self.counters
        batch = Batch.of(batch)
        rows = batch.input.shape[0] if rows is None else rows
        self._last_batch_rows = rows
        control = self.sparsity_control
        context = StepContext(sparsity_scale=self.sparsity_scale(c.step), dead_mask=self.auxk_mask(),
                              sparsity_multiplier=1.0 if control is None else control.multiplier())
        res = train_step_(self.sae, self.optimizer, self.scheduler, batch, context, autocast=self.cfg.autocast,
                          shard=self.shard, total=rows, clip_grad_norm=self.cfg.clip_grad_norm)
        if control is not None:
            control.update_(res.l0, c.step)
        if self._checked_step is None:  # first step of this process (fresh or resumed)
            self._checked_step = c.step
        self._all_finite &= torch.isfinite(res.losses["loss"])
        self._finite_steps += self._all_finite
        fired = res.feature_acts_fired
        self.tokens_since_fired.add_(rows).masked_fill_(fired > 0, 0)
        self.window_fired += fired
        self.fired_total += fired
        c.step += 1
        c.tokens_seen += rows
        c.window_rows += rows
        self._accumulate(res, rows)
        return res

    def auxk_mask(self) -> torch.Tensor | None:
        """The dead mask for AuxK, or None while no feature is dead.

        AuxK's top-k over the dead latents is a full pass and a top-k over [batch, d_sae]: with
        nothing dead it cost 43% of a TopK step (512 -> 16384, k 32). Whether anything is dead is
        checked on the host once per `wandb_log_frequency` steps, at the steps that log (which sync
        anyway), and kept in the counters so that a resumed run makes the same choices; a feature
        that dies in between joins AuxK at the next check, a few steps into its dead window.
        """
        if self.sae.dead_feature_policy != "auxk":
            return None
        c = self.counters
        dead = self.dead_mask()
        if c.step % self.cfg.wandb_log_frequency == 0:
            c.auxk_active = c.step >= self.settings["dead_feature_window"] and bool(dead.any())
        return dead if c.auxk_active else None

    def sparsity_scale(self, step: int) -> float:
        return sparsity_warmup_factor(step, self.settings["sparsity_warm_up_steps"])

    def sparsity_coefficient(self) -> float:
        """The coefficient the next step uses: configured x warm-up factor x the target-L0
        controller's multiplier (one host sync; call it where the loop syncs anyway)."""
        configured = getattr(self.sae.settings, type(self.sae).sparsity_setting)
        multiplier = 1.0 if self.sparsity_control is None else float(self.sparsity_control.multiplier())
        return configured * self.sparsity_scale(self.counters.step) * multiplier

    def _accumulate(self, res: StepResult, rows: int) -> None:
        parts = {**res.losses, "l0": res.l0, "sum_sq_err": res.sum_sq_err, "sum_sq_total": res.sum_sq_total,
                 "l2_ratio": res.l2_ratio}
        for k, v in parts.items():
            self._sums[k] = self._sums[k] + v if k in self._sums else v.clone()
        self._sum_steps += 1

    def pending_metrics(self) -> tuple[dict[str, torch.Tensor], int]:
        """The metric sums since the last log, and their step count (a checkpoint keeps them so
        that a resumed run's next row averages the same steps as the uninterrupted run's)."""
        return self._sums, self._sum_steps

    def restore_pending_metrics_(self, sums: dict[str, torch.Tensor], steps: int) -> None:
        self._sums = {k: v.to(self.device) for k, v in sums.items()}
        self._sum_steps = steps

    # ---- divergence ------------------------------------------------------------------------
    def first_non_finite_step(self) -> int | None:
        """The first step since the last check whose loss was NaN or infinite, else None (and
        the next check starts here). One host sync: call it where the loop syncs anyway."""
        if self._checked_step is None:
            return None
        if bool(self._all_finite):
            self._finite_steps.zero_()
            self._checked_step = self.counters.step
            return None
        return self._checked_step + int(self._finite_steps) + 1

    @torch.no_grad()
    def non_finite_tensors(self) -> list[str]:
        """Names of the parameters, buffers and Adam moments holding a NaN or an infinity."""
        named = list(self.sae.named_parameters()) + list(self.sae.named_buffers())
        named += [(f"Adam {key} of {n}", v) for n, p in self.sae.named_parameters()
                  for key, v in self.optimizer.state.get(p, {}).items() if torch.is_tensor(v)]
        named = [(n, t) for n, t in named if t.is_floating_point()]
        # One sync; the for-each Adam keeps its step counts on the CPU, hence the move.
        finite = torch.stack([torch.isfinite(t).all().to(self.device) for _, t in named]).tolist()
        return [n for (n, _), ok in zip(named, finite) if not ok]

    # ---- dead features ---------------------------------------------------------------------
    def dead_mask(self) -> torch.Tensor:
        """anthropic: no fire for dead_feature_window steps; l2: window density below threshold."""
        if self.settings["feature_sampling_method"] == "l2":
            density = self.window_fired.double() / max(1, self.counters.window_rows)
            return density < self.settings["dead_feature_threshold"]
        return self.tokens_since_fired >= self.settings["dead_feature_window"] * self.cfg.train_batch_size

    def end_of_window(self) -> bool:
        return self.counters.step % self.cfg.feature_sampling_window == 0

    def resample_(self, batch: Batch | torch.Tensor, sample_rows: RowSampler) -> int:
        """At a window's end: resample dead features (if configured), then reset the window.
        batch: the step's (scaled) batch; sample_rows gives raw rows, scaled here per side."""
        method = self.settings["feature_sampling_method"]
        reinit_scale = self.settings["feature_reinit_scale"]
        n = 0
        if method != "none":
            step = self.counters.step
            dead = self.dead_mask()
            # Seeded by (seed, step): a resumed run draws exactly what an uninterrupted one drew.
            gen = torch.Generator(device=self.device).manual_seed(
                int(np.random.default_rng([self.cfg.seed, step]).integers(2**62)))
            if bool(dead.any()):
                if method == "anthropic":
                    rows = Batch.of(sample_rows(self.settings["resample_sample_rows"], step))
                    rows = rows.scaled(self.input_scale, self.target_scale)
                    n = resample_anthropic_(self.sae, self.optimizer, dead, rows.input, reinit_scale, gen,
                                            targets=None if rows.same else rows.target)
                else:
                    batch = Batch.of(batch)
                    if self.shard is not None:  # the seed's method reads the whole current batch
                        batch = self._gathered(batch)
                    n = resample_l2_(self.sae, self.optimizer, dead, batch.input, reinit_scale, gen,
                                     targets=None if batch.same else batch.target)
                self.tokens_since_fired.masked_fill_(dead, 0)
        self.counters.n_resampled_last = n
        self.counters.n_resampled_total += n
        return n

    def _gathered(self, batch: Batch) -> Batch:
        """Data-parallel: the whole global batch from every rank's rows of it, both sides."""
        x = self.shard.gather_rows(batch.input, self._last_batch_rows)
        if batch.same:
            return Batch(x, x)
        return Batch(x, self.shard.gather_rows(batch.target, self._last_batch_rows))

    def window_density(self) -> torch.Tensor:
        return self.window_fired.double() / max(1, self.counters.window_rows)

    def reset_window(self) -> None:
        self.window_fired.zero_()
        self.counters.window_rows = 0

    # ---- before a save ---------------------------------------------------------------------
    @torch.no_grad()
    def calibrate_inference_(self) -> int:
        """Fit the SAE's inference form to training rows before a save (BatchTopK's threshold:
        `SAE.calibrate_inference_`); returns the rows used (0: nothing to fit, or no sampler).

        The rows are drawn seeded by (seed, CALIBRATION_SALT + step): a resumed run saves what
        the uninterrupted one saved. Nothing training reads changes: no parameter, buffer, RNG or
        loader position."""
        n = self.sae.calibration_rows
        if not n or self.row_sampler is None:
            return 0
        rows = Batch.of(self.row_sampler(n, CALIBRATION_SALT + self.counters.step))
        x = rows.scaled(self.input_scale, self.target_scale).input.to(self.device)
        self.sae.calibrate_inference_(x)
        return x.shape[0]

    # ---- metrics ---------------------------------------------------------------------------
    def pop_metrics(self) -> dict[str, float]:
        """Means since the last call (the one host sync of a log step)."""
        if not self._sum_steps:
            return {}
        s = {k: float(v) for k, v in self._sums.items()}
        n = self._sum_steps
        density = self.window_density()
        have_window = self.counters.window_rows > 0
        stats = ("l0", "sum_sq_err", "sum_sq_total", "l2_ratio")
        out = {name: value / n for name, value in s.items() if name not in stats}  # the loss terms
        out |= {
            "l0": s["l0"] / n,
            "explained_variance": float(explained_variance(torch.tensor(s["sum_sq_err"]),
                                                           torch.tensor(s["sum_sq_total"]))),
            "l2_norm_ratio": s["l2_ratio"] / n,
            "frac_dead": float(self.dead_mask().float().mean()),
            "frac_density_below_1e-5": float((density < 1e-5).float().mean()) if have_window else math.nan,
            "frac_density_below_1e-6": float((density < 1e-6).float().mean()) if have_window else math.nan,
            "n_resampled": self.counters.n_resampled_last,
            "lr": self.scheduler.get_last_lr()[0],
            "sparsity_warm_up": self.sparsity_scale(self.counters.step - 1),
        }
        if self.sparsity_control is not None:  # the path of the steered coefficient
            out["sparsity_coefficient"] = self.sparsity_coefficient()
        if "mse" in out:  # the loss term is in training space; beside it, the same in raw units
            out["mse_raw"] = raw_mse(out["mse"], self.target_scale)
        self._sums, self._sum_steps = {}, 0
        self.counters.n_resampled_last = 0
        return out

    def log10_density(self) -> torch.Tensor:
        """log10 of each feature's firing frequency over the whole run so far (sparsity file)."""
        return torch.log10(self.fired_total.double() / max(1, self.counters.tokens_seen) + 1e-10).float()
