"""LoftQ: W ~ Q + B·A (rank-r factorizations, the decomposition, per-matrix seeds)."""

from .decomposition import (
    DEFAULT_DAMPING,
    Factorization,
    LoftQResult,
    LoraSettings,
    loftq,
    loftq_batch,
    lora_scaling,
    whitening_factor,
)
from .lowrank import LOWRANK_METHODS, exact_lowrank, randomized_lowrank
from .recipe import Assignment, decompose
from .seeds import module_seed
from .weighting import IDENTITY, Diagonal, Weighting, Whitened, weighting_from

__all__ = [
    "Assignment",
    "decompose",
    "DEFAULT_DAMPING",
    "IDENTITY",
    "Diagonal",
    "Weighting",
    "Whitened",
    "weighting_from",
    "LOWRANK_METHODS",
    "Factorization",
    "LoraSettings",
    "LoftQResult",
    "exact_lowrank",
    "loftq",
    "loftq_batch",
    "lora_scaling",
    "module_seed",
    "randomized_lowrank",
    "whitening_factor",
]
