"""`train` under torchrun: data-parallel (one SAE, each global batch split over ranks) or
sweep-parallel (the SAEs of a sweep spread over ranks).

torch.distributed, env:// rendezvous (the variables torchrun sets), gloo on CPU, nccl on CUDA; each
rank runs on its own device (cuda:LOCAL_RANK when CUDA is there).

data: every rank follows the same shuffled stream (the loader is a pure function of the seed) and
    reads and trains on only rows [r*B/N, (r+1)*B/N) of each global batch of B = train_batch_size
    rows (the loader's `share`). Each rank
    weights its loss by its share of the rows and the gradients are summed over ranks (one
    all_reduce per step), so the update is the single-process update on the global batch; the
    step's statistics (firing counts, loss terms, reconstruction sums) are summed too, so every
    rank holds the same dead-feature state and metrics. Resampling is then the same on every rank
    (same rows, same seeded draws); rank 0's parameters and Adam state are broadcast after it, and
    after the SAE is initialised or loaded, to rule out any drift. Only rank 0 writes the run
    folder (config, metrics, checkpoints, final SAE, evaluation).
    Architectures that select features over the whole batch (batchtopk, matryoshka_batchtopk)
    cannot be split this way and are refused.
sweep: rank r trains grid points r, r+N, ... reading every batch itself, so each SAE gets exactly
    the weights of its solo run; each rank writes its own SAEs' folders, rank 0 the sweep's index
    (sweep.json) and, after all ranks finish, its summary.
"""
from __future__ import annotations

import datetime as dt
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from shared.process_group import (Ranks, agree, barrier, end_group, rank_device, ranks_from_env,
                                  start_group, with_rank)
from shared.errors import UserError

__all__ = ["Parallel", "DataShard", "current", "parallel_training", "agree", "barrier", "with_rank",
           "broadcast_trainer_", "MODES"]

MODES = ("data", "sweep")
_TIMEOUT = dt.timedelta(days=7)  # sweep ranks wait at the end for the slowest one


@dataclass(frozen=True)
class DataShard:
    """This rank's rows of each global batch, and the sums over ranks."""

    rank: int
    world: int

    def rows(self, n: int) -> tuple[int, int]:
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def gather_rows(self, part: torch.Tensor, total: int) -> torch.Tensor:
        """The global batch of `total` rows from each rank's rows `part` (in rank order)."""
        import torch.distributed as dist

        sizes = [(r + 1) * total // self.world - r * total // self.world for r in range(self.world)]
        padded = torch.zeros(max(sizes), *part.shape[1:], dtype=part.dtype, device=part.device)
        padded[: part.shape[0]] = part
        pieces = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(pieces, padded)
        return torch.cat([p[:n] for p, n in zip(pieces, sizes)])

    def all_reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    @torch.no_grad()
    def all_reduce_grads_(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the (share-weighted) gradients over ranks: one flat all_reduce."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.all_reduce_sum_(flat)
        at = 0
        for p, g in zip(params, grads):
            n = g.numel()
            if p.grad is None:
                p.grad = g
            p.grad.copy_(flat[at : at + n].view_as(g))
            at += n


@dataclass(frozen=True)
class Parallel:
    ranks: Ranks = Ranks()
    mode: str = "none"  # "none" (one process), "data" or "sweep"

    @property
    def lead(self) -> bool:
        return self.ranks.lead

    @property
    def shard(self) -> DataShard | None:
        return DataShard(self.ranks.rank, self.ranks.world) if self.mode == "data" else None

    def my_runs(self, n: int) -> list[int]:
        """Indices of the sweep's SAEs this rank trains."""
        if self.mode != "sweep":
            return list(range(n))
        return list(range(self.ranks.rank, n, self.ranks.world))

    @property
    def writes_runs(self) -> bool:
        """Whether this rank writes the folders of the SAEs it trains."""
        return self.mode != "data" or self.lead


_CURRENT = Parallel()


def current() -> Parallel:
    return _CURRENT


def pick_mode(asked: str | None, sweep: bool, ranks: Ranks) -> str:
    if asked is not None and asked not in MODES:
        raise UserError(f"--parallel must be data or sweep, got '{asked}'")
    if not ranks.active:
        return "none"
    mode = asked or ("sweep" if sweep else "data")
    if mode == "sweep" and not sweep:
        raise UserError("--parallel sweep spreads the SAEs of a sweep over processes: give --sweep "
                        "(or --resume-from a sweep folder), or use --parallel data")
    return mode


@contextmanager
def parallel_training(asked: str | None, sweep: bool, device: str | None) -> Iterator[Parallel]:
    """Join torchrun's process group (when launched by it) for the body; one process otherwise."""
    global _CURRENT
    ranks = ranks_from_env()
    mode = pick_mode(asked, sweep, ranks)
    if mode == "none":
        yield _CURRENT
        return
    dev = rank_device(device, ranks)
    created = start_group(ranks, dev, timeout=_TIMEOUT)
    _CURRENT = Parallel(ranks, mode)
    try:
        yield _CURRENT
    except UserError as e:
        raise with_rank(ranks, e) from None
    finally:
        _CURRENT = Parallel()
        end_group(created)


def check_data_parallel(trainer: Any, n_rows: int, batch_size: int, world: int) -> None:
    if type(trainer.sae).batch_wide_selection:
        raise UserError(f"{trainer.cfg.architecture} picks its features over the whole batch, which "
                        "data-parallel training cannot split; train it in one process, or spread a sweep "
                        "with --parallel sweep")
    if batch_size < world:
        raise UserError(f"train_batch_size {batch_size} is smaller than the {world} processes")
    rest = n_rows % batch_size
    if 0 < rest < world:
        raise UserError(f"each epoch ends with a batch of {rest} rows, fewer than the {world} processes: "
                        "pick a train_batch_size that leaves more (or none)")


@torch.no_grad()
def broadcast_trainer_(trainer: Any) -> None:
    """Rank 0's parameters, buffers and Adam state on every rank."""
    import torch.distributed as dist

    backend = dist.get_backend()
    kind = "cuda" if backend == "nccl" else "cpu"
    tensors = list(trainer.sae.parameters()) + list(trainer.sae.buffers())
    for p in trainer.sae.parameters():
        tensors += [v for v in trainer.optimizer.state.get(p, {}).values() if torch.is_tensor(v)]
    for t in tensors:
        if t.device.type == kind:
            dist.broadcast(t.data, src=0)
