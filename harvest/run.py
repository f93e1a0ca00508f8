"""The harvest: load the model and dataset, prepare each hook's dump (fresh, resumed or done), then
the driver (harvest.driver): tokens -> model forward (to the deepest hook only) -> shard writers."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from harvest.config import SHARD_BYTES, HarvestConfig
from harvest.contexts import too_few_tokens
from harvest.data import DocumentSource, open_documents
from harvest.driver import HarvestPass, drive
from harvest.ledger import has_progress, prepare_rank_folder
from harvest.pass_id import pass_id_for
from harvest.shard_plan import check_shard_rows
from harvest.target import Existing, check_disk, inspect_folder, out_folders
from shared import atomic
from shared.errors import UserError
from shared.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest, fingerprint, read_manifest
from shared.models import (
    bos_token_id, check_hook, hook_layer, load_model, model_fingerprint, model_n_ctx, model_n_layers,
    stop_at_layer,
)
from shared.process_group import Ranks, agree, end_group, rank_device, ranks_from_env, start_group, with_rank
from shared.shard_files import TORCH_DTYPE

_TIMEOUT = dt.timedelta(hours=12)  # ranks wait at barriers for the slowest one (imbalance: a shard)
_VERSIONED = ("mats-sae-training", "torch", "transformer-lens", "transformers", "datasets",
              "safetensors", "numpy", "zarr")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def probe_widths(model: Any, hooks: list[str], device: str, stop: int | None) -> dict[str, int]:
    """Run two tokens through the model to learn each hook's width (d_in) and check its shape."""
    toks = torch.zeros((1, 2), dtype=torch.long, device=device)
    with torch.inference_mode():
        _, cache = model.run_with_cache(toks, names_filter=hooks, stop_at_layer=stop,
                                        return_cache_object=False)
    widths = {}
    for h in hooks:
        a = cache[h]
        if a.dim() < 3 or tuple(a.shape[:2]) != (1, 2):
            raise UserError(f"hook '{h}' gives shape {tuple(a.shape)} for 2 tokens, not "
                            "[batch, position, ...]: pick a per-token hook such as hook_mlp_out")
        widths[h] = int(np.prod(a.shape[2:]))
    return widths


def new_manifest(cfg: HarvestConfig, hook: str, d_in: int, fields: dict[str, Any], model: Any,
                 model_fp: str, source: DocumentSource, shard_rows: int) -> Manifest:
    tok = getattr(model, "tokenizer", None)
    return Manifest(
        format_version=FORMAT_VERSION, complete=False, format=cfg.format, model=cfg.model,
        model_fingerprint=model_fp, config_fingerprint=fingerprint(fields), hook=hook, layer=hook_layer(hook),
        d_in=d_in, dtype=cfg.dtype, context_size=cfg.context_size,
        rows_per_context=cfg.rows_per_context, dataset=cfg.dataset, split=cfg.split,
        column=source.column, tokenized=source.tokenized,
        tokenizer=getattr(tok, "name_or_path", None) if tok is not None else None,
        bos_token_id=bos_token_id(model), prepend_bos=cfg.prepend_bos, skip_bos=cfg.skip_bos,
        shard_rows=shard_rows, n_rows=0, n_contexts=cfg.n_contexts,
        n_tokens=cfg.n_contexts * cfg.context_size, shards=[], stats=None,
        harvest_config=fields | {"hooks": cfg.hooks}, versions=package_versions(),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        compression=cfg.compression,
    )


def _validate(cfg: HarvestConfig, model: Any, source: DocumentSource) -> None:
    for h in cfg.hooks:
        check_hook(model, h)
    n_ctx = model_n_ctx(model)
    if n_ctx is not None and cfg.context_size > n_ctx:
        raise UserError(f"--context-size {cfg.context_size} exceeds the model's n_ctx {n_ctx}; "
                        f"use --context-size {n_ctx} or less")
    if source.exact_tokens is not None:
        body = cfg.context_size - 1 if cfg.prepend_bos else cfg.context_size
        available = source.exact_tokens // body  # whole contexts the dataset can fill
        if available < cfg.n_contexts:
            raise too_few_tokens(available, cfg.n_contexts, cfg.context_size)


@dataclass
class HarvestResult:
    folders: dict[str, Path]  # hook -> dump folder
    tokens: int = 0  # tokens run through the model by this call (0 when nothing was left to do)
    seconds: float = 0.0  # wall time of the forward/write loop, model loading excluded
    pass_id: str | None = None  # the pass's identifier in every manifest it wrote (None: nothing to do)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def harvest(cfg: HarvestConfig, log: Callable[[str], None] = print, progress: bool = True) -> HarvestResult:
    """Harvest activations for every hook in `cfg` (one model pass for all of them).

    Under torchrun every rank harvests a share of the shards (see `harvest.driver`); only rank 0
    logs, shows progress and writes the manifests.
    """
    ranks = ranks_from_env()
    device = rank_device(cfg.device, ranks)
    created = start_group(ranks, device, timeout=_TIMEOUT)
    try:
        return _harvest(cfg, ranks, str(device), log if ranks.lead else (lambda s: None), progress)
    except UserError as e:
        raise with_rank(ranks, e) from None
    finally:
        end_group(created)


def default_shard_rows(cfg: HarvestConfig, d_in: int) -> int:
    """About SHARD_BYTES of activations, a whole number of forward batches (so that a harvest split
    over processes cuts the same shards as a single process)."""
    unit = cfg.batch_size * cfg.rows_per_context
    rows = SHARD_BYTES // (d_in * TORCH_DTYPE[cfg.dtype].itemsize)
    return max(unit, rows - rows % unit)


def _harvest(cfg: HarvestConfig, ranks: Ranks, device: str, log: Callable[[str], None],
             progress: bool) -> HarvestResult:
    if progress and ranks.lead:
        log(f"loading model {cfg.model} on {device} ...")
    model = load_model(cfg.model, device, cfg.model_dtype, progress=progress and ranks.lead)
    cfg = cfg.with_pairs(model_n_layers(model))  # --mlp-pairs -> hooks, now that the layers are known
    source = open_documents(cfg.dataset, cfg.split, cfg.text_column, cfg.seed,
                            cfg.shuffle_documents, cfg.shuffle_buffer_docs)
    log(f"dataset {source.description}")
    _validate(cfg, model, source)
    stop = stop_at_layer(cfg.hooks)
    widths = probe_widths(model, cfg.hooks, device, stop)
    folders = out_folders(cfg.out, cfg.model, cfg.hooks)
    n_rows = cfg.n_contexts * cfg.rows_per_context
    model_fp = model_fingerprint(model)
    # Shards recorded one by one in entry files (each shard whole, from any rank) under torchrun,
    # and to resume a dump begun so; else in the manifest, in order.
    by_entries = ranks.active or any(has_progress(f) for f in folders.values())

    def prepare() -> dict[str, Manifest]:
        manifests: dict[str, Manifest] = {}
        resumed: dict[str, Manifest] = {}
        bytes_needed = 0
        for h, folder in folders.items():
            elem = TORCH_DTYPE[cfg.dtype].itemsize
            shard_rows = cfg.shard_rows or default_shard_rows(cfg, widths[h])
            fields = cfg.data_fields(h, torch.device(device).type) | {"model_fingerprint": model_fp}
            fp = fingerprint(fields)
            existing: Existing = inspect_folder(folder, fp, cfg.resume, cfg.overwrite)
            if existing.done:
                log(f"{folder} already holds this complete dump; nothing to do")
                continue
            if existing.manifest is not None:
                resumed[h] = existing.manifest
            m = existing.manifest or new_manifest(cfg, h, widths[h], fields, model, model_fp, source,
                                                  shard_rows)
            if by_entries:
                check_shard_rows(m.shard_rows, cfg.batch_size, cfg.rows_per_context, str(folder))
            manifests[h] = m
            done_rows = sum(s.rows for s in m.shards)
            bytes_needed += (n_rows - done_rows) * (widths[h] * elem + 16)
        if by_entries and len({m.shard_rows for m in manifests.values()}) > 1:
            raise UserError("a harvest split over processes cuts every hook's dump at the same rows: "
                            "pass one --shard-rows for all hooks (a multiple of batch-size x rows per "
                            f"context = {cfg.batch_size * cfg.rows_per_context})")
        if not manifests:
            return manifests
        pass_id = pass_id_for(resumed)
        for m in manifests.values():
            m.pass_id = pass_id
        check_disk([folders[h] for h in manifests], bytes_needed, log)
        for h, m in manifests.items():
            folders[h].ensure_folder()
            atomic.write_json(folders[h] / MANIFEST_NAME, m.to_dict())
            if by_entries:
                prepare_rank_folder(folders[h])
        return manifests

    manifests = agree(ranks, prepare if ranks.lead else dict)
    if ranks.active:  # the other ranks read the manifests rank 0 prepared, for the hooks left to do
        manifests = agree(ranks, (lambda: manifests) if ranks.lead else lambda: {
            h: m for h, m in ((h, read_manifest(f)) for h, f in folders.items()) if not m.complete})
    if not manifests:
        return HarvestResult(folders)
    job = HarvestPass(cfg, model, source, manifests, folders, stop, device, by_entries)
    tokens, seconds = drive(job, ranks, progress, log)
    result = HarvestResult(folders, tokens, seconds, next(iter(manifests.values())).pass_id)
    log(f"harvested {tokens:,} tokens in {result.seconds:.1f} s ({result.tokens_per_s:,.0f} tokens/s)"
        + (f" on rank 0 of {ranks.world}" if ranks.active else ""))
    return result
