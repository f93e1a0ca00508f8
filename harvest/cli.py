"""`harvest`: the command line over `harvest.run.harvest`."""
from __future__ import annotations

from shared.interrupts import exit_while_starting, started

exit_while_starting("harvest", "harvest")  # first: a Ctrl-C while Python imports is one line too

import os  # noqa: E402

import click  # noqa: E402

from harvest.config import DEFAULT_HOOK, HarvestConfig  # noqa: E402
from harvest.mlp_pairs import DEFAULT_INPUT, MLP_INPUTS, hook_role  # noqa: E402
from shared.cli_errors import one_line_errors  # noqa: E402
from shared.cli_options import ENDPOINT_HELP, TIMEOUT_HELP, endpoint_option, timeout_option  # noqa: E402
from shared.errors import UserError  # noqa: E402

INTERRUPTED = "interrupted; finished shards are kept: rerun the same command with --resume to continue"


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--hook", "hooks", multiple=True,
              help="Hook point to record; repeat for several (one model pass, one dump each) "
                   f"[{DEFAULT_HOOK}, unless --mlp-pairs is given].")
@click.option("--mlp-pairs", metavar="LAYERS", default=None,
              help="Also record, for transcoders, each layer's MLP input and MLP output "
                   "(blocks.L.mlp.hook_in, blocks.L.hook_mlp_out) in the same pass: a layer (3), "
                   "a range with both ends included (0..5), a list (0,2,4), or all.")
@click.option("--mlp-pairs-input", type=click.Choice(list(MLP_INPUTS)), default=None,
              help="Where --mlp-pairs reads each MLP's input: mlp-in, what the MLP reads (after ln2), or "
                   "resid-mid, the residual stream before ln2 (blocks.L.hook_resid_mid) [mlp-in].")
@click.option("--model", default="gelu-2l", show_default=True,
              help="TransformerLens alias, Hugging Face name, local HF folder, or smollm2-135m "
                   "(packaged, offline).")
@click.option("--dataset", default="NeelNanda/c4-tokenized-2b", show_default=True,
              help="Hub dataset, save_to_disk folder, local .txt/.jsonl/.parquet files, or "
                   "shakespeare (packaged, offline).")
@click.option("--split", default="train", show_default=True, help="Dataset split.")
@click.option("--text-column", default="text", show_default=True,
              help="Raw-text column, used when there is no tokens/input_ids column.")
@click.option("--context-size", default=128, show_default=True, type=int, help="Tokens per context.")
@click.option("--batch-size", default=32, show_default=True, type=int, help="Contexts per forward pass.")
@click.option("--tokens", default=10_000_000, show_default=True, type=int,
              help="Tokens to harvest (rounded up to whole contexts).")
@click.option("--prepend-bos/--no-prepend-bos", default=True, show_default=True,
              help="Start each context with the BOS token.")
@click.option("--skip-bos/--keep-bos", default=False, show_default=True,
              help="Leave BOS rows out of the dump (they are outliers that hurt SAEs).")
@click.option("--dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]), help="Storage dtype.")
@click.option("--model-dtype", default="float32", show_default=True,
              type=click.Choice(["float32", "bfloat16", "float16"]), help="Dtype of the forward pass.")
@click.option("--format", "fmt", default=None, type=click.Choice(["safetensors", "zarr"]),
              help="Shard format [safetensors; zarr for an s3:// --out, the only format there].")
@click.option("--compression", default="none", show_default=True, type=click.Choice(["none", "zstd"]),
              help="zarr only: compress chunks.")
@click.option("--shard-rows", type=int, default=None,
              help="Rows per shard [about 1 GiB in the storage dtype].")
@click.option("--out", default=None,
              help="Output folder, or object storage as s3://bucket/prefix "
                   "[data/{model}_l{layer}; several hooks: data/{model}/{hook}].")
@click.option("--s3-endpoint", metavar="URL", expose_value=False, callback=endpoint_option, help=ENDPOINT_HELP)
@click.option("--s3-timeout", metavar="SECONDS", expose_value=False, callback=timeout_option, help=TIMEOUT_HELP)
@click.option("--device", default=None, help="Device [cuda if available, else cpu].")
@click.option("--seed", default=42, show_default=True, type=int, help="Seed for document shuffling.")
@click.option("--shuffle-documents/--no-shuffle-documents", default=False, show_default=True,
              help="Shuffle documents through a seeded buffer (for datasets stored in order).")
@click.option("--shuffle-buffer-docs", default=10_000, show_default=True, type=int,
              help="Documents in that shuffle buffer.")
@click.option("--resume", is_flag=True, help="Continue an interrupted harvest with the same settings.")
@click.option("--overwrite", is_flag=True, help="Replace whatever dump --out holds.")
@click.option("--quiet", is_flag=True, help="No progress bars or progress lines.")
def main(hooks, mlp_pairs, mlp_pairs_input, model, dataset, split, text_column, context_size, batch_size,
         tokens, prepend_bos, skip_bos, dtype, model_dtype, fmt, compression, shard_rows, out, device, seed,
         shuffle_documents, shuffle_buffer_docs, resume, overwrite, quiet) -> None:
    """Run a language model over a token dataset once and write the activations at one or more
    hook points to disk as sharded, resumable dumps that `train` reads.

    Examples: harvest --hook blocks.0.hook_mlp_out --tokens 1000000;
    harvest --mlp-pairs all --tokens 1000000 (every layer's MLP input and output, for transcoders)
    """
    with one_line_errors("harvest", interrupted=INTERRUPTED):
        from harvest.run import harvest
        from shared.storage import location

        started()  # the heavy imports are done; from here Ctrl-C is INTERRUPTED's line
        if mlp_pairs_input is not None and mlp_pairs is None:
            raise UserError("--mlp-pairs-input applies with --mlp-pairs only: add --mlp-pairs LAYERS")
        where = location(out) if out is not None else None
        if fmt is None and where is not None and where.capabilities.formats[0] != "safetensors":
            click.echo(f"note: dumps in {where.kind} are written as {where.capabilities.formats[0]}", err=True)
        cfg = HarvestConfig(
            hooks=list(hooks) or None,  # None: the default hook, or none besides --mlp-pairs
            mlp_pairs=mlp_pairs, mlp_pairs_input=mlp_pairs_input or DEFAULT_INPUT,
            model=model, dataset=dataset, split=split, text_column=text_column,
            context_size=context_size, batch_size=batch_size, tokens=tokens, prepend_bos=prepend_bos,
            skip_bos=skip_bos, dtype=dtype, model_dtype=model_dtype, format=fmt,
            compression=None if compression == "none" else compression, shard_rows=shard_rows,
            out=out, device=device, seed=seed, shuffle_documents=shuffle_documents,
            shuffle_buffer_docs=shuffle_buffer_docs, resume=resume, overwrite=overwrite)
        result = harvest(cfg, log=lambda s: click.echo(s, err=True), progress=not quiet)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 alone reports the dumps
        return
    for hook, folder in result.folders.items():
        role = hook_role(hook) if mlp_pairs is not None else None
        click.echo(f"{hook}: {folder}" + (f"  ({role})" if role else ""))
