"""`evaluate`: held-out metrics and CE loss recovered for trained SAEs, top examples, dashboards."""
from __future__ import annotations

from shared.interrupts import exit_while_starting, started

exit_while_starting("evaluate")  # first: a Ctrl-C while Python imports is one line too

from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import click  # noqa: E402

from shared.cli_errors import one_line_errors  # noqa: E402
from shared.cli_options import ENDPOINT_HELP, TIMEOUT_HELP, endpoint_option, timeout_option  # noqa: E402
from shared.errors import UserError  # noqa: E402


def _targets(path: Path) -> tuple[list[Path], Path | None]:
    """(final checkpoint folders, sweep root or None) for a checkpoint, run or sweep folder."""
    from shared.saes.base import CFG_NAME
    from train import run_layout

    if run_layout.is_sweep(path):
        entries, _ = run_layout.read_sweep_index(path)
        return [e.final for e in entries], path
    if (path / CFG_NAME).is_file():
        return [path], None
    if (run_layout.final_folder(path) / CFG_NAME).is_file():
        return [run_layout.final_folder(path)], None
    raise UserError(f"{path} is not an SAE checkpoint, run folder or sweep folder "
                    "(expected cfg.json, final/cfg.json or sweep.json)")


def _linked(path: Path) -> list[str]:
    """`path` if it is a symlink, else the symlinks below it (a folder's, not followed)."""
    import os

    if path.is_symlink():
        return [path.name]
    if not path.is_dir():
        return []
    return sorted((Path(root) / n).relative_to(path.parent).as_posix() for root, dirs, files in os.walk(path)
                  for n in dirs + files if (Path(root) / n).is_symlink())


def check_outputs_not_linked(finals: list[Path], sweep_root: Path | None, metrics: bool, dashboard: bool) -> None:
    """What evaluate writes in a run (or sweep) folder is written there, never through a link: a run
    folder holds only the files its run wrote (as `train` refuses links in it), and replacing a
    link would write, or remove, what it points to elsewhere. Checked before any work."""
    from train import run_layout

    for final in finals:
        run = final.parent
        names = ([run_layout.EVAL] if metrics else []) + ([run_layout.DASHBOARD] if dashboard else [])
        for name in names:
            links = _linked(run / name)
            if links == [name]:
                raise UserError(f"{run / name} is a symlink (to {(run / name).readlink()}): evaluate writes "
                                f"{name} in the run folder itself, never through a link; remove the link "
                                "(or replace it with what it points to), then rerun")
            if links:
                raise UserError(f"{run / name} holds symlinks ({', '.join(links[:3])}"
                                f"{', ...' if len(links) > 3 else ''}): evaluate replaces the dashboard "
                                "whole and never removes what a link points to; remove the links, then rerun")
    if sweep_root is not None and metrics:
        for name in (run_layout.SUMMARY_CSV, run_layout.SUMMARY_JSON, run_layout.PLOTS_INDEX, *run_layout.PLOTS):
            if (sweep_root / name).is_symlink():
                raise UserError(f"{sweep_root / name} is a symlink (to {(sweep_root / name).readlink()}): evaluate "
                                "rewrites the sweep's summary in the sweep folder itself; remove the link, then rerun")


class _Dumps:
    """Each dump opened (and its checksums verified) once, however many SAEs read it: the input
    dumps, and the target dumps of transcoders."""

    def __init__(self, shards: str | None, verify: bool, progress: bool = False,
                 target_shards: str | None = None) -> None:
        self.shards, self.verify, self.progress, self.opened = shards, verify, progress, {}
        self.target_shards = target_shards
        self.sides: dict[str, Any] = {}  # SAE folder -> (input side, target side), several hooks a side

    def _open(self, path: Any) -> Any:
        key = str(path.resolve())
        if key not in self.opened:
            from shared.reader import open_dump

            self.opened[key] = open_dump(path, verify=self.verify, progress=self.progress)
        return self.opened[key]

    def for_sae(self, final: Path) -> Any:
        from shared.run_paths import dump_path_for
        from shared.saes.base import read_cfg
        from shared.storage import location
        from train.evaluation.run_eval import check_dump_fits, stacked_sides
        from train.evaluation.stacked import open_sides

        cfg = read_cfg(final)
        if stacked_sides(cfg):  # several hooks a side: every dump of each, checked together
            key = str(Path(final).resolve())
            if key not in self.sides:
                self.sides[key] = open_sides(final, cfg, self._open, self.shards, self.target_shards)
            return self.sides[key][0]
        dump = self._open(location(self.shards) if self.shards else dump_path_for(final, cfg))
        check_dump_fits(final, cfg, dump)
        return dump

    def target_for_sae(self, final: Path, dump: Any) -> Any:
        """What the SAE in `final` is measured against: `dump` itself for an SAE; a transcoder's
        target dump (--target-shards, or the one it was trained on), checked to fit it."""
        from shared.saes.base import read_cfg
        from shared.storage import location
        from train.evaluation.run_eval import check_target_fits, is_transcoder, stacked_sides, target_path_for

        cfg = read_cfg(final)
        if stacked_sides(cfg):
            return self.sides[str(Path(final).resolve())][1]  # opened with the input side by for_sae
        if not is_transcoder(cfg):
            if self.target_shards:
                raise UserError(f"{final} is an SAE (it reconstructs its input): --target-shards is for "
                                "transcoders only")
            return dump
        target = self._open(location(self.target_shards) if self.target_shards else target_path_for(final, cfg))
        check_target_fits(final, cfg, dump, target)
        return target


def _tokenizer(dump: Any) -> Any:
    from train.evaluation.examples import load_tokenizer

    m = dump.manifest
    tokenizer = load_tokenizer(m.model) or (load_tokenizer(m.tokenizer) if m.tokenizer else None)
    if tokenizer is None:
        click.echo("(no tokenizer available offline: showing token ids)", err=True)
    return tokenizer


def _parse_features(features: str) -> list[int]:
    try:
        feats = [int(f) for f in features.split(",") if f.strip()]
    except ValueError:
        raise UserError(f"--features must be comma-separated integers, got '{features}'") from None
    if not feats:
        raise UserError("--top-examples needs --features, e.g. --features 0,5,17")
    return feats


def _print_top_examples(final: Path, dump: Any, features: list[int], n: int, device: str,
                        progress: bool) -> None:
    from shared.saes import load_sae
    from train.evaluation.examples import format_example, top_examples

    sae = load_sae(final, device=device)
    bad = [f for f in features if not 0 <= f < sae.cfg.d_sae]
    if bad:
        raise UserError(f"features {bad} out of range: this SAE has {sae.cfg.d_sae} features")
    tokenizer = _tokenizer(dump)
    found = top_examples(sae, dump, features, n, device=device, progress=progress)
    for feature in features:
        click.echo(f"feature {feature}:")
        for ex in found[feature]:
            click.echo(f"  {ex['activation']:8.3f}  ctx {ex['context']:>7} pos {ex['position']:>4}  "
                       f"{format_example(ex, tokenizer)}")
        if not found[feature]:
            click.echo("  (never fires on these rows)")


def _model_or_none(dump: Any, device: str, progress: bool) -> Any:
    """The dump's model for the logit table, or None (with a note) when it cannot be loaded."""
    from shared.models import load_model
    from shared.progress import say

    say(f"loading model {dump.manifest.model} on {device} ...", progress)
    try:
        return load_model(dump.manifest.model, device, progress=progress)
    except Exception as e:  # offline hub, missing files: the dashboard is still worth writing
        click.echo(f"(model {dump.manifest.model} not loaded: {str(e).splitlines()[0] if str(e) else type(e).__name__})",
                   err=True)
        return None


def _write_dashboards(finals: list[Path], dumps: _Dumps, device: str, with_model: bool, quiet: bool,
                      models: dict) -> None:
    from shared.saes import load_sae
    from train.evaluation.dashboard.build import build_dashboard, read_evaluation
    from train.evaluation.stacked import side_hooks
    from train.run_layout import dashboard_folder

    tokenizers: dict = {}  # one per model: a sweep's SAEs share it
    for final in finals:
        dump = dumps.for_sae(final)
        target = dumps.target_for_sae(final, dump)
        key = dump.manifest.model
        if with_model and key not in models:
            models[key] = _model_or_none(dump, device, not quiet)
        if key not in tokenizers:
            tokenizers[key] = _tokenizer(dump)
        run = final.parent
        index = build_dashboard(load_sae(final, device=device), dump, dashboard_folder(run), name=run.name,
                                model=models.get(key), tokenizer=tokenizers[key], evaluation=read_evaluation(run),
                                device=device, progress=not quiet, log=lambda s: click.echo(s, err=True),
                                target_hook=None if target is dump else ", ".join(side_hooks(target)))
        click.echo(f"dashboard: {index}")


def _metrics(finals: list[Path], dumps: _Dumps, cfg: Any, models: dict, absorption: bool = False) -> None:
    from shared.models import load_model
    from shared.progress import say
    from train.evaluation.run_eval import evaluate_checkpoint
    from train.run_layout import write_eval
    from train.units import metrics_line

    baselines: dict = {}  # ablation losses, shared by SAEs evaluated on the same contexts
    tokenizers: dict = {}  # --absorption's, one per model
    token_cache: dict = {}  # --absorption's words and activations, one per (model, hook)
    for final in finals:
        dump = dumps.for_sae(final)
        model = None
        if cfg.with_model:
            if models.get(dump.manifest.model) is None:
                say(f"loading model {dump.manifest.model} on {cfg.device} ...", cfg.progress)
                models[dump.manifest.model] = load_model(dump.manifest.model, cfg.device, progress=cfg.progress)
            model = models[dump.manifest.model]
        result = evaluate_checkpoint(final, cfg, model=model, baselines=baselines, dump=dump,
                                     target=dumps.target_for_sae(final, dump))
        if absorption:
            from train.evaluation.absorption import absorption_of_folder

            if dump.manifest.model not in tokenizers:
                tokenizers[dump.manifest.model] = _tokenizer(dump)
            result.update(absorption_of_folder(final, dump, model, tokenizers[dump.manifest.model], cfg.device,
                                               cfg.progress, token_cache=token_cache))
        write_eval(final.parent, result)
        shown = metrics_line(result, ("mse", "explained_variance", "l0", "frac_dead", "frac_dense",
                                      "ce_loss_recovered", "kl_clean_sae", "relative_reconstruction_bias",
                                      "frac_near_duplicate", "sparse_probing_raw_accuracy",
                                      "sparse_probing_top_1_accuracy", "sparse_probing_top_5_accuracy",
                                      "absorption_first_letter_rate", "absorption_first_letter_f1"))
        if result.get("ce_not_measured"):
            shown += "; CE not measured (several hooks a side: see ce_not_measured in eval.json)"
        click.echo(f"{final}: {shown}")


def _os_line(e: OSError) -> str:
    """The machine's fault in one line. A full disk names the file being written (never one of the
    package's own dashboard assets, which are only read) and says to rerun: evaluate has no --resume,
    and whatever it was writing was not put in place."""
    import errno
    from pathlib import Path

    from shared.cli_errors import os_error_line

    if e.errno != errno.ENOSPC:
        return os_error_line(e)
    from train.evaluation.dashboard import ASSETS

    name = getattr(e, "filename2", None) or getattr(e, "filename", None)
    where = f" ({name})" if name and ASSETS not in Path(name).parents else ""
    return f"the disk is full{where}: free some space, then rerun the same command (nothing half-written was kept)"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--shards", default=None,
              help="Dump to read [the one the SAE was trained on]; for a moved dump. "
                   "Several hooks: A,B,... in order.")
@click.option("--target-shards", default=None,
              help="A transcoder's target dump [the one it was trained on]; for a moved dump. "
                   "A CLT's: C,D,... in order.")
@click.option("--holdout-contexts", type=int, default=None,
              help="Held-out contexts at the dump's end [as in training].")
@click.option("--metrics/--no-metrics", "with_metrics", default=True, show_default=True,
              help="Compute the held-out metrics (eval.json).")
@click.option("--model/--no-model", "with_model", default=True, show_default=True,
              help="Also run the language model: CE loss recovered and KL; the dashboard's logit table.")
@click.option("--max-eval-contexts", type=int, default=256, show_default=True,
              help="Held-out contexts run through the language model.")
@click.option("--batch-contexts", type=int, default=8, show_default=True, help="Contexts per forward pass.")
@click.option("--device", default=None, help="Device [cuda if available, else cpu].")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Recompute the dump's checksums before reading it.")
@click.option("--absorption", is_flag=True,
              help="Also measure feature absorption on the first-letter task (runs the model; eval.json's "
                   "absorption_first_letter_*).")
@click.option("--dashboard", is_flag=True,
              help="Also write a feature dashboard (RUN/dashboard/index.html; opens offline in a browser).")
@click.option("--top-examples", "top_n", type=int, default=0,
              help="Only show the N contexts where each of --features fires most (no model run).")
@click.option("--features", default="", help="Comma-separated feature indices for --top-examples.")
@click.option("--sparse-probing", is_flag=True,
              help="Also fit k-sparse probes (k = 1, 2, 5, 20) on the SAE's features against a probe on the raw "
                   "activations, on token properties (eval.json's sparse_probing_*).")
@click.option("--probe-tasks", default=None,
              help="Comma-separated sparse probing tasks [every one with enough rows]: "
                   "word_start, capitalised, punctuation, short_word.")
@click.option("--s3-endpoint", metavar="URL", expose_value=False, callback=endpoint_option, help=ENDPOINT_HELP)
@click.option("--s3-timeout", metavar="SECONDS", expose_value=False, callback=timeout_option, help=TIMEOUT_HELP)
@click.option("--quiet", is_flag=True, help="No progress bars or progress lines.")
def main(path, shards, target_shards, holdout_contexts, with_metrics, with_model, max_eval_contexts, batch_contexts, device,
         verify, absorption, dashboard, top_n, features, sparse_probing, probe_tasks, quiet) -> None:
    """Evaluate SAEs on the contexts their dump held out of training, and show what their features mean.

    PATH is a checkpoint (data/runs/<run>/final), a run folder, or a sweep folder (which gets its
    summary table and plots rewritten with the new metrics). Results go to eval.json in each run
    folder; --dashboard writes a browsable page of every feature to each run's dashboard/ folder.
    A transcoder is measured against its target dump and spliced in at the hook it writes; a
    cross-layer transcoder replaces every MLP output it covers at once; a crosscoder over several
    hooks gets reconstruction metrics only.

    Examples: evaluate data/runs/quickstart --dashboard;
    evaluate data/runs/quickstart --top-examples 5 --features 0,1,2
    """
    with one_line_errors("evaluate", os_hint=_os_line):
        from shared.device import pick_device
        from train.evaluation.run_eval import EvalConfig

        started()  # the heavy imports are done; from here Ctrl-C is `one_line_errors`' line
        for name, value in (("max-eval-contexts", max_eval_contexts), ("batch-contexts", batch_contexts)):
            if value <= 0:
                raise UserError(f"--{name} must be positive, got {value}")
        if top_n < 0:
            raise UserError(f"--top-examples must be positive, got {top_n}")
        if (sparse_probing or probe_tasks) and not with_metrics:
            raise UserError("--sparse-probing writes eval.json: it needs --metrics")
        if probe_tasks and not sparse_probing:
            raise UserError("--probe-tasks needs --sparse-probing")
        if not (with_metrics or dashboard or top_n):
            raise UserError("nothing to do: --no-metrics without --dashboard or --top-examples")
        if absorption and not with_model:
            raise UserError("--absorption runs the language model: drop --no-model")
        if absorption and not with_metrics:
            raise UserError("--absorption writes eval.json: drop --no-metrics")
        finals, sweep_root = _targets(path)
        if not top_n:
            check_outputs_not_linked(finals, sweep_root, with_metrics, dashboard)
        dev = str(pick_device(device))
        dumps = _Dumps(shards, verify, progress=not quiet, target_shards=target_shards)
        if top_n:
            feats = _parse_features(features)
            for final in finals:
                _print_top_examples(final, dumps.for_sae(final), feats, top_n, dev, not quiet)
            return
        models: dict = {}  # one language model per dump model, shared by the SAEs
        if with_metrics:
            cfg = EvalConfig(holdout_contexts=holdout_contexts, with_model=with_model, batch_contexts=batch_contexts,
                             max_eval_contexts=max_eval_contexts, device=dev, verify=verify, progress=not quiet,
                             sparse_probing=sparse_probing,
                             probe_tasks=[t.strip() for t in probe_tasks.split(",") if t.strip()] if probe_tasks else None)
            _metrics(finals, dumps, cfg, models, absorption)
            if sweep_root is not None:
                from train.run_layout import read_sweep_index
                from train.summary import write_summary

                entries, keys = read_sweep_index(sweep_root)
                write_summary(sweep_root, entries, keys, log=click.echo)
        if dashboard:
            _write_dashboards(finals, dumps, dev, with_model, quiet, models)
