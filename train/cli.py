"""`train`: the command line over `train.run.train`.

Every config key is a flag (--kebab-case); `--config FILE` (YAML or JSON, the same snake_case
keys) sets values that flags then override.
"""
from __future__ import annotations

import json
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import click

from shared.cli_errors import one_line_errors
from shared.cli_options import ENDPOINT_HELP, endpoint_option
from shared.errors import UserError
from shared.run_paths import dump_path_for
from train.config import LanguageModelSAERunnerConfig

_SKIP = {"shards"}  # given as its own option below


def _click_type(annotation: str) -> Any:
    if "list" in annotation:
        return str
    if "bool" in annotation:
        return bool
    if "int" in annotation:
        return int
    if "float" in annotation:
        return float
    return str


def _default_text(f) -> str:
    return "" if f.default is MISSING or f.default is None else f" [default: {f.default}]"


def config_options(func):
    """One click option per config field, default None so only flags actually given override."""
    for f in reversed(fields(LanguageModelSAERunnerConfig)):
        if f.name in _SKIP:
            continue
        flag = f.name.replace("_", "-")
        kind = _click_type(str(f.type))
        help_text = f"({f.metadata['group']}) " + f.metadata.get("help", "") + _default_text(f)
        if kind is bool:
            decl = [f"--{flag}/--no-{flag}"]
            func = click.option(*decl, f.name, default=None, help=help_text)(func)
        else:
            func = click.option(f"--{flag}", f.name, type=kind, default=None, help=help_text)(func)
    return func


def read_config_file(path: str) -> dict[str, Any]:
    text = Path(path).read_text()
    try:
        if path.endswith(".json"):
            raw = json.loads(text)
        else:
            import yaml

            raw = yaml.safe_load(text)
    except Exception as e:
        raise UserError(f"{path} could not be parsed ({type(e).__name__}: {e})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} must hold a mapping of config keys to values")
    return raw


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--shards", default=None, help="Dump folder written by `harvest` (e.g. data/gelu2l_l0).")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="YAML or JSON file of config keys; flags override it.")
@click.option("--resume-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Checkpoint folder to continue (e.g. data/runs/<run>/1228800), with the run's "
                   "own config unless flags say otherwise; or a sweep folder, to continue all its SAEs.")
@click.option("--sweep", "sweeps", multiple=True, metavar="KEY=V1,V2",
              help="Train a grid in lockstep from one read of the dump; repeat for more keys "
                   "(e.g. --sweep l1_coefficient=0.6,1.2 --sweep expansion_factor=16,64, or "
                   "--sweep architecture=topk,jumprelu --sweep k=32,64).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Check every shard's checksum before training.")
@click.option("--s3-endpoint", metavar="URL", expose_value=False, callback=endpoint_option, help=ENDPOINT_HELP)
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--parallel", type=click.Choice(["data", "sweep"]), default=None,
              help="Under torchrun (torchrun --nproc-per-node N -m train ...): 'data' splits every global "
                   "batch of train_batch_size rows over the N processes and averages their gradients "
                   "(the same update as one process); 'sweep' spreads the SAEs of a sweep over them "
                   "(process r trains grid points r, r+N, ..., each exactly as alone). [default: sweep "
                   "for a sweep, else data]")
@click.option("--overwrite", is_flag=True,
              help="Replace a run (or sweep) with other settings already in --checkpoint-path; without it "
                   "that is refused. Never needed to continue a folder's own checkpoint.")
@config_options
def main(shards, config_file, resume_from, sweeps, verify, quiet, parallel, overwrite, **flags) -> None:
    """Train a sparse autoencoder from an activation dump, never touching the language model.

    Examples: train --shards data/gelu2l_l0 --l1-coefficient 1.2 --expansion-factor 32;
    train --shards data/gelu2l_l0 --sweep architecture=topk,batchtopk --sweep k=32,64

    Each option says which part of the run owns it: (data) settings define the stream of batches
    that every SAE of a sweep shares; only (sae), (optimizer) and (dead_features) ones can be swept.

    Several processes or GPUs: torchrun --nproc-per-node N -m train ... (see --parallel); each
    process uses its own GPU (cuda:LOCAL_RANK) when there are GPUs, and process 0 writes the run.
    """
    with one_line_errors("train", interrupted="interrupted before a checkpoint was saved: continue from "
                                              "the run's newest checkpoint with --resume-from, if it has one"):
        for final in _run(shards, config_file, resume_from, sweeps, verify, quiet, overwrite, flags, parallel):
            click.echo(str(final))


def _run(shards, config_file, resume_from, sweeps, verify, quiet, overwrite, flags,
         parallel: str | None = None) -> list[Path]:
    """The command's body: the final checkpoint folder of every SAE trained (by this process)."""
    from train.distributed import parallel_training
    from train.run import train
    from train.run_layout import is_sweep, read_sweep_configs
    from train.sweep import parse_sweep_flags, resume_sweep, train_sweep

    log = lambda s: click.echo(s, err=True)  # noqa: E731
    if resume_from and is_sweep(Path(resume_from)):
        if sweeps or config_file or overwrite or any(v is not None for v in flags.values()):
            raise UserError("a sweep resumes with its own settings: pass only --resume-from SWEEP_FOLDER "
                            "(and --shards DUMP_FOLDER if its dump has moved)")
        try:  # the sweep's device, for the process group (resume_sweep reports a damaged sweep.json)
            device = (next(iter(read_sweep_configs(Path(resume_from)).values()), None) or {}).get("device")
        except Exception:
            device = None
        with parallel_training(parallel, True, device):
            return [r.final for r in resume_sweep(Path(resume_from), log=log, progress=not quiet, verify=verify,
                                                    shards=shards)]
    raw = checkpoint_config(Path(resume_from), find_dump=shards is None) if resume_from else {}
    raw.update(read_config_file(config_file) if config_file else {})
    sweep = raw.pop("sweep", None) or {}
    if not isinstance(sweep, dict):
        raise UserError(f"{config_file}: 'sweep' must map config keys to lists of values")
    sweep.update(parse_sweep_flags(sweeps))
    raw.update({k: v for k, v in flags.items() if v is not None})
    if shards is not None:
        raw["shards"] = shards
    cfg = LanguageModelSAERunnerConfig.from_dict(raw, where=config_file or "flags")
    if sweep:
        if resume_from:
            raise UserError("to continue a sweep, pass only --resume-from SWEEP_FOLDER")
        with parallel_training(parallel, True, cfg.device):
            return [r.final for r in train_sweep(cfg, sweep, log=log, progress=not quiet, verify=verify,
                                                  overwrite=overwrite)]
    with parallel_training(parallel, False, cfg.device) as ranks:
        final = train(cfg, resume_from=resume_from, log=log, progress=not quiet, verify=verify,
                      overwrite=overwrite).final
        return [final] if ranks.lead else []  # data-parallel: rank 0 wrote it


def checkpoint_config(checkpoint: Path, find_dump: bool) -> dict[str, Any]:
    """A checkpoint's run config, for flags to override: it continues in the run folder holding
    the checkpoint (wherever that is now) and, unless --shards says otherwise (`find_dump`
    False), on the dump it was trained on."""
    from train.checkpoint import read_state

    state = read_state(checkpoint)
    raw = dict(state["config"])
    raw["checkpoint_path"] = str(checkpoint.resolve().parent)
    if find_dump:
        raw["shards"] = str(dump_path_for(checkpoint, state.get("dump") or raw))
    return raw
