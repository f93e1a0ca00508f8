"""The training loop: dump -> shuffled loader -> SAE steps -> resampling, metrics, checkpoints.

One loop serves a single run and a sweep alike: every batch is read once and fed to each SAE of
the group in turn (`for slot in slots: slot.trainer.update(batch)`), each SAE with its own optimizer,
schedule, resampling, metrics and checkpoints.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from shared.device import pick_device
from shared.errors import Interrupted, UserError
from shared.progress import say
from shared.reader import Dump, open_dump
from shared.storage import absolute
from shared.run_paths import dump_list, plain_name
from shared.saes import SAE
from train.arch_settings import check_fits, check_settings_used, check_shapes
from train.checkpoint import load_trainer_state_, read_state, save_checkpoint
from train.config import LanguageModelSAERunnerConfig
from train.data_digest import DIGEST_KEY
from train.holdout import split_rows
from train.batch import Batch
from train.loader import ActivationLoader, AlignedLoader
from train import distributed
from train.metrics_log import MetricsLog, NullMetrics
from train import run_layout
from train.run_folder import check_checkpoint_not_linked, check_local, hold_run_folder
from train.run_layout import SweepEntry
from train.sae_trainer import SAETrainer
from train.summary import log_summary_to_wandb, write_summary
from train.units import training_mse_text

B_DEC_SAMPLE_ROWS = 16384  # rows the geometric median is computed on


@dataclass
class TrainResult:
    sae: SAE  # in training space (see `final` for the saved, raw-input weights)
    run_dir: Path
    final: Path  # the final checkpoint folder
    trainer: SAETrainer
    evaluation: dict[str, Any] | None = None


@dataclass
class DataPlan:
    """What every SAE trained from one stream shares: the input and target dumps (one dump, the
    same object twice, for an SAE), their split, the loader, each side's scale."""

    dump: Dump
    """The input dump (what the encoder reads)."""
    target_dump: Dump
    """The target dump (what the decoder reconstructs): `dump` itself for an SAE."""
    loader: ActivationLoader
    """An `AlignedLoader` over (input, target) when they are two dumps."""
    input_scale: float
    target_scale: float
    total_tokens: int
    total_steps: int
    ident: dict[str, Any]
    _init_sample: torch.Tensor | None = None
    inputs: list[Dump] = field(default_factory=list)
    """Every input dump, in order (several: hooks whose rows are concatenated, a crosscoder's or a
    cross-layer transcoder's layers); [dump] when empty."""
    targets: list[Dump] = field(default_factory=list)
    """Every target dump, in order; [target_dump] when empty."""

    def __post_init__(self) -> None:
        self.inputs = self.inputs or [self.dump]
        self.targets = self.targets or [self.target_dump]
        served = loader_dumps(self.inputs, self.targets)
        self._in = [served.index(d) for d in self.inputs]
        self._out = [served.index(d) for d in self.targets]

    @property
    def paired(self) -> bool:
        """Whether the target is another hook than the input (a transcoder)."""
        return self._out != self._in

    @property
    def d_in(self) -> int:
        return sum(d.d_in for d in self.inputs)

    @property
    def d_out(self) -> int:
        return sum(d.d_in for d in self.targets)

    @property
    def n_hooks(self) -> int:
        """Input hooks concatenated (1 but for crosscoders and cross-layer transcoders)."""
        return len(self.inputs)

    def assemble(self, raw: Any) -> Batch:
        """A loader batch (a tensor, or one tensor per served dump) as an unscaled Batch: each
        side the concatenation of its dumps' rows, an SAE's one tensor."""
        parts = (raw,) if isinstance(raw, torch.Tensor) else tuple(raw)
        x = _concat([parts[i] for i in self._in])
        return Batch(x, x) if not self.paired else Batch(x, _concat([parts[i] for i in self._out]))

    def batch(self, raw: Any) -> Batch:
        """A loader batch as a scaled training Batch."""
        return self.assemble(raw).scaled(self.input_scale, self.target_scale)

    def init_sample(self, seed: int) -> torch.Tensor:
        """Random training rows of the target (the input, for an SAE) for b_dec's geometric
        median, read once for a whole sweep: [rows, d_out], raw."""
        if self._init_sample is None:
            self._init_sample = self.assemble(random_rows(self.loader, B_DEC_SAMPLE_ROWS, seed, 0)).target
        return self._init_sample


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def loader_dumps(inputs: list[Dump], targets: list[Dump]) -> list[Dump]:
    """The dumps the loader serves, each once, inputs first."""
    served: list[Dump] = []
    for d in [*inputs, *targets]:
        if not any(d is s for s in served):
            served.append(d)
    return served


@dataclass
class Slot:
    """One SAE in the loop, with where its outputs go."""

    name: str
    trainer: SAETrainer
    metrics: MetricsLog
    run_dir: Path
    checkpoints: set[int] = field(default_factory=set)
    last_logged: dict[str, Any] = field(default_factory=dict)
    writes: bool = True  # False on data-parallel ranks other than 0: they train but write nothing


def steps_for_tokens(total_tokens: int, n_rows: int, batch_size: int) -> int:
    """Steps to see `total_tokens` rows when each epoch ends with a partial batch."""
    per_epoch = math.ceil(n_rows / batch_size)
    epochs, rest = divmod(total_tokens, n_rows)
    return epochs * per_epoch + math.ceil(rest / batch_size)


class NonFiniteError(UserError):
    """Training diverged: a loss or a weight became NaN or infinite."""


def dump_identity(dump: Dump, train_rows: tuple[int, int], target: Dump | None = None) -> dict[str, Any]:
    """What a checkpoint records about its activations (and what a resume must match); the dump
    path absolute, so the run folder finds it from any directory. `dump` is the input; a target
    that is another dump adds `target` (its path, fingerprint, hook, width and data digest); an
    SAE's identity (target None or the dump itself) has no `target`. `data_digest` (a hash of the
    shard checksums, train.data_digest) tells other data harvested at the same path."""
    m = dump.manifest
    ident = {"shards": absolute(dump.path), "dump_fingerprint": m.config_fingerprint, "hook_point": m.hook,
             "hook_point_layer": m.layer, "model_name": m.model, "dataset_path": m.dataset,
             "context_size": m.context_size, "prepend_bos": m.prepend_bos, "skip_bos": m.skip_bos,
             "d_in_dump": m.d_in, "train_rows": list(train_rows),
             "eval_holdout_contexts": (dump.n_rows - train_rows[1]) // m.rows_per_context,
             DIGEST_KEY: m.data_digest()}
    if target is not None and target is not dump:
        ident["target"] = hook_identity(target, "d_out_dump")
    return ident


def hook_identity(dump: Dump, width_key: str = "d_in_dump") -> dict[str, Any]:
    """What a resume must match of one more dump than the input: path, fingerprint, hook, width
    and data digest."""
    m = dump.manifest
    return {"shards": absolute(dump.path), "dump_fingerprint": m.config_fingerprint, "hook_point": m.hook,
            "hook_point_layer": m.layer, width_key: m.d_in, DIGEST_KEY: m.data_digest()}


def plan_identity(inputs: list[Dump], targets: list[Dump], train_rows: tuple[int, int]) -> dict[str, Any]:
    """`dump_identity` of the first input and target, plus `more_inputs` / `more_targets` (the
    other hooks, in order) where a side concatenates several dumps."""
    ident = dump_identity(inputs[0], train_rows, targets[0])
    if len(inputs) > 1:
        ident["more_inputs"] = [hook_identity(d) for d in inputs[1:]]
    if len(targets) > 1 and targets != inputs:
        ident["more_targets"] = [hook_identity(d, "d_out_dump") for d in targets[1:]]
    return ident


def _target_key(ident: dict[str, Any]) -> tuple[Any, ...] | None:
    """What a resume must match of the target dump: None for an SAE (its target is its input)."""
    target = ident.get("target")
    if not isinstance(target, dict):
        return None
    return target.get("dump_fingerprint"), target.get("hook_point"), target.get("d_out_dump")


def _more_keys(ident: dict[str, Any]) -> tuple[Any, ...]:
    """What a resume must match of the further hooks of each side (none for one hook a side)."""
    def keys(entries: Any) -> tuple[Any, ...]:
        if not isinstance(entries, list):
            return ()
        return tuple((e.get("dump_fingerprint"), e.get("hook_point"), e.get(DIGEST_KEY)) if isinstance(e, dict)
                     else None for e in entries)
    return keys(ident.get("more_inputs")), keys(ident.get("more_targets"))


def open_training_dumps(cfg: LanguageModelSAERunnerConfig, verify: bool, progress: bool = False) -> list[Dump]:
    """The input dumps `cfg.shards` names (one, or several separated by commas)."""
    paths = dump_list(cfg.shards)
    if not paths:
        raise UserError("no dump given: pass --shards DUMP_FOLDER (write one with `harvest`)")
    dumps = [open_dump(p, verify=verify, progress=progress) for p in paths]
    d_in = sum(d.d_in for d in dumps)
    if cfg.d_in is not None and cfg.d_in != d_in:
        raise UserError(f"d_in {cfg.d_in} does not match the dump's d_in {d_in} ({cfg.shards}); "
                        "drop d_in or pick the matching dump")
    for dump in dumps:
        if dump.n_rows == 0:
            raise UserError(f"{dump.path} holds no rows")
    return dumps


def check_resume(state: dict[str, Any], ident: dict[str, Any], folder: Path) -> None:
    """A one-line UserError unless the dumps `ident` describes are the ones the checkpoint in
    `folder` (its trainer state `state`) was trained on, with the same split."""
    saved = state["dump"]
    for key, what in (("d_in_dump", "d_in"), ("hook_point", "hook"), ("dump_fingerprint", "dump"),
                      (DIGEST_KEY, "data"), ("train_rows", "held-out split")):
        if key == DIGEST_KEY:  # after the settings (clearer messages), before the split (which
            _check_digest(saved, ident, folder, "dump")  # other data can move)
        elif saved.get(key) != ident[key]:
            raise UserError(f"{folder} was trained on a different {what} ({saved.get(key)}) than "
                            f"{ident['shards']} ({ident[key]}); resume with the run's own dump and settings")
    if _target_key(saved) != _target_key(ident):
        def shown(i: dict[str, Any]) -> str:
            return "its input" if _target_key(i) is None else f"{i['target'].get('shards')} ({_target_key(i)})"
        raise UserError(f"{folder} was trained on a different target ({shown(saved)}) than this run's "
                        f"({shown(ident)}); resume with the run's own dumps and settings")
    if isinstance(saved.get("target"), dict):
        _check_digest(saved["target"], ident["target"], folder, "target dump")
    if _more_keys(saved) != _more_keys(ident):
        raise UserError(f"{folder} was trained on other hooks (or other data at them) than this run's dumps: "
                        "resume with the run's own dumps, in the same order")


def _check_digest(saved: dict[str, Any], ident: dict[str, Any], folder: Path, what: str) -> None:
    """Other data at the recorded path (a re-harvest of an edited dataset keeps the settings'
    fingerprint); skipped for checkpoints written before the digest was recorded."""
    if saved.get(DIGEST_KEY) is not None and saved[DIGEST_KEY] != ident[DIGEST_KEY]:
        raise UserError(f"the {what} at {ident['shards']} now holds other data than the run in {folder} "
                        "was trained on (shard checksums differ): resume with the dumps it was "
                        "trained on, or start a new run")


def input_scale(cfg: LanguageModelSAERunnerConfig, dump: Dump | list[Dump]) -> float:
    """The scale of one side's activations (input or target, each from its own dumps):
    expected_norm: scale so E||x|| = sqrt(width), from the dump manifests' statistics. A side of
    several hooks gets one scale, for their concatenation: sqrt(total width / sum of E||x_k||^2)."""
    if cfg.normalize_activations != "expected_norm":
        return 1.0
    dumps = dump if isinstance(dump, list) else [dump]
    if len(dumps) == 1:
        stats = dumps[0].manifest.stats or {}
        mean_norm = stats.get("mean_norm") or math.sqrt(stats.get("mean_sq_norm", 0.0))
        if not mean_norm > 0:
            raise UserError(f"{dumps[0].path}: the manifest has no activation norm statistics to normalize with")
        return math.sqrt(dumps[0].d_in) / mean_norm
    mean_sq = 0.0
    for d in dumps:
        stats = d.manifest.stats or {}
        value = stats.get("mean_sq_norm") or (stats.get("mean_norm") or 0.0) ** 2
        if not value > 0:
            raise UserError(f"{d.path}: the manifest has no activation norm statistics to normalize with")
        mean_sq += value
    return math.sqrt(sum(d.d_in for d in dumps) / mean_sq)


def random_rows(loader: ActivationLoader, n: int, seed: int, salt: int) -> Any:
    """n distinct random training rows (all of them if there are fewer), raw, as the loader
    serves them (`DataPlan.assemble` makes them a Batch)."""
    rng = np.random.default_rng([seed, salt, 1])
    n = min(n, loader.n_rows)
    rows = np.sort(rng.choice(loader.n_rows, size=n, replace=False)) + loader.lo
    return loader.gather(rows)


def open_target_dumps(target_shards: str | Path | None, inputs: list[Dump], verify: bool,
                      progress: bool = False) -> list[Dump]:
    """The target dumps: the inputs themselves unless others are named; a path that is an
    input's is that input's dump (the same object: an SAE's target is its input)."""
    paths = dump_list(str(target_shards)) if target_shards is not None else []
    if not paths:
        return list(inputs)
    by_path = {absolute(d.path): d for d in inputs}
    return [by_path.get(absolute(p)) or open_dump(p, verify=verify, progress=progress) for p in paths]


def plan_data(cfg: LanguageModelSAERunnerConfig, verify: bool,
              target_shards: str | Path | None = None, progress: bool = False) -> DataPlan:
    """Open the dump (and the target dump, when the target is another hook of the same harvest
    pass), hold out their last contexts, and build the shared shuffled loader; `progress` shows
    the checksum verification as a bar."""
    device = pick_device(cfg.device)
    progress = progress and distributed.current().lead  # one bar, not one per process
    inputs = open_training_dumps(cfg, verify, progress)
    targets = open_target_dumps(cfg.target_shards if target_shards is None else target_shards, inputs, verify,
                                progress)
    dump, target = inputs[0], targets[0]
    try:
        train_rows, _ = split_rows(dump, cfg.eval_holdout_contexts)
    except ValueError as e:
        raise UserError(f"eval_holdout_contexts: {e}") from None
    n_train = train_rows[1] - train_rows[0]
    total_tokens = cfg.total_training_tokens or n_train
    shard = distributed.current().shard  # data-parallel: each rank reads only its rows of a batch
    options = dict(rows=train_rows, buffer_rows=cfg.shuffle_buffer_rows, block_rows=cfg.shuffle_block_rows,
                   share=(shard.rank, shard.world) if shard is not None else None)
    served = loader_dumps(inputs, targets)
    if len(served) == 1:
        loader = ActivationLoader(dump, cfg.train_batch_size, cfg.seed, device, **options)
    else:  # checks that the dumps are of one pass, so that their rows pair up
        loader = AlignedLoader(served, cfg.train_batch_size, cfg.seed, device, **options)
    scale = input_scale(cfg, inputs)
    return DataPlan(dump, target, loader, scale, scale if targets == inputs else input_scale(cfg, targets),
                    total_tokens, steps_for_tokens(total_tokens, n_train, cfg.train_batch_size),
                    plan_identity(inputs, targets, train_rows), inputs=inputs, targets=targets)


def make_slot(cfg: LanguageModelSAERunnerConfig, data: DataPlan, run_dir: Path, name: str,
              resume_from: Path | None, wandb_group: str | None = None, progress: bool = False) -> Slot:
    """Build (or restore) one SAE trainer and open its run folder (`progress`: say so on stderr
    when b_dec's geometric median is computed, which reads and iterates over a sample)."""
    device = pick_device(cfg.device)
    parallel = distributed.current()
    trainer = SAETrainer(cfg, data.d_in, data.input_scale, data.total_steps, device, target_scale=data.target_scale,
                         d_out=data.d_out, transcoder=data.paired, n_hooks=data.n_hooks)
    trainer.shard = parallel.shard
    trainer.row_sampler = lambda n, salt: data.assemble(random_rows(data.loader, n, cfg.seed, salt))  # calibration
    if trainer.shard is not None:
        distributed.check_data_parallel(trainer, data.loader.n_rows, cfg.train_batch_size,
                                        trainer.shard.world)
    if resume_from is not None:
        check_resume(read_state(resume_from), data.ident, resume_from)
        load_trainer_state_(trainer, resume_from)
    else:
        # b_dec lives in the target's space (the input's, for an SAE): the targets' means, joined.
        mean = torch.tensor([v for side in data.targets
                             for v in (side.manifest.stats or {}).get("mean", [0.0] * side.d_in)])
        if cfg.b_dec_init_method == "geometric_median":
            say(f"b_dec of {name}: geometric median of {min(B_DEC_SAMPLE_ROWS, data.loader.n_rows):,} "
                "training rows ...", progress)
        trainer.init_b_dec_(mean, lambda: data.init_sample(cfg.seed))
    if trainer.shard is not None:
        distributed.broadcast_trainer_(trainer)
    writes = parallel.writes_runs
    metrics: Any = NullMetrics()
    if writes:
        run_dir.mkdir(parents=True, exist_ok=True)
        run_layout.write_run_config(run_dir, cfg.to_dict(), name)
        metrics = MetricsLog(run_dir, name, cfg.to_dict(), cfg.log_to_wandb, cfg.wandb_project,
                             cfg.wandb_entity, resume_step=trainer.counters.step, group=wandb_group)
    checkpoints = {round(data.total_steps * (i + 1) / (cfg.n_checkpoints + 1))
                   for i in range(cfg.n_checkpoints)}
    return Slot(name, trainer, metrics, run_dir, checkpoints, writes=writes)


def with_absolute_dump(cfg: LanguageModelSAERunnerConfig) -> LanguageModelSAERunnerConfig:
    """The config with its dump path absolute: configs saved in run folders must not depend on
    the directory training ran from."""
    def each(value: str) -> str:
        return ",".join(absolute(p) for p in dump_list(value))
    if cfg.target_shards:
        cfg = replace(cfg, target_shards=each(cfg.target_shards))
    return replace(cfg, shards=each(cfg.shards)) if cfg.shards else cfg


def run_folder(cfg: LanguageModelSAERunnerConfig, default_name: str) -> Path:
    """--checkpoint-path (a local folder), else data/runs/<run name>; absolute."""
    if cfg.checkpoint_path:
        check_local(cfg.checkpoint_path)
        return Path(cfg.checkpoint_path).resolve()
    return run_layout.default_folder(default_name).resolve()


@dataclass
class Job:
    """One training into one folder. A single run is a sweep of one: the same path trains both
    (`train_job`), and only the layout differs: a single run's files sit directly in `folder`, a
    sweep has an index (sweep.json), one subfolder per SAE and a summary."""

    folder: Path
    base: LanguageModelSAERunnerConfig
    """Settings every SAE shares (device, evaluation, wandb); a single run's own config."""
    saes: list[tuple[str, LanguageModelSAERunnerConfig]]
    """(name, config) of each SAE, in grid order."""
    keys: list[str] | None = None
    """The swept settings of a sweep; None for a single run."""
    resume_from: dict[str, Path] | None = None
    """The checkpoint each SAE continues from, by name; None: every SAE starts afresh."""
    groups: list[list[int]] | None = None
    """Indices into `saes` of the SAEs this process trains, group after group, each group in
    lockstep (a sweep's SAEs split to fit in memory); None: all of them in one group."""
    wandb_group: str | None = None

    @property
    def sweep(self) -> bool:
        return self.keys is not None

    def run_dir(self, name: str) -> Path:
        return run_layout.sae_folder(self.folder, name, self.sweep)

    def configs(self) -> dict[str, dict[str, Any]]:
        """The SAEs' configs as the folder records them (what `hold_run_folder` checks it against)."""
        return run_layout.as_recorded({name: cfg.to_dict() for name, cfg in self.saes}, self.sweep)

    def entries(self) -> list[SweepEntry]:
        """The sweep's SAEs with their swept settings, as its index and summary list them."""
        return [SweepEntry(name, self.run_dir(name), {k: getattr(cfg, k) for k in self.keys or ()})
                for name, cfg in self.saes]


def train(cfg: LanguageModelSAERunnerConfig, resume_from: str | Path | None = None,
          log: Callable[[str], None] = print, progress: bool = True, verify: bool = True,
          overwrite: bool = False) -> TrainResult:
    """Train one SAE from the dump `cfg.shards`; optionally continue a checkpoint.

    The run folder is held for this process while it trains (see `train.run_folder`); it may not
    hold another run unless `overwrite`, but continuing the folder's own checkpoint is allowed.
    """
    check_settings_used([cfg])
    if cfg.run_name is not None:
        plain_name(cfg.run_name, "run_name")
    if not distributed.current().lead:  # data-parallel: rank 0 logs, shows progress and writes the run folder
        log, progress = (lambda s: None), False
    cfg = with_absolute_dump(cfg)
    data = plan_data(cfg, verify, progress=progress)
    name = cfg.run_name or cfg.default_run_name(data.d_in, data.dump.path.name)
    check_shapes([(name, cfg)], data.d_in, data.d_out, data.paired, data.n_hooks)
    check_fits([(name, cfg)], data.d_in, data.d_out, data.n_hooks, pick_device(cfg.device))
    run_dir = run_folder(cfg, name)
    cfg = replace(cfg, checkpoint_path=str(run_dir))
    resume = Path(resume_from) if resume_from else None
    if resume is not None:
        check_checkpoint_not_linked(resume)
    job = Job(run_dir, cfg, [(name, cfg)], resume_from={name: resume} if resume else None)
    own = resume is not None and resume.resolve().parent == run_dir  # the folder's own checkpoint
    with hold_run_folder(run_dir, None if own else job.configs(), overwrite, log):
        [result] = train_job(job, data, log, progress)
    return result


def train_job(job: Job, data: DataPlan, log: Callable[[str], None], progress: bool) -> list[TrainResult]:
    """Train the job's SAEs into its folder, which this process holds (`hold_run_folder`): a
    sweep's index first, then each group of SAEs in lockstep on `data`, then the evaluation of
    every final SAE and, for a sweep, its summary. Returns this process's results in grid order."""
    progress = progress and distributed.current().lead  # under torchrun, process 0 shows progress
    if job.sweep:
        _start_sweep(job, data, log)
    results: list[TrainResult] = []
    for group in job.groups if job.groups is not None else [list(range(len(job.saes)))]:
        slots = [make_slot(cfg, data, job.run_dir(name), name,
                           job.resume_from[name] if job.resume_from else None, wandb_group=job.wandb_group,
                           progress=progress)
                 for name, cfg in (job.saes[i] for i in group)]
        if not job.sweep:
            _announce_run(slots[0], data, log)
        finals = run_slots(slots, data, progress, resume_hint=job.folder if job.sweep else None)
        results += [TrainResult(s.trainer.sae, s.run_dir, final, s.trainer) for s, final in zip(slots, finals)]
    if job.base.evaluate_at_end and results and distributed.current().writes_runs:
        model = _load_model_once(data, job.base, progress)
        baselines: dict = {}  # the ablation runs are the same for every SAE: pay for them once
        for r in results:
            r.evaluation = evaluate_final(r.trainer.cfg, r.final, log, model=model, baselines=baselines,
                                          progress=progress)
    if job.sweep:
        _finish_sweep(job, log)
    return results


def _start_sweep(job: Job, data: DataPlan, log: Callable[[str], None]) -> None:
    """Say what the sweep trains, and write its index first, with every SAE's config, so that a
    sweep interrupted at any point can be resumed."""
    parallel = distributed.current()
    log(f"sweep of {len(job.saes)} SAEs on {data.loader.n_rows:,} rows of {data.dump.path} for "
        f"{data.total_steps:,} steps each; folder {job.folder}"
        + {"sweep": f"; spread over {parallel.ranks.world} processes",
           "data": f"; each data-parallel over {parallel.ranks.world} processes"}.get(parallel.mode, ""))
    if parallel.lead:
        job.folder.mkdir(parents=True, exist_ok=True)
        run_layout.write_sweep_index(job.folder, job.entries(), job.keys or [],
                                     {name: cfg.to_dict() for name, cfg in job.saes})


def _announce_run(slot: Slot, data: DataPlan, log: Callable[[str], None]) -> None:
    """What a single run trains, once its SAE is built (or restored)."""
    sae = slot.trainer.sae.cfg
    kind = slot.trainer.cfg.architecture if sae.n_hooks > 1 else ("transcoder" if sae.transcoder else "SAE")
    what = f"{sae.d_in} -> {sae.d_sae}" + (f" -> {sae.d_out}" if sae.transcoder else "") + f" {kind}"
    if sae.transcoder:
        what += " writing " + ", ".join(d.path.name for d in data.targets)
    reads = ", ".join(d.path.name for d in data.inputs[1:])
    log(f"training {what} on {data.loader.n_rows:,} rows of {data.dump.path}" + (f" (and {reads})" if reads else "") + " "
        f"({data.dump.n_rows - data.loader.n_rows:,} held out) for {data.total_steps:,} steps "
        f"({data.total_tokens:,} tokens) on {slot.trainer.device}; run folder {slot.run_dir}"
        + (f"; data-parallel over {distributed.current().ranks.world} processes" if slot.trainer.shard else ""))


def _finish_sweep(job: Job, log: Callable[[str], None]) -> None:
    """The sweep's table and plots (and their wandb run), once every rank's SAEs are done."""
    parallel = distributed.current()
    distributed.barrier(parallel.ranks)
    if parallel.lead:
        rows = write_summary(job.folder, job.entries(), job.keys or [], log)
        if job.base.log_to_wandb:
            log_summary_to_wandb(job.base.wandb_project, job.base.wandb_entity, job.wandb_group or "",
                                 job.folder, rows)


def _load_model_once(data: DataPlan, base: LanguageModelSAERunnerConfig, progress: bool = False) -> Any:
    from shared.models import load_model
    from shared.progress import say

    device = str(pick_device(base.device))
    say(f"loading model {data.dump.manifest.model} on {device} ...", progress)
    return load_model(data.dump.manifest.model, device, progress=progress)


def evaluate_final(cfg: LanguageModelSAERunnerConfig, final: Path, log: Callable[[str], None],
                   model: Any = None, baselines: dict | None = None, progress: bool = False) -> dict[str, Any]:
    """`evaluate` on a final checkpoint (its passes shown as bars with `progress`); the result
    goes to eval.json beside it."""
    from train.evaluate import EvalConfig, evaluate_checkpoint
    from train.units import metrics_line

    result = evaluate_checkpoint(final, EvalConfig(holdout_contexts=cfg.eval_holdout_contexts,
                                                   device=cfg.device, progress=progress),
                                 model=model, baselines=baselines)
    run_layout.write_eval(final.parent, result)
    log(f"evaluation of {final}: " + metrics_line(result, ("explained_variance", "l0", "ce_loss_recovered")))
    return result


def run_slots(slots: list[Slot], data: DataPlan, progress: bool, resume_hint: Path | None = None) -> list[Path]:
    """Train every slot in lockstep to the end; returns their final checkpoint folders.

    On Ctrl-C every slot saves a checkpoint at the same step; `resume_hint` (a sweep's folder) is
    what to pass to --resume-from then, else the single slot's checkpoint. Nothing is saved, final
    or not, once any slot's loss or weights are non-finite (`NonFiniteError`).
    """
    try:
        try:
            with StopOnCtrlC() as stop:
                _loop(slots, data, progress, stop)
        except KeyboardInterrupt:
            for s in slots:
                check_finite(s, weights=True)
            saved = [run_layout.checkpoint_folder(s.run_dir, s.trainer.counters.tokens_seen) for s in slots]
            saved = [save_checkpoint(folder, s.trainer, data.ident) if s.writes else folder
                     for s, folder in zip(slots, saved)]
            raise Interrupted(f"interrupted; state saved: continue with --resume-from {resume_hint or saved[0]}") from None
        for s in slots:  # every SAE is checked before any final is saved
            check_finite(s, weights=True)
        return [save_checkpoint(run_layout.final_folder(s.run_dir), s.trainer, data.ident) if s.writes
                else run_layout.final_folder(s.run_dir) for s in slots]
    finally:
        for s in slots:
            s.metrics.close()


def check_finite(slot: Slot, weights: bool = False) -> None:
    """Stop training once a loss (or, with `weights`, a parameter, buffer or Adam moment) is NaN or
    infinite: the flag is read on the host only where the loop syncs anyway (log steps) and before
    every save, so that no checkpoint ever holds non-finite weights."""
    t = slot.trainer
    step = t.first_non_finite_step()
    if step is not None:
        raise NonFiniteError(f"SAE {slot.name}: the loss became non-finite (NaN or inf) at step {step}; "
                             "nothing more was saved: lower lr or the coefficients, or check the dump "
                             "for NaN or infinite activations")
    bad = t.non_finite_tensors() if weights else []
    if bad:
        raise NonFiniteError(f"SAE {slot.name}: {', '.join(bad)} became non-finite (NaN or inf) by step "
                             f"{t.counters.step}; nothing more was saved: lower lr or the coefficients")


class StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop at the next step boundary (so the checkpoint it
    then saves is consistent); a second one interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopOnCtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _loop(slots: list[Slot], data: DataPlan, progress: bool, stop: StopOnCtrlC | None = None) -> None:
    lead = slots[0].trainer.counters
    if any(s.trainer.counters.step != lead.step for s in slots):
        raise UserError("the SAEs of a sweep must resume from the same step")
    total = data.total_steps
    bar = tqdm(total=total, initial=lead.step, unit="step", disable=not (progress and distributed.current().lead),
               desc="train")
    started, tokens_at_start = time.perf_counter(), lead.tokens_seen
    batches = data.loader.batches(start_batch=lead.step)
    samples: dict[tuple[int, int, int], Batch] = {}
    text = ""  # the bar's text since the last log step

    def sampler(n: int, step: int, seed: int) -> Batch:
        """Resampling rows, read once per step for the whole group (same seed, same rows); the
        bar says so while they are read and scored (seconds, with many rows)."""
        if (n, step, seed) not in samples:
            bar.set_postfix_str(f"{text}, resampling dead features from {n:,} rows ..." if text else
                                f"resampling dead features from {n:,} rows ...", refresh=True)
            samples[(n, step, seed)] = data.assemble(random_rows(data.loader, n, seed, step))
        return samples[(n, step, seed)]

    try:
        while lead.step < total:
            batch = data.batch(next(batches))  # data-parallel: this rank's rows of the global batch
            rows = data.loader.batch_rows(lead.step)
            for slot in slots:
                _step_slot(slot, batch, rows, sampler, total, started, tokens_at_start, data.ident)
            if samples:  # resampled: the bar's text goes back to the figures
                bar.set_postfix_str(text, refresh=False)
            samples.clear()  # do not hold up to resample_sample_rows rows until the next window
            bar.update(1)
            if stop is not None and stop.requested and lead.step < total:
                raise KeyboardInterrupt
            if lead.step % slots[0].trainer.cfg.wandb_log_frequency == 0 or lead.step == total:
                last = slots[0].last_logged
                text = (f"tokens={lead.tokens_seen:,}, tok/s={last.get('tokens_per_s', 0):,.0f}, "
                        f"{training_mse_text(last, slots[0].trainer.cfg.normalize_activations)}, "
                        f"L0={last.get('l0', math.nan):.1f}")
                bar.set_postfix_str(text, refresh=False)
    finally:
        batches.close()
        bar.close()


def _step_slot(slot: Slot, batch: Batch, rows: int, sampler: Callable[[int, int, int], Batch],
               total: int, started: float, tokens_at_start: int, ident: dict[str, Any]) -> None:
    """One step of one SAE (batch: its rows of a global batch of `rows` rows, scaled), then its
    resampling, logging and checkpoint when due."""
    t = slot.trainer
    c = t.counters
    cfg = t.cfg
    t.update(batch, rows)
    if t.end_of_window():
        t.resample_(batch, lambda n, step: sampler(n, step, cfg.seed))
        if t.shard is not None:  # the same draws on every rank; rank 0's state rules out any drift
            distributed.broadcast_trainer_(t)
        slot.metrics.density_histogram(c.step, t.log10_density())
        t.reset_window()
    if c.step % cfg.wandb_log_frequency == 0 or c.step == total:
        check_finite(slot)  # before the metrics are read: both sync once here
        rate = (c.tokens_seen - tokens_at_start) / max(1e-9, time.perf_counter() - started)
        row = t.pop_metrics() | {"tokens": c.tokens_seen, "tokens_per_s": rate}
        slot.metrics.log(c.step, row)
        slot.last_logged = row
    if c.step in slot.checkpoints:
        check_finite(slot, weights=True)
        if slot.writes:
            save_checkpoint(slot.run_dir / str(c.tokens_seen), t, ident)
