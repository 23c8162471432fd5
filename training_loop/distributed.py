"""torchrun / DistributedDataParallel helpers: the same code runs as one process or as N.

``torchrun --nproc_per_node N -m surgenet_assist.cli.main train ...`` sets RANK/WORLD_SIZE/LOCAL_RANK;
:func:`init` then joins the process group (``nccl`` on GPUs, ``gloo`` on CPU). Without those variables
everything here is a no-op, so single-process callers need no special case.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import torch
import torch.distributed as dist


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launch_rank_and_size() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) that torchrun gave this process, without joining a process group (for work split
    by rank alone, e.g. `ls preannotate`); (0, 1) when not launched by torchrun."""
    if not launched_by_torchrun():
        return 0, 1
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def multi_node() -> bool:
    """Whether torchrun started ranks on more than one machine (LOCAL_WORLD_SIZE < WORLD_SIZE)."""
    if not launched_by_torchrun():
        return False
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])) < int(os.environ["WORLD_SIZE"])


def init(backend: str | None = None, timeout_minutes: float = 30) -> bool:
    """Join the process group when launched by torchrun; returns whether running distributed.

    ``timeout_minutes`` bounds every collective: an archive run gathers its summary only after the slowest
    rank's last video, hours after the fastest one finished, so it passes a longer one."""
    if not launched_by_torchrun() or dist.is_initialized():
        return dist.is_initialized()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend, timeout=dt.timedelta(minutes=timeout_minutes))
    return True


def local_rank() -> int:
    """This process's GPU index on its node (torchrun's LOCAL_RANK; 0 when not launched by torchrun)."""
    return int(os.environ.get("LOCAL_RANK", 0))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s value on every rank (e.g. the version string only rank 0 registered)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (``[obj]`` when not distributed)."""
    if not dist.is_initialized():
        return [obj]
    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
