"""torchrun: detection from the environment, work split by cost, results shared by rank 0.

The single-process path needs nothing (nanoGPT's rule: RANK unset means one process).
"""

from __future__ import annotations

import atexit
import math
import os

import torch

from ..checkpoints import Source
from ..errors import BitallocError


def split_by_cost(modules: list[str], source: Source, n_configs: int, world: int) -> list[list[str]]:
    """Split matrices across ``world`` ranks, largest first to the least-loaded rank (LPT)."""
    loads = [0] * world
    parts: list[list[str]] = [[] for _ in range(world)]
    by_cost = sorted(modules, key=lambda m: (-math.prod(source.shape(m)), m))
    for module in by_cost:
        target = loads.index(min(loads))
        parts[target].append(module)
        loads[target] += math.prod(source.shape(module)) * n_configs
    order = {m: i for i, m in enumerate(modules)}
    return [sorted(part, key=order.get) for part in parts]


class Distributed:
    """torchrun detection (RANK in the environment); the single-process path needs nothing."""

    def __init__(self, rank: int = 0, world: int = 1, device: torch.device | None = None):
        self.rank, self.world, self.device = rank, world, device

    @classmethod
    def from_env(cls, device: str) -> Distributed:
        if int(os.environ.get("RANK", -1)) == -1:
            return cls()
        import torch.distributed as dist

        use_cuda = torch.cuda.is_available() and str(device) != "cpu"
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if use_cuda else "gloo")
            # torn down before the interpreter exits: a process group left to finalization
            # can abort the process ("terminate called without an active exception") after
            # its error line was printed, turning exit code 2 into a crash
            atexit.register(_destroy_process_group)
        local = int(os.environ.get("LOCAL_RANK", 0))
        chosen = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(chosen)
        return cls(dist.get_rank(), dist.get_world_size(), chosen)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def first(self, fn, share: bool = True):
        """Run ``fn`` on rank 0, then share its result (``share``; else the other ranks get
        None) or its error with every rank: any exception on rank 0 ends every rank with the
        same BitallocError."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        box: list = [None]
        value = None
        if self.rank == 0:
            try:
                value = fn()
                box[0] = ("ok", value if share else None)
            except Exception as exc:  # noqa: BLE001 - any failure must reach every rank
                box[0] = ("error", failure_message(exc, 0, self.world))
        dist.broadcast_object_list(box, src=0)
        status, shared = box[0]
        if status == "error":
            raise BitallocError(shared)
        return shared if share or self.rank != 0 else value

    def each(self, fn):
        """Run ``fn`` on every rank, then check that every rank succeeded (an all-gather of
        each rank's status, which is also a barrier): an exception on any rank ends every
        rank with the same BitallocError (the lowest failing rank's message). Returns this
        rank's result."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        status, value = None, None
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - any failure must reach every rank
            status = failure_message(exc, self.rank, self.world)
        statuses: list = [None] * self.world
        dist.all_gather_object(statuses, status)
        failed = next((message for message in statuses if message is not None), None)
        if failed is not None:
            raise BitallocError(failed)
        return value


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; the peer may be gone already
            pass


def failure_message(exc: BaseException, rank: int, world: int) -> str:
    """One line for every rank: a BitallocError's own message, anything else with its type
    and the rank it happened on."""
    text = " ".join(str(exc).split())
    if isinstance(exc, BitallocError):
        return text
    return f"rank {rank} of {world} failed: {type(exc).__name__}: {text}" if text else (
        f"rank {rank} of {world} failed: {type(exc).__name__}")  # fmt: skip
