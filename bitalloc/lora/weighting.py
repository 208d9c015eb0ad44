"""How LoftQ weighs its error: the statistics of a decomposition as one typed value.

LoftQ minimizes ‖(W − Q − B A) M‖_F for a weighting matrix M of the layer's inputs:

- `Weighting` (the identity, M = I): plain LoftQ, the weight error;
- `Diagonal` (M = diag(√h), h per input column, e.g. activation second moments): LQ-LoRA's
  Fisher-weighted step, the activation objective;
- `Whitened` (M = L with L Lᵀ = H + λI, H = XᵀX/n the inputs' full second moment): the
  layer's output error ‖(W − Q − B A) X‖²/n, the output objective. The factor L can be given
  already computed (`Whitened.factored`: one Cholesky for every config of the same matrices).

Each value checks itself against the matrices it weighs (`checked`), selects part of a batch
(`select`) and binds to a device (`bound`): the bound form holds the tensors `loftq_batch`
works with (`weigh`, `unweigh`, the -mse scale search's per-column weights).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from ..errors import BitallocError
from ..quant.blockwise import check_tensor

DEFAULT_DAMPING = 0.01  # λ of the whitened step, as a fraction of mean(diag H)


@dataclass(frozen=True, eq=False)
class Weighting:
    """The identity weighting: plain LoftQ, ‖W − Q − B A‖_F (no statistics)."""

    def checked(self, batch: int, cols: int) -> Weighting:
        """This weighting validated for ``batch`` matrices of ``cols`` columns (BitallocError)."""
        return self

    def select(self, part: slice) -> Weighting:
        """The weighting of the matrices ``part`` of the batch."""
        return self

    def bound(self, batch: int, cols: int, device: torch.device) -> Bound | None:
        """The tensors `loftq_batch` weighs with on ``device``; None: unweighted."""
        return None

    def for_configs(self, device: torch.device | str | None = None) -> Weighting:
        """The same weighting prepared once on ``device`` to decompose the same matrices in
        several configs (what is independent of the config computed here)."""
        return self


IDENTITY = Weighting()


class Bound:
    """A weighting on a device: M as `weigh` (x·M) and `unweigh` (x·M⁻¹). ``full``: M is a
    full matrix, and the weighted error of a low-rank step is read off the factorization."""

    full = False

    def weigh(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def unweigh(self, vh: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def search_weights(self) -> torch.Tensor:
        """Per-column weights (b, in) of the -mse scale search: diag(M Mᵀ)."""
        raise NotImplementedError

    def feedback(self):
        """The `bitalloc.quant.rounding.Feedback` of ``-gptq`` rounding (full M only): the column
        order and U, UᵀU = (M Mᵀ)⁻¹ in that order."""
        raise NotImplementedError


@dataclass(frozen=True, eq=False)
class Diagonal(Weighting):
    """M = diag(√h): ``h`` (in,) or (b, in), finite and positive, one weight per input column."""

    h: torch.Tensor

    def checked(self, batch: int, cols: int) -> Diagonal:
        h = check_tensor(self.h, "column_weights").detach()
        if h.dim() == 1:
            h = h.unsqueeze(0)
        count = h.shape[0] if h.dim() == 2 else -1
        if count not in (1, batch) or h.shape[-1] != cols:
            raise BitallocError(
                f"column_weights must be ({cols},) or ({batch}, {cols}) for {batch} matrices of {cols} "
                f"columns, got shape {tuple(self.h.shape)}"
            )
        if not bool(torch.isfinite(h).all()) or bool((h <= 0).any()):
            raise BitallocError("column_weights must be finite and positive (one weight per input column)")
        return Diagonal(h)

    def select(self, part: slice) -> Diagonal:
        return self if self.h.dim() == 1 or self.h.shape[0] == 1 else Diagonal(self.h[part])

    def bound(self, batch: int, cols: int, device: torch.device) -> Bound:
        return _DiagonalBound(self.h.to(device=device, dtype=torch.float32).expand(batch, cols))


class _DiagonalBound(Bound):
    def __init__(self, h: torch.Tensor) -> None:
        self.h, self.sqrt_h = h, h.sqrt().unsqueeze(1)  # (b, in), (b, 1, in)

    def weigh(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sqrt_h

    def unweigh(self, vh: torch.Tensor) -> torch.Tensor:
        return vh / self.sqrt_h

    def search_weights(self) -> torch.Tensor:
        return self.h


@dataclass(frozen=True, eq=False)
class Whitened(Weighting):
    """M = L, L Lᵀ = H + λI (λ = ``damping`` · mean(diag H)): ``covariance`` H (in, in) or
    (b, in, in), or ``factor`` L already computed (`factored`)."""

    covariance: torch.Tensor | None = None
    damping: float = DEFAULT_DAMPING
    factor: torch.Tensor | None = None

    def checked(self, batch: int, cols: int) -> Whitened:
        if (self.covariance is None) == (self.factor is None):
            raise BitallocError("a whitened weighting needs an input covariance or its factor (one of them)")
        what = "input_covariance" if self.factor is None else "whitening"
        value = check_tensor(self.covariance if self.factor is None else self.factor, what).detach()
        if value.dim() == 2:
            value = value.unsqueeze(0)
        if value.dim() != 3 or tuple(value.shape[-2:]) != (cols, cols):
            raise BitallocError(f"{what} must be ({cols}, {cols}) per matrix, got shape {tuple(value.shape)}")
        if value.shape[0] not in (1, batch):
            raise BitallocError(f"got {value.shape[0]} {what} matrices for {batch} matrices")
        if self.factor is None:
            return Whitened(value, self.damping)
        return Whitened(None, self.damping, value)

    def select(self, part: slice) -> Whitened:
        value = self.covariance if self.factor is None else self.factor
        if value.dim() == 2 or value.shape[0] == 1:
            return self
        if self.factor is None:
            return Whitened(value[part], self.damping)
        return Whitened(None, self.damping, value[part])

    def for_configs(self, device: torch.device | str | None = None) -> Whitened:
        return self.factored(device)

    def factored(self, device: torch.device | str | None = None) -> Whitened:
        """The same weighting with L computed (float32, on ``device``), to reuse across configs."""
        if self.factor is not None:
            return self
        covariance = self.covariance if device is None else self.covariance.to(device)
        return Whitened(None, self.damping, whitening_factor(covariance, self.damping).to(torch.float32))

    @functools.cached_property
    def feedback(self):
        """``-gptq`` rounding's `bitalloc.quant.rounding.Feedback` (column order and U, UᵀU =
        (H + λI)⁻¹ in that order), computed once per weighting (a `factored` one serves every
        config of its matrices)."""
        from ..quant.rounding import feedback_factor

        factor = self.factor if self.factor is not None else whitening_factor(self.covariance, self.damping)
        return feedback_factor(factor)

    def bound(self, batch: int, cols: int, device: torch.device) -> Bound:
        if self.factor is not None:
            factor = self.factor.to(device=device, dtype=torch.float32)
        else:
            factor = whitening_factor(self.covariance.to(device), self.damping).to(torch.float32)
        return _WhitenedBound(
            factor.expand(batch, cols, cols), lambda: self.feedback.to(device).expand(batch)
        )


class _WhitenedBound(Bound):
    full = True

    def __init__(self, factor: torch.Tensor, feedback) -> None:
        self.factor, self._feedback = factor, feedback

    def feedback(self):
        return self._feedback()

    def weigh(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.factor

    def unweigh(self, vh: torch.Tensor) -> torch.Tensor:
        return torch.linalg.solve_triangular(self.factor, vh, upper=False, left=False)

    def search_weights(self) -> torch.Tensor:
        return self.factor.square().sum(-1)  # diag(L Lᵀ) = diag(H + λI)


def weighting_from(
    column_weights: torch.Tensor | None = None,
    input_covariance: torch.Tensor | None = None,
    damping: float = DEFAULT_DAMPING,
    whitening: torch.Tensor | None = None,
) -> Weighting:
    """The weighting that `loftq`'s statistics keywords spell: h (``column_weights``), H
    (``input_covariance`` with ``damping``) or L (``whitening``); BitallocError for two."""
    given = [k for k, v in (("column_weights", column_weights), ("input_covariance", input_covariance),
                            ("whitening", whitening)) if v is not None]  # fmt: skip
    if len(given) > 1:
        raise BitallocError(
            "give column_weights (diagonal h), input_covariance (full H) or whitening (its factor L), "
            f"not both {given[0]} and {given[1]}"
        )
    if column_weights is not None:
        return Diagonal(column_weights)
    if input_covariance is not None:
        return Whitened(input_covariance, damping)
    if whitening is not None:
        return Whitened(None, damping, whitening)
    return IDENTITY


def check_damping(damping: object) -> None:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping < math.inf:
        raise BitallocError(f"damping must be a finite number >= 0, got {damping!r}")


def whitening_factor(covariance: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """Lower-triangular L (float64, same batch shape) with L Lᵀ = H + λI, λ = damping · mean(diag H).

    H (..., n, n) must be symmetric, finite, with a positive mean diagonal. When Cholesky
    fails (H + λI not numerically positive definite: a rank-deficient H with damping 0, or
    rounding), the diagonal is shifted by the most negative eigenvalue (plus λ, at least
    1e-10 of the mean diagonal) and Cholesky runs again: the eigenvalue shift fallback.
    """
    check_damping(damping)
    h = covariance.to(torch.float64)
    if h.dim() < 2 or h.shape[-1] != h.shape[-2]:
        raise BitallocError(f"an input covariance must be square (..., n, n), got shape {tuple(h.shape)}")
    if not bool(torch.isfinite(h).all()):
        raise BitallocError("the input covariance has NaN or infinite values")
    h = (h + h.transpose(-1, -2)) / 2
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1)
    if bool((mean_diag <= 0).any()):
        raise BitallocError(
            "the input covariance is zero (the layer's input was always 0 on the calibration data)"
        )
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    lam = (damping * mean_diag)[..., None, None]
    factor, info = torch.linalg.cholesky_ex(h + lam * eye)
    if bool((info != 0).any()):
        lowest = torch.linalg.eigvalsh(h)[..., :1, None]  # (..., 1, 1)
        shift = torch.clamp(-lowest, min=0) + torch.clamp(lam, min=1e-10 * mean_diag[..., None, None])
        for _ in range(8):
            factor, info = torch.linalg.cholesky_ex(h + shift * eye)
            if not bool((info != 0).any()):
                break
            shift = shift * 10
        else:
            raise BitallocError("the input covariance cannot be made positive definite")
    return factor
