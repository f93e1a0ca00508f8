"""`evaluate`: held-out metrics and CE loss recovered for trained SAEs, and top examples."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from shared import atomic
from shared.errors import UserError


def _targets(path: Path) -> tuple[list[Path], Path | None]:
    """(final checkpoint folders, sweep root or None) for a checkpoint, run or sweep folder."""
    from train.summary import SWEEP_INDEX, read_sweep_index

    if (path / SWEEP_INDEX).is_file():
        entries, _ = read_sweep_index(path)
        return [e.final for e in entries], path
    if (path / "cfg.json").is_file():
        return [path], None
    if (path / "final" / "cfg.json").is_file():
        return [path / "final"], None
    raise UserError(f"{path} is not an SAE checkpoint, run folder or sweep folder "
                    "(expected cfg.json, final/cfg.json or sweep.json)")


def _print_top_examples(final: Path, dump_path: str | None, features: list[int], n: int, device: str) -> None:
    from shared.reader import open_dump
    from shared.sae import SparseAutoencoder, read_cfg
    from train.evaluation.examples import format_example, load_tokenizer, top_examples

    cfg = read_cfg(final)
    dump = open_dump(dump_path or cfg["shards"])
    sae = SparseAutoencoder.load_from_pretrained(final, device=device)
    bad = [f for f in features if not 0 <= f < sae.cfg.d_sae]
    if bad:
        raise UserError(f"features {bad} out of range: this SAE has {sae.cfg.d_sae} features")
    tokenizer = load_tokenizer(dump.manifest.model) or (
        load_tokenizer(dump.manifest.tokenizer) if dump.manifest.tokenizer else None)
    if tokenizer is None:
        click.echo("(no tokenizer available offline: showing token ids)", err=True)
    found = top_examples(sae, dump, features, n, device=device)
    for feature in features:
        click.echo(f"feature {feature}:")
        for ex in found[feature]:
            click.echo(f"  {ex['activation']:8.3f}  ctx {ex['context']:>7} pos {ex['position']:>4}  "
                       f"{format_example(ex, tokenizer)}")
        if not found[feature]:
            click.echo("  (never fires on these rows)")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("path", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--shards", default=None, help="Dump to evaluate on [the one the SAE was trained on].")
@click.option("--holdout-contexts", type=int, default=None,
              help="Held-out contexts at the dump's end [as in training].")
@click.option("--model/--no-model", "with_model", default=True, show_default=True,
              help="Also run the language model for CE loss recovered and KL.")
@click.option("--max-eval-contexts", type=int, default=256, show_default=True,
              help="Held-out contexts run through the language model.")
@click.option("--batch-contexts", type=int, default=8, show_default=True, help="Contexts per forward pass.")
@click.option("--device", default=None, help="Device [cuda if available, else cpu].")
@click.option("--top-examples", "top_n", type=int, default=0,
              help="Show the N contexts where each of --features fires most (no model run).")
@click.option("--features", default="", help="Comma-separated feature indices for --top-examples.")
def main(path, shards, holdout_contexts, with_model, max_eval_contexts, batch_contexts, device, top_n,
         features) -> None:
    """Evaluate SAEs on the contexts their dump held out of training.

    PATH is a checkpoint (data/runs/<run>/final), a run folder, or a sweep folder (which gets its
    summary table and plots rewritten with the new metrics). Results go to eval.json in each run
    folder.

    Example: evaluate data/runs/quickstart --top-examples 5 --features 0,1,2
    """
    from train.evaluation.run_eval import EvalConfig, evaluate_checkpoint
    from train.run import pick_device

    try:
        for name, value in (("max-eval-contexts", max_eval_contexts), ("batch-contexts", batch_contexts)):
            if value <= 0:
                raise UserError(f"--{name} must be positive, got {value}")
        finals, sweep_root = _targets(path)
        dev = str(pick_device(device))
        if top_n < 0:
            raise UserError(f"--top-examples must be positive, got {top_n}")
        if top_n:
            try:
                feats = [int(f) for f in features.split(",") if f.strip()]
            except ValueError:
                raise UserError(f"--features must be comma-separated integers, got '{features}'") from None
            if not feats:
                raise UserError("--top-examples needs --features, e.g. --features 0,5,17")
            for final in finals:
                _print_top_examples(final, shards, feats, top_n, dev)
            return
        cfg = EvalConfig(holdout_contexts=holdout_contexts, with_model=with_model,
                         batch_contexts=batch_contexts, max_eval_contexts=max_eval_contexts, device=dev)
        model = None
        baselines: dict = {}  # ablation losses, shared by SAEs evaluated on the same contexts
        results = []
        for final in finals:
            if with_model and model is None:
                from shared.models import load_model
                from shared.reader import open_dump
                from shared.sae import read_cfg

                dump = open_dump(shards or read_cfg(final)["shards"])
                model = load_model(dump.manifest.model, dev)
            result = evaluate_checkpoint(final, cfg, dump_path=shards, model=model, baselines=baselines)
            atomic.write_json(final.parent / "eval.json", result)
            results.append(result)
            shown = ", ".join(f"{k} {result[k]:.4g}" for k in
                              ("mse", "explained_variance", "l0", "frac_dead", "frac_dense",
                               "ce_loss_recovered", "kl_clean_sae") if result.get(k) is not None)
            click.echo(f"{final}: {shown}")
        if sweep_root is not None:
            from train.summary import read_sweep_index, write_summary

            entries, keys = read_sweep_index(sweep_root)
            write_summary(sweep_root, entries, keys, log=click.echo)
    except UserError as e:
        click.echo(f"evaluate: error: {e}", err=True)
        sys.exit(2)
