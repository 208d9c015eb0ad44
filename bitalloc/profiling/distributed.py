"""torchrun: detection from the environment, work split by cost, results shared by rank 0.

The single-process path needs nothing (nanoGPT's rule: RANK unset means one process).
"""

from __future__ import annotations

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
        local = int(os.environ.get("LOCAL_RANK", 0))
        chosen = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(chosen)
        return cls(dist.get_rank(), dist.get_world_size(), chosen)

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def first(self, fn):
        """Run ``fn`` on rank 0, then share its result (or its error) with every rank."""
        if self.world == 1:
            return fn()
        import torch.distributed as dist

        box: list = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except BitallocError as exc:
                box[0] = ("error", str(exc))
        dist.broadcast_object_list(box, src=0)
        status, value = box[0]
        if status == "error":
            raise BitallocError(value)
        return value
