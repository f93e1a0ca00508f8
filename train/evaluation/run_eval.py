"""Evaluate one trained SAE folder on the contexts its dump held out of training.

A transcoder (cfg.json's `architecture` ends in `transcoder`) reads its input dump and is measured
against the same held-out rows of its target dump: another hook of the same harvest pass, found
from cfg.json's `target` record (or `target_path`), checked to be of that pass and to hold the hook
and width the transcoder was trained to write.

An SAE of several hooks a side (a crosscoder, a cross-layer transcoder: `n_hooks` > 1) reads every
dump of each side (train.evaluation.stacked), concatenated in order as training read them, and
adds per-hook figures; a cross-layer transcoder runs in the model with every MLP output it covers
replaced at once (`replacement_ce_metrics`), a crosscoder over several hooks gets reconstruction
metrics only (`ce_not_measured` says why).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.errors import DumpError, UserError
from shared.models import load_model
from shared.progress import say
from shared.reader import Dump, open_dump
from shared.saes import SAE, architecture_class
from shared.saes.io import load_sae
from shared.run_paths import dump_path_for
from shared.saes.base import read_cfg
from shared.saes.transcoder_names import parse_saved_name
from train.data_digest import check_same_data
from train.evaluation.downstream import ce_metrics, replacement_ce_metrics
from train.evaluation.geometry import decoder_neighbours, duplicate_fraction
from train.evaluation.reconstruction import reconstruction_metrics
from train.evaluation.stacked import (StackedDump, open_sides, several_hooks, side_hooks, side_paths_of,
                                      side_widths)
from train.evaluation.tokens import context_tokens
from train.holdout import split_rows
from train.same_pass import check_same_pass
from train.units import EVAL_UNITS


@dataclass
class EvalConfig:
    """How to evaluate a checkpoint folder written by `train`."""

    holdout_contexts: int | None = None
    """Held-out contexts (the dump's last ones) to evaluate on [what training held out]."""
    with_model: bool = True
    """Also run the language model for the cross-entropy metrics (False: reconstruction only)."""
    batch_contexts: int = 8
    """Contexts per forward pass of the language model."""
    max_eval_contexts: int | None = 256
    """At most this many held-out contexts go through the model (None: all of them)."""
    device: str | None = None
    """Device for the SAE and the model [cuda if available, else cpu]."""
    verify: bool = True
    """Recompute the dump's checksums before reading it, as `train` does."""
    progress: bool = False
    """Show each pass (checksums, model load, reconstruction, CE) on stderr as it runs."""
    sparse_probing: bool = False
    """Also fit k-sparse probes on the SAE's features (train.evaluation.sparse_probing)."""
    probe_tasks: list[str] | None = None
    """Sparse probing tasks by name [every task with enough rows]."""

    def __post_init__(self) -> None:
        if self.holdout_contexts is not None and self.holdout_contexts < 0:
            raise UserError(f"holdout contexts must be >= 0, got {self.holdout_contexts}")
        if self.batch_contexts < 1:
            raise UserError(f"batch contexts must be at least 1, got {self.batch_contexts}")
        if self.max_eval_contexts is not None and self.max_eval_contexts < 1:
            raise UserError(f"max eval contexts must be at least 1, got {self.max_eval_contexts}")


def evaluate_checkpoint(sae_folder: Path, cfg: EvalConfig, dump_path: str | None = None,
                        model: Any = None, baselines: dict | None = None, dump: Dump | None = None,
                        target_path: str | None = None, target: Dump | None = None) -> dict[str, Any]:
    """Metrics of the SAE in `sae_folder` on its dump's held-out contexts, as one flat JSON-able dict.

    The dump is the one cfg.json names (`shards`) unless `dump_path` is given, or `dump` is already
    open (a sweep's SAEs share one, verified once); `model` (a TransformerBridge) saves loading the
    model the dump was harvested from. For a transcoder the target dump likewise: cfg.json's
    `target` record unless `target_path` is given, or `target` already open. Its reconstruction
    metrics are against the target's rows, in the target's raw units, and the model runs with the
    target hook's activation replaced by the transcoder's output on the input hook's. An SAE of
    several hooks a side (or a CLT) reads every dump of each side (`dump_path` / `target_path`
    then comma lists; `dump` and `target` the sides as `train.evaluation.stacked.open_sides`
    gives them, both or neither).
    """
    sae_folder = Path(sae_folder)
    sae_cfg = read_cfg(sae_folder)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    multi = stacked_sides(sae_cfg)
    if multi:  # every dump of each side, checked (the caller's, where it opened them: `open_sides`)
        if dump is None or target is None:
            dump, target = open_sides(sae_folder, sae_cfg, lambda p: open_dump(p, verify=cfg.verify,
                                                                              progress=cfg.progress),
                                      shards=dump_path, target_shards=target_path)
    else:
        if dump is None:
            dump = open_sae_dump(sae_folder, dump_path, verify=cfg.verify, progress=cfg.progress)
        check_dump_fits(sae_folder, sae_cfg, dump)
        if target is None:
            target = open_target_dump(sae_folder, dump, target_path, verify=cfg.verify, progress=cfg.progress,
                                      sae_cfg=sae_cfg)
        else:
            check_target_fits(sae_folder, sae_cfg, dump, target)
    requested = cfg.holdout_contexts
    if requested is None:  # what training held out (absent from older checkpoints: the default)
        requested = sae_cfg.get("eval_holdout_contexts")
        if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int)):
            raise UserError(f"{sae_folder}/cfg.json: eval_holdout_contexts is {requested!r}, not a whole number: "
                            "restore the file, or pass --holdout-contexts")
    rows = _heldout_rows(dump, requested)
    n_heldout = (rows[1] - rows[0]) // dump.manifest.rows_per_context
    sae = load_sae(sae_folder, device=device)
    if multi:
        if cfg.sparse_probing:
            raise UserError(f"{sae_folder}: sparse probing is for SAEs of one input hook")
        return _evaluate_stacked(sae_folder, sae, dump, target, rows, n_heldout, cfg, device, model, baselines)
    out: dict[str, Any] = {"sae": str(sae_folder), "dump": str(dump.path), "hook": dump.manifest.hook,
                           "n_eval_contexts": n_heldout, "units": EVAL_UNITS}
    if target is not dump:  # the metrics are the target's: its hook, its raw units
        out.update({"target_dump": str(target.path), "target_hook": target.manifest.hook,
                    "target_units": f"{EVAL_UNITS} of {target.manifest.hook} (the target dump)"})
    metrics = reconstruction_metrics(sae, dump, rows, device, target=target, progress=cfg.progress)
    metrics.pop("density")
    out.update(metrics)
    nearest, _ = decoder_neighbours(sae.W_dec.detach(), k=1)
    out["frac_near_duplicate"] = duplicate_fraction(nearest[:, 0])
    if cfg.with_model:
        out.update(_ce_on_heldout(sae, dump, n_heldout, cfg, device, model, baselines, target))
    if cfg.sparse_probing:
        from train.evaluation.examples import load_tokenizer
        from train.evaluation.sparse_probing import sparse_probing_metrics

        m = dump.manifest
        tokenizer = load_tokenizer(m.model) or (load_tokenizer(m.tokenizer) if m.tokenizer else None)
        out.update(sparse_probing_metrics(sae, dump, rows, tokenizer, device, tasks=cfg.probe_tasks,
                                          progress=cfg.progress))
    return out


CE_NOT_MEASURED = ("not measured: the SAE reads and writes several hooks at once ({hooks}), each hook's "
                   "output computed from every hook's input; in one forward pass an earlier hook's replacement "
                   "would need the later hooks' activations, which depend on that replacement, so CE with all "
                   "of them replaced is not defined (reconstruction metrics only)")
"""eval.json's `ce_not_measured` for an SAE over several hooks that is not a cross-layer transcoder."""


def _evaluate_stacked(sae_folder: Path, sae: SAE, dump: Any, target: Any, rows: tuple[int, int], n_heldout: int,
                      cfg: EvalConfig, device: torch.device, model: Any, baselines: dict | None) -> dict[str, Any]:
    """`evaluate_checkpoint` of an SAE over several hooks (or a cross-layer transcoder): the
    sides' dumps and hooks as lists, per-hook reconstruction figures, and CE with a CLT's every
    covered output replaced at once."""
    clt = is_clt(sae)
    out: dict[str, Any] = {"sae": str(sae_folder), "dumps": side_paths_of(dump), "hooks": side_hooks(dump),
                           "n_eval_contexts": n_heldout, "units": EVAL_UNITS}
    if target is not dump:
        out.update({"target_dumps": side_paths_of(target), "target_hooks": side_hooks(target),
                    "target_units": f"{EVAL_UNITS} of the target hooks (the target dumps)"})
    metrics = reconstruction_metrics(sae, dump, rows, device, target=target, progress=cfg.progress,
                                     target_widths=side_widths(target),
                                     feature_layers=sae.n_layers if clt else None)
    metrics.pop("density")
    out.update(metrics)
    nearest, _ = decoder_neighbours(sae.W_dec.detach(), k=1)
    out["frac_near_duplicate"] = duplicate_fraction(nearest[:, 0])
    if cfg.with_model:
        if clt:
            out.update(_replacement_ce_on_heldout(sae, dump, target, n_heldout, cfg, device, model, baselines))
        else:
            out["ce_not_measured"] = CE_NOT_MEASURED.format(hooks=", ".join(side_hooks(dump)))
    return out


def is_clt(sae: SAE) -> bool:
    from shared.saes.clt import CrossLayerTranscoder

    return isinstance(sae, CrossLayerTranscoder)


def stacked_sides(sae_cfg: dict[str, Any]) -> bool:
    """Whether cfg.json's SAE is evaluated side by side (train.evaluation.stacked): several hooks a
    side, or a cross-layer transcoder (of one layer, too: a plain transcoder by name it is not)."""
    if several_hooks(sae_cfg):
        return True
    try:
        return bool(architecture_class(str(sae_cfg.get("architecture", "standard"))).transcoder_only)
    except UserError:
        return False  # load_sae says what is wrong with the name


def open_sae_dump(sae_folder: Path, dump_path: str | Path | None = None, verify: bool = True,
                  progress: bool = False) -> Dump:
    """The dump `dump_path`, or else the one the SAE in `sae_folder` was trained on, checked to fit it."""
    sae_cfg = read_cfg(Path(sae_folder))
    dump = open_dump(dump_path if dump_path else dump_path_for(Path(sae_folder), sae_cfg), verify=verify,
                     progress=progress)
    check_dump_fits(sae_folder, sae_cfg, dump)
    return dump


def check_dump_fits(sae_folder: Path, sae_cfg: dict[str, Any], dump: Dump) -> None:
    """A one-line error unless the dump holds what the SAE reads (width and hook) and, where
    cfg.json records it, the very data it was trained on (train.data_digest)."""
    if dump.d_in != sae_cfg["d_in"]:
        raise UserError(f"the SAE reads d_in={sae_cfg['d_in']} but the dump {dump.path} has d_in={dump.d_in}")
    hook = sae_cfg.get("hook_name")
    if hook is not None and hook != dump.manifest.hook:
        raise UserError(f"the SAE was trained on hook '{hook}' but the dump {dump.path} holds "
                        f"'{dump.manifest.hook}'")
    check_same_data(sae_cfg, dump, f"the SAE in {sae_folder}",
                    "evaluate it on the dump it was trained on (--shards DUMP_FOLDER)")


def is_transcoder(sae_cfg: dict[str, Any]) -> bool:
    """Whether cfg.json describes a transcoder (it writes another hook than it reads)."""
    return parse_saved_name(str(sae_cfg.get("architecture", "standard"))).transcoder


def target_path_for(sae_folder: Path, sae_cfg: dict[str, Any]) -> Any:
    """Where the target dump a transcoder was trained on lies, from cfg.json's `target` record
    (`target_shards` in folders without one); a one-line error naming --target-shards otherwise."""
    record = sae_cfg.get("target")
    recorded = record.get("shards") if isinstance(record, dict) else None
    return dump_path_for(Path(sae_folder), {"shards": recorded or sae_cfg.get("target_shards")},
                         flag="--target-shards", what="target dump")


def open_target_dump(sae_folder: Path, dump: Dump, target_path: str | Path | None = None, verify: bool = True,
                     progress: bool = False, sae_cfg: dict[str, Any] | None = None) -> Dump:
    """The dump the SAE in `sae_folder` is measured against: `dump` itself for an SAE; for a
    transcoder `target_path`, or else the target dump it was trained on, checked to fit it."""
    sae_cfg = read_cfg(Path(sae_folder)) if sae_cfg is None else sae_cfg
    if not is_transcoder(sae_cfg):
        if target_path:
            raise UserError(f"{sae_folder} is an SAE (it reconstructs its input): --target-shards is for "
                            "transcoders only")
        return dump
    target = open_dump(target_path if target_path else target_path_for(sae_folder, sae_cfg), verify=verify,
                       progress=progress)
    check_target_fits(sae_folder, sae_cfg, dump, target)
    return target


def check_target_fits(sae_folder: Path, sae_cfg: dict[str, Any], dump: Dump, target: Dump) -> None:
    """A one-line error unless `target` is of `dump`'s harvest pass (its rows pair up with the
    input's) and holds what the transcoder writes: its width, the hook it was trained on and, where
    cfg.json records it, the very data (train.data_digest)."""
    if not is_transcoder(sae_cfg):
        if target is not dump:
            raise UserError(f"{sae_folder} is an SAE (it reconstructs its input): it has no target dump")
        return
    fix = "pass the target dump it was trained on (--target-shards DUMP_FOLDER)"
    d_out = sae_cfg.get("d_out", sae_cfg["d_in"])
    if target.d_in != d_out:
        raise UserError(f"the transcoder writes d_out={d_out} but the target dump {target.path} has "
                        f"d_in={target.d_in}: {fix}")
    record = sae_cfg.get("target") if isinstance(sae_cfg.get("target"), dict) else {}
    hook = record.get("hook_point")
    if hook is not None and hook != target.manifest.hook:
        raise UserError(f"the transcoder was trained to write hook '{hook}' but the target dump {target.path} "
                        f"holds '{target.manifest.hook}': {fix}")
    check_same_pass([dump, target])
    check_same_data(record, target, f"the transcoder in {sae_folder}", fix)


def _heldout_rows(dump: Dump, requested: int | None) -> tuple[int, int]:
    try:
        _, rows = split_rows(dump, requested)
    except ValueError as e:
        raise UserError(f"{e} of {dump.path}; pass fewer --holdout-contexts") from None
    if rows[0] == rows[1]:
        raise UserError(f"no contexts of {dump.path} are held out of training: train with a holdout "
                        "(--eval-holdout-contexts) or pass --holdout-contexts")
    return rows


def _replacement_ce_on_heldout(clt: SAE, dump: Any, target: Any, n_heldout: int, cfg: EvalConfig,
                               device: torch.device, model: Any, baselines: dict | None) -> dict[str, Any]:
    """CE metrics of the replacement model (every covered MLP output replaced by the CLT at once)
    on the first `max_eval_contexts` held-out contexts; ablations of every output hook at once,
    mean ablation from each target dump's mean."""
    m = dump.manifest
    if model is None:
        say(f"loading model {m.model} on {device} ...", cfg.progress)
        model = load_model(m.model, str(device), progress=cfg.progress)
    targets = target.dumps if isinstance(target, StackedDump) else [target]
    for t in targets:
        if t.manifest.stats is None:
            raise DumpError(f"{t.path}/manifest.json has no stats (mean activation); re-harvest the dump")
    n = n_heldout if cfg.max_eval_contexts is None else min(n_heldout, cfg.max_eval_contexts)
    tokens = context_tokens(dump, m.n_contexts - n_heldout, n)
    mean = torch.cat([torch.tensor(t.manifest.stats["mean"], dtype=torch.float32) for t in targets])
    ce = replacement_ce_metrics(model, clt, side_hooks(dump), side_hooks(target), tokens, mean, m.skip_bos,
                                cfg.batch_contexts, device, baselines, progress=cfg.progress)
    return {"n_ce_contexts": n, **ce}


def _ce_on_heldout(sae: SAE, dump: Dump, n_heldout: int, cfg: EvalConfig, device: torch.device, model: Any,
                   baselines: dict | None = None, target: Dump | None = None) -> dict[str, Any]:
    """CE metrics on the first `max_eval_contexts` held-out contexts; for a transcoder (`target`
    another dump) spliced in at the target's hook, ablations there, from the target's mean."""
    m = dump.manifest
    target = dump if target is None else target
    if model is None:
        say(f"loading model {m.model} on {device} ...", cfg.progress)
        model = load_model(m.model, str(device), progress=cfg.progress)
    if target.manifest.stats is None:
        raise DumpError(f"{target.path}/manifest.json has no stats (mean activation); re-harvest the dump")
    n = n_heldout if cfg.max_eval_contexts is None else min(n_heldout, cfg.max_eval_contexts)
    tokens = context_tokens(dump, m.n_contexts - n_heldout, n)
    mean = torch.tensor(target.manifest.stats["mean"], dtype=torch.float32)
    ce = ce_metrics(model, sae, m.hook, tokens, mean, m.skip_bos, cfg.batch_contexts, device, baselines,
                    progress=cfg.progress, target_hook=None if target is dump else target.manifest.hook)
    return {"n_ce_contexts": n, **ce}
