"""Where this process stands in a torchrun job: rank, world size, barriers and the two collectives
the stages need, all no-ops in a plain process.

``torchrun`` (or ``srun torchrun``) sets ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and the rendezvous
variables; :func:`init_from_env` joins the job when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA).
Without torchrun every helper answers for a single process, so the library behaves as before.
"""

from __future__ import annotations

import atexit
import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["all_gather_objects", "all_gather_rows", "barrier", "env_world_size", "init_from_env",
           "is_main", "local_rank", "rank", "shard", "world_size"]

# A stage that runs on rank 0 alone (say the teacher) keeps the others at a barrier that long.
TIMEOUT = datetime.timedelta(hours=24)


def env_world_size() -> int:
    """The job size torchrun announces (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: str = "cpu") -> None:
    """Join the torchrun job named by the environment, once (nothing to do for one process)."""
    if env_world_size() <= 1 or not dist.is_available() or dist.is_initialized():
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    atexit.register(_destroy)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if _active() else 0


def world_size() -> int:
    return dist.get_world_size() if _active() else 1


def local_rank() -> int:
    """This process's index on its node (its GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """Rank 0: the process that writes shared artifacts and logs."""
    return rank() == 0


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shard(n: int, unit: int = 1, *, of: int | None = None) -> range:
    """Rank ``of``'s (default: this rank's) contiguous share of ``range(n)``, cut at multiples of
    ``unit`` (a batch size, so every rank's batches are those one process would make)."""
    chunks = -(-n // unit)
    w, r = world_size(), rank() if of is None else of
    lo, hi = chunks * r // w, chunks * (r + 1) // w
    return range(min(lo * unit, n), min(hi * unit, n))


def all_gather_rows(rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Every rank's ``rows`` (rank r holds ``counts[r]`` rows of the same trailing shape), concatenated
    in rank order on every rank; the values are copied, never summed, so the result is exact."""
    if world_size() == 1:
        return rows
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")
    padded = rows.new_zeros((max(counts), *rows.shape[1:]), device=dev)
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(rows.device)




def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (small, picklable: rows of results), in rank order, on every rank."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out
