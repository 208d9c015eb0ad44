"""LoftQ: W ~ Q + B·A (rank-r factorizations, the decomposition, per-matrix seeds)."""

from .decomposition import Factorization, LoftQResult, LoraSettings, loftq, loftq_batch, lora_scaling
from .lowrank import LOWRANK_METHODS, exact_lowrank, randomized_lowrank
from .seeds import module_seed

__all__ = [
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
]
