"""The processes torchrun started, seen from one of them: who this process is, its device, the
process group, and the collectives both stages need (a barrier; every rank stopping with one line
when any rank fails).

torch.distributed with the env:// rendezvous (the variables torchrun sets), gloo on CPU, nccl on
CUDA; without torchrun this is rank 0 of 1 and every helper is a no-op.
"""
from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from shared.device import pick_device
from shared.errors import UserError

__all__ = ["Ranks", "agree", "barrier", "end_group", "rank_device", "ranks_from_env", "start_group",
           "with_rank"]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the processes torchrun started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def lead(self) -> bool:
        return self.rank == 0


def ranks_from_env() -> Ranks:
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise UserError("WORLD_SIZE, RANK and LOCAL_RANK must be integers (torchrun sets them)") from None
    if world < 1 or not 0 <= rank < world:
        raise UserError(f"RANK {rank} does not fit WORLD_SIZE {world}")
    return Ranks(rank, world, local)


def rank_device(asked: str | None, ranks: Ranks) -> torch.device:
    """The device of this rank: cuda:LOCAL_RANK when CUDA is asked for (or is there, unasked)."""
    if ranks.active and (asked == "cuda" or (asked is None and torch.cuda.is_available())):
        asked = f"cuda:{ranks.local_rank}"
    device = pick_device(asked)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def start_group(ranks: Ranks, device: torch.device, timeout: dt.timedelta | None = None) -> bool:
    """Join the process group (env:// rendezvous); True if this call created it."""
    import torch.distributed as dist

    if not ranks.active or dist.is_initialized():
        return False
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"timeout": timeout} if timeout is not None else {}
    dist.init_process_group(backend=backend, init_method="env://", rank=ranks.rank,
                            world_size=ranks.world, **kwargs)
    return True


def end_group(created: bool) -> None:
    import torch.distributed as dist

    if created and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ranks: Ranks) -> None:
    if ranks.active:
        import torch.distributed as dist

        dist.barrier()


def agree(ranks: Ranks, body: Callable[[], Any]) -> Any:
    """Run `body` on every rank; if it fails on any, every rank stops with one line (the failing
    rank with its own error, the others naming it) instead of waiting at the next collective."""
    if not ranks.active:
        return body()
    import torch.distributed as dist

    error: BaseException | None = None
    result = None
    try:
        result = body()
    except Exception as e:  # re-raised below, after every rank knows
        error = e
    said: list[Any] = [None] * ranks.world
    dist.all_gather_object(said, None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [r for r, s in enumerate(said) if s is not None]
    if failed:
        raise UserError(f"rank {ranks.rank}: stopped because rank {failed[0]} failed ({said[failed[0]]})")
    return result


def with_rank(ranks: Ranks, e: UserError) -> UserError:
    """The same error, its message starting with the rank (one line per rank under torchrun)."""
    if not ranks.active or str(e).startswith("rank "):
        return e
    try:
        return type(e)(f"rank {ranks.rank}: {e}")
    except TypeError:
        return UserError(f"rank {ranks.rank}: {e}")
