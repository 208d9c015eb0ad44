"""Per-matrix seeds: every randomized step of a matrix's decomposition is fixed by
(module, config), so profile, resumed profile, torchrun profile and apply agree."""

from __future__ import annotations

import hashlib

from ..quant import QuantConfig


def module_seed(module: str, config: QuantConfig | str) -> int:
    """The seed of a matrix's randomized steps: fixed by (module, config), nothing else."""
    digest = hashlib.sha256(f"{module}|{config}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 62) - 1)
