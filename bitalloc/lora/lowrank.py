"""Rank-r factorizations R ~ U diag(S) Vh of (batches of) matrices: exact and randomized.

The randomized range finder (Halko, Martinsson & Tropp 2011) takes ``rank + oversample``
probe vectors, ``power_iters`` subspace iterations, and can be warm-started with the
right singular vectors of a nearby matrix (LoftQ's previous iterate). LoftQ residuals
have flat spectra (quantization noise), so the defaults (16 extra probes, 4 power
iterations) are what it takes to stay within 0.5% of the exact SVD's error; on a CPU
that is still far cheaper than one full SVD (figures: docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from ..devices import one_cpu_thread

LOWRANK_METHODS = ("exact", "randomized")


def exact_lowrank(residual: torch.Tensor, rank: int):
    """Top-``rank`` SVD of (..., m, n): U (..., m, r), S (..., r), Vh (..., r, n)."""
    u, s, vh = torch.linalg.svd(residual, full_matrices=False)
    return u[..., :rank], s[..., :rank], vh[..., :rank, :]


def orthonormalize(columns: torch.Tensor) -> torch.Tensor:
    with one_cpu_thread(columns.device):
        return _orthonormalize(columns)


def _orthonormalize(columns: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of (..., m, k), k small.

    CholeskyQR2 (two passes of Q = Y chol(Y^T Y)^-T) costs two thin matmuls, much less
    than Householder QR on a CPU; Householder is the fallback if the Gram matrix is
    numerically singular.
    """
    basis = columns
    for _ in range(2):
        gram = basis.transpose(-1, -2) @ basis
        factor, info = torch.linalg.cholesky_ex(gram)
        if bool((info != 0).any()):
            return torch.linalg.qr(columns).Q
        basis = torch.linalg.solve_triangular(factor.transpose(-1, -2), basis, upper=True, left=False)
    if not bool(torch.isfinite(basis).all()):
        return torch.linalg.qr(columns).Q
    return basis


def gaussian_probes(shape: tuple[int, ...], seeds: list[int] | None, device: torch.device) -> torch.Tensor:
    """(len(seeds), *shape) standard normals, each matrix drawn from its own seed."""
    if seeds is None:
        return torch.randn(shape, device=device)
    out = []
    for seed in seeds:
        generator = torch.Generator(device="cpu").manual_seed(int(seed) % (2**63))
        out.append(torch.randn(shape, generator=generator))
    return torch.stack(out).to(device)


def randomized_lowrank(
    residual: torch.Tensor,
    rank: int,
    *,
    oversample: int = 16,
    power_iters: int = 4,
    warm_start: torch.Tensor | None = None,
    seeds: list[int] | None = None,
):
    """Approximate top-``rank`` SVD of (b, m, n) by a randomized range finder.

    ``warm_start`` (b, n, k) are right singular vectors from a nearby matrix: they
    replace the first k random probes. ``seeds`` (one per matrix) make it reproducible
    whatever the batch it runs in.
    """
    batch, rows, cols = residual.shape
    width = min(rank + oversample, rows, cols)
    probes = gaussian_probes((cols, width), seeds if seeds is not None else None, residual.device)
    if seeds is None:
        probes = probes.expand(batch, cols, width)
    if warm_start is not None:
        k = min(warm_start.shape[-1], width)
        probes = torch.cat([warm_start[..., :k], probes[..., : width - k]], dim=-1)
    basis = orthonormalize(residual @ probes)
    for _ in range(power_iters):
        basis = orthonormalize(residual.transpose(-1, -2) @ basis)
        basis = orthonormalize(residual @ basis)
    small = basis.transpose(-1, -2) @ residual  # (b, width, n)
    with one_cpu_thread(small.device):
        u_small, s, vh = torch.linalg.svd(small, full_matrices=False)
    u = basis @ u_small[..., :rank]
    return u, s[..., :rank], vh[..., :rank, :]
