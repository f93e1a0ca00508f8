"""`train`: the command line over `train.run.train`.

Every `train` config key is a flag (--kebab-case), built from the config's parts and from each
registered architecture's `Settings`; `--config FILE` (YAML or JSON, the same snake_case keys) sets
values that flags then override. The settings the Python API harvests a missing dump with
(model_name, hook_point, context_size...) are refused with the `harvest` flag to use instead, and
the seed's ignored names (dtype, n_batches_in_buffer, is_dataset_tokenized) are no flags.
"""
from __future__ import annotations

from shared.interrupts import exit_while_starting, started

exit_while_starting("train", "train")  # first: a Ctrl-C while Python imports is one line too

import json  # noqa: E402
from dataclasses import Field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402

from shared.cli_errors import one_line_errors  # noqa: E402
from shared.cli_options import ENDPOINT_HELP, TIMEOUT_HELP, endpoint_option, timeout_option  # noqa: E402
from shared.errors import UserError  # noqa: E402
from shared.run_paths import dump_path_for  # noqa: E402
from shared.settings import kind_of  # noqa: E402
from train.config import LanguageModelSAERunnerConfig, flat_fields  # noqa: E402
from train.config.architectures import show  # noqa: E402

_OWN_OPTION = {"shards"}  # given as its own option below


def _click_type(annotation: str) -> Any:
    kind = kind_of(annotation)
    return {"bool": bool, "int": int, "float": float}.get(kind, str)  # lists: "256,1024" text


def _help(f: Field) -> str:
    default = f.metadata.get("default_text") or ("" if f.default is None else show(f.default))
    return f"({f.metadata['group']}) {f.metadata['help']}" + (f" [default: {default}]" if default else "")


def config_options() -> list[click.Option]:
    """One option per `train` key (the parts' settings and every registered architecture's),
    default None so only flags actually given override; the harvest settings are hidden flags that
    say where they belong (`refuse_harvest_settings`). The seed's ignored names are no flags."""
    out = []
    for f in flat_fields().values():
        if f.name in _OWN_OPTION or f.metadata.get("ignored"):
            continue
        flag = f.name.replace("_", "-")
        hidden = "harvest_flag" in f.metadata
        kind = _click_type(str(f.type))
        if kind is bool:
            out.append(click.Option([f"--{flag}/--no-{flag}", f.name], default=None, help=_help(f), hidden=hidden))
        else:
            out.append(click.Option([f"--{flag}", f.name], type=kind, default=None, help=_help(f), hidden=hidden))
    return out


def refuse_harvest_settings(given: dict[str, Any], shards_given: bool, where: str) -> None:
    """A harvest setting given to `train` (as a flag, or in a config file beside a dump) would be
    ignored: `train` reads the dump, whose manifest records how it was harvested."""
    if where != "flags" and not shards_given:
        return
    for name in given:
        f = flat_fields().get(name)
        if f is None or "harvest_flag" not in f.metadata or given[name] is None:
            continue
        flag = f.metadata["harvest_flag"]
        hint = f"pass {flag} to `harvest`" if flag else "`harvest` takes it from --hook"
        source = "" if where == "flags" else f" ({where})"
        raise UserError(f"{name} is a harvest setting{source}: {hint}; `train` reads the dump it wrote "
                        "(--shards)")


class _TrainCommand(click.Command):
    """The command, with an option per config key built when it runs: an architecture registered
    after import (a plug-in, a test) has its flags too."""

    def get_params(self, ctx: click.Context) -> list[click.Parameter]:
        *own, help_option = super().get_params(ctx)
        return [*own, *config_options(), help_option]


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


@click.command(cls=_TrainCommand, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
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
@click.option("--s3-timeout", metavar="SECONDS", expose_value=False, callback=timeout_option, help=TIMEOUT_HELP)
@click.option("--quiet", is_flag=True, help="No progress bars or progress lines.")
@click.option("--parallel", type=click.Choice(["data", "sweep"]), default=None,
              help="Under torchrun (torchrun --nproc-per-node N -m train ...): 'data' splits every global "
                   "batch of train_batch_size rows over the N processes and averages their gradients "
                   "(the same update as one process); 'sweep' spreads the SAEs of a sweep over them "
                   "(process r trains grid points r, r+N, ..., each exactly as alone). [default: sweep "
                   "for a sweep, else data]")
@click.option("--overwrite", is_flag=True,
              help="Replace a run (or sweep) with other settings already in --checkpoint-path; without it "
                   "that is refused. Only the run's own files are removed: a folder that also holds "
                   "anything else (a dump, your files, a symlink) is refused. Never needed to continue a "
                   "folder's own checkpoint.")
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
                                              "the run's newest checkpoint with --resume-from, if it has one",
                         os_hint=_os_line):
        for final in _run(shards, config_file, resume_from, sweeps, verify, quiet, overwrite, flags, parallel):
            click.echo(str(final))


def _os_line(e: OSError) -> str:
    """The machine's fault in one line; a full disk says how a run continues (not harvest's --resume)."""
    import errno

    from shared.cli_errors import os_error_line

    if e.errno == errno.ENOSPC:
        where = f" ({e.filename})" if getattr(e, "filename", None) else ""
        return (f"the disk is full{where}: nothing half-written was kept; free some space, then continue "
                "from the run's newest checkpoint with --resume-from (or rerun the same command if it has none)")
    return os_error_line(e)


def _run(shards, config_file, resume_from, sweeps, verify, quiet, overwrite, flags,
         parallel: str | None = None) -> list[Path]:
    """The command's body: the final checkpoint folder of every SAE trained (by this process)."""
    from train.distributed import parallel_training
    from train.run import train
    from train.run_layout import is_sweep, read_sweep_configs
    from train.sweep import parse_sweep_flags, resume_sweep, train_sweep

    started()  # the heavy imports are done; from here Ctrl-C is `one_line_errors`' line
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
    raw = checkpoint_config(Path(resume_from), find_dump=shards is None,
                            find_target=flags.get("target_shards") is None) if resume_from else {}
    from_file = read_config_file(config_file) if config_file else {}
    refuse_harvest_settings(flags, True, "flags")
    refuse_harvest_settings(from_file, shards is not None or from_file.get("shards") is not None, config_file)
    raw.update(from_file)
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


def checkpoint_config(checkpoint: Path, find_dump: bool, find_target: bool | None = None) -> dict[str, Any]:
    """A checkpoint's run config, for flags to override: it continues in the run folder holding
    the checkpoint (wherever that is now) and, unless --shards says otherwise (`find_dump`
    False), on the dump it was trained on; likewise a transcoder's target dumps unless
    --target-shards says otherwise (`find_target` False; None: as `find_dump`)."""
    from train.checkpoint import read_state
    from train.run_folder import check_checkpoint_not_linked

    check_checkpoint_not_linked(checkpoint)
    state = read_state(checkpoint)
    raw = dict(state["config"])
    raw["checkpoint_path"] = str(checkpoint.resolve().parent)
    find_target = find_dump if find_target is None else find_target
    if find_dump or find_target:
        ident = state.get("dump") or raw
        inputs = [ident, *(ident.get("more_inputs") or [])]
        if find_dump:
            raw["shards"] = ",".join(str(dump_path_for(checkpoint, i)) for i in inputs)
        if find_target and isinstance(ident.get("target"), dict):  # a transcoder: its target dumps too
            targets = [ident["target"], *(ident.get("more_targets") or [])]
            raw["target_shards"] = ",".join(str(dump_path_for(checkpoint, t, "--target-shards", "target dump"))
                                            for t in targets)
    return raw
