"""Decompose a matrix exactly as it was profiled: the one recipe profile, apply and eval share.

A profiled, applied or evaluated matrix must come out bit for bit the same (the plan's
errors are the profile's, and `apply`'s factors are the ones measured). What fixes the
result besides the weights and their statistics is an `Assignment`: the config, the LoRA
rank, the LoftQ iterations, the adapter's scaling and the low-rank method; the randomized
steps are seeded from (module name, config) by `module_seed`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..quant import QuantConfig
from .decomposition import Factorization, LoftQResult, LoraSettings, loftq_batch
from .seeds import module_seed
from .weighting import IDENTITY, Weighting


@dataclass(frozen=True)
class Assignment:
    """How a matrix is decomposed: ``config``, LoRA ``rank``, LoftQ ``iters``, the adapter's
    scaling (``lora``) and the rank-r step's ``lowrank`` method."""

    config: QuantConfig
    rank: int
    iters: int
    lora: LoraSettings = field(default_factory=LoraSettings)
    lowrank: str = "randomized"


# shape: the batch's tensors, their names and three values; the rest are per-call options
def decompose(
    weights: torch.Tensor,
    names: Sequence[str],
    assignment: Assignment,
    weighting: Weighting = IDENTITY,
    *,
    keep_q: bool = True,
    device: torch.device | str | None = None,
    timings: dict[str, float] | None = None,
) -> list[LoftQResult]:
    """LoftQ of the matrices ``weights`` ((b, out, in), or one (out, in)) named ``names``,
    each seeded from (name, config), weighted by ``weighting``."""
    config = QuantConfig.parse(assignment.config)
    return loftq_batch(
        weights if weights.dim() == 3 else weights.unsqueeze(0), config, assignment.rank, assignment.iters,
        lora=assignment.lora, factorization=Factorization(assignment.lowrank),
        seeds=[module_seed(name, config) for name in names], weighting=weighting, keep_q=keep_q,
        device=device, timings=timings,
    )  # fmt: skip
