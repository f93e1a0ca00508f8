"""The harvest's one driver: this process's share of the shards -> forward -> shard writers ->
(rank 0) the complete manifests.

A single process is rank 0 of 1, taking every shard still to do; under torchrun each rank takes
its share (harvest.shard_plan) and runs the same code. Only how a finished shard is recorded
differs (harvest.ledger): in the manifest when one process writes the shards in order, in entry
files when ranks write them in any order.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
from tqdm import tqdm

from harvest.config import HarvestConfig
from harvest.contexts import pack_contexts, prefetched_batches
from harvest.data import DocumentSource, iter_token_docs
from harvest.forward import forward_into
from harvest.ledger import EntryLedger, Ledger, ManifestLedger, complete_dump, finished_shards
from harvest.shard_plan import ShardPlan, plan_shards
from harvest.writer import ShardWriter
from shared.manifest import Manifest
from shared.models import bos_token_id
from shared.process_group import Ranks, agree, barrier
from shared.shard_files import TORCH_DTYPE
from shared.storage import Location

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class HarvestPass:
    """What one harvest invocation forwards and where it writes: the same on every rank."""

    cfg: HarvestConfig
    model: TransformerBridge
    source: DocumentSource
    manifests: dict[str, Manifest]
    """hook -> manifest, for the hooks still to do (rank 0 wrote them to disk)."""
    folders: dict[str, Location]
    """hook -> dump folder."""
    stop: int | None
    """The model runs to this layer only (`stop_at_layer` of the deepest hook)."""
    device: str
    by_entries: bool
    """Finished shards are recorded in entry files (ranks in any order), not in the manifest."""

    @property
    def n_rows(self) -> int:
        return self.cfg.n_contexts * self.cfg.rows_per_context


def _ledger(job: HarvestPass, hook: str) -> Ledger:
    if job.by_entries:
        return EntryLedger(job.folders[hook])
    return ManifestLedger(job.folders[hook], job.manifests[hook])


def _plan(job: HarvestPass, ranks: Ranks) -> ShardPlan:
    done = {h: set(finished_shards(job.folders[h], m)) for h, m in job.manifests.items()}
    return plan_shards({h: m.shard_rows for h, m in job.manifests.items()}, done, job.n_rows,
                       job.cfg.batch_size, job.cfg.rows_per_context, ranks)


def _forward(job: HarvestPass, plan: ShardPlan, writers: dict[str, ShardWriter], ranks: Ranks,
             progress: bool) -> int:
    """Forward this process's batches into the writers; returns the tokens run through the model."""
    cfg = job.cfg
    if not plan.batches:
        return 0
    docs = iter_token_docs(job.source, getattr(job.model, "tokenizer", None))
    contexts = pack_contexts(docs, cfg.context_size, bos_token_id(job.model), cfg.prepend_bos)
    batches = prefetched_batches(contexts, cfg.n_contexts, cfg.batch_size, cfg.context_size,
                                 plan.first_batch, keep=plan.batches.__contains__,
                                 last_batch=plan.last_batch)
    # A single process shows the whole dump (what earlier runs wrote counts as done); a rank its share.
    mine = sum(min(cfg.batch_size, cfg.n_contexts - b * cfg.batch_size) for b in plan.batches) * cfg.context_size
    total = mine if ranks.active else cfg.n_contexts * cfg.context_size
    bar = tqdm(total=total, initial=total - mine, unit="tok", unit_scale=True,
               disable=not (progress and ranks.lead), smoothing=0.1,
               desc="harvest" + (f" (rank 0 of {ranks.world})" if ranks.active else ""))
    try:
        return forward_into(job.model, batches, writers, {h: m.d_in for h, m in job.manifests.items()},
                            stop=job.stop, device=job.device, skip_bos=cfg.skip_bos,
                            rows_per_context=cfg.rows_per_context, storage=TORCH_DTYPE[cfg.dtype], bar=bar)
    finally:
        batches.close()
        bar.close()


def drive(job: HarvestPass, ranks: Ranks, progress: bool, log: Callable[[str], None]) -> tuple[int, float]:
    """Harvest this rank's share of the shards still missing, then (rank 0) complete the dumps.

    Returns (tokens this rank ran through the model, seconds of the forward/write loop).
    """
    # Every rank reads what is on disk before any rank writes (the collective is the barrier).
    plan = agree(ranks, lambda: _plan(job, ranks))
    if job.by_entries:
        log(f"{plan.todo} of {plan.total} shards to harvest, over {ranks.world} process(es); "
            f"rank 0 takes {len({i for w in plan.writes.values() for i in w})}")
    pin = torch.device(job.device).type == "cuda"
    writers = {h: ShardWriter(job.folders[h], m, job.n_rows, plan.writes[h], _ledger(job, h), pin)
               for h, m in job.manifests.items()}
    start = time.perf_counter()
    try:
        tokens = _forward(job, plan, writers, ranks, progress)
        if progress and ranks.lead and any(w.bytes_taken > w.bytes_written for w in writers.values()):
            log("writing the last shards to disk ...")  # the bar is done; the writer thread is not
        for w in writers.values():
            w.finish()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    seconds = time.perf_counter() - start
    barrier(ranks)  # every rank's shards are recorded

    def complete() -> None:
        if ranks.lead:
            for h, m in job.manifests.items():
                complete_dump(job.folders[h], m, job.n_rows)

    agree(ranks, complete)  # a failure on rank 0 stops every rank in one line
    return tokens, seconds
