"""Rounding with error feedback (GPTQ, arXiv 2210.17323): codes chosen for the layer's output.

Nearest rounding minimizes each weight's own error. With the layer's input second moment
H = XᵀX/n known, the output error ‖(W − Q) X‖²/n = tr((W − Q) H (W − Q)ᵀ) is lower when each
column's rounding error is compensated by the columns not yet rounded. GPTQ does it in one pass:
with U upper triangular, UᵀU = H⁻¹ (H damped: H + λI), column j is rounded to its nearest stored
value q_j and the columns after it move by −(w_j − q_j)/U_jj · U_j,(j+1:). The columns are taken
in decreasing order of H's diagonal (GPTQ's "act order": the inputs that carry the most energy
first, while the most columns are left to compensate), in chunks whose updates are applied as
one matrix product ("lazy batch" updates).

The stored format does not change: every block's scale (and zero point) is computed first from
the whole input matrix as the config says (absmax, range, or the ``-mse`` search; GPTQ's "static
groups"), then codes are chosen against those stored scales, so a code stands for exactly what
nearest rounding's would. With a diagonal H (or none) the feedback vanishes and the codes are
nearest rounding's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import BitallocError
from .blockwise import _blocks, element_weights, inverse_scales
from .config import QuantConfig
from .formats import BlockCodes, format_of

CHUNK = 128  # columns per lazy-batch update: a Python step per column, one matmul per chunk


@dataclass(frozen=True)
class Feedback:
    """GPTQ's error feedback for matrices whose inputs have the damped covariance L Lᵀ: the
    column ``order`` (b, in) (decreasing diagonal) and ``upper`` U (b, in, in), UᵀU the inverse
    covariance with rows and columns in that order."""

    order: torch.Tensor
    upper: torch.Tensor

    def to(self, device: torch.device | str) -> Feedback:
        return Feedback(self.order.to(device), self.upper.to(device=device, dtype=torch.float32))

    def expand(self, batch: int) -> Feedback:
        """The same feedback for a batch of ``batch`` matrices (one shared, or one each)."""
        cols = self.upper.shape[-1]
        return Feedback(self.order.expand(batch, cols), self.upper.expand(batch, cols, cols))


def feedback_factor(factor: torch.Tensor) -> Feedback:
    """The `Feedback` (U float32) for the lower Cholesky factor ``factor`` L ((in, in) or
    (b, in, in)) of the damped covariance (`bitalloc.lora.whitening_factor`)."""
    factor = factor.to(torch.float64)
    if factor.dim() == 2:
        factor = factor.unsqueeze(0)
    order = torch.argsort(factor.square().sum(-1), dim=-1, descending=True, stable=True)  # diag(L Lᵀ)
    inverse = torch.cholesky_inverse(factor)
    inverse = (inverse + inverse.transpose(-1, -2)) / 2
    rows = order.unsqueeze(-1).expand_as(inverse)
    inverse = inverse.gather(-2, rows).gather(-1, order.unsqueeze(-2).expand_as(inverse))
    upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
    if bool((info != 0).any()):
        # H⁻¹ of a badly conditioned H: shift by a sliver of its mean diagonal and try again
        eye = torch.eye(inverse.shape[-1], dtype=inverse.dtype, device=inverse.device)
        mean = inverse.diagonal(dim1=-2, dim2=-1).mean(-1)[..., None, None]
        for exponent in range(10, 3, -1):
            upper, info = torch.linalg.cholesky_ex(inverse + 10.0**-exponent * mean * eye, upper=True)
            if not bool((info != 0).any()):
                break
        else:
            raise BitallocError("the input covariance is too ill-conditioned for GPTQ rounding")
    return Feedback(order, upper.to(torch.float32))


def gptq_quantize(
    weight: torch.Tensor,
    config: QuantConfig | str,
    feedback: Feedback,
    column_weights: torch.Tensor | None = None,
) -> tuple[BlockCodes, torch.Tensor]:
    """Quantize (..., out, in) with GPTQ's error feedback (`feedback_factor`, one for the batch or
    one per matrix); returns (the stored parts, Q as float32 (..., out, in)).

    The block scales (and zeros) come from ``weight`` as `blockwise.quantize` computes them
    (``column_weights`` weigh the ``-mse`` search); only the codes differ from nearest rounding."""
    config = QuantConfig.parse(config)
    family = format_of(config)
    flat = weight.dim() == 2
    weight = (weight.unsqueeze(0) if flat else weight).to(torch.float32)
    batch, rows, cols = weight.shape
    if tuple(feedback.upper.shape[-2:]) != (cols, cols) or feedback.order.shape[-1] != cols:
        raise BitallocError(
            f"the feedback factor must be ({cols}, {cols}), got {tuple(feedback.upper.shape)}"
        )
    feedback = feedback.to(weight.device).expand(batch)
    order, upper = feedback.order, feedback.upper
    blocks = _blocks(weight, config.block_size)
    weights = element_weights(column_weights, weight, config.block_size) if config.search else None
    parts = family.quantize(blocks, config, weights)  # the stored scales, fixed before rounding

    # columns as rows (contiguous), in the feedback's order: (b, in, out) work, and each column's
    # block scale (its inverse, its zero point) beside it
    index = order.unsqueeze(-2).expand(batch, rows, cols)

    def by_column(per_block: torch.Tensor) -> torch.Tensor:
        per_column = per_block.repeat_interleave(config.block_size, dim=-1)[..., :cols]
        return per_column.gather(-1, index).transpose(-1, -2).contiguous()

    work = weight.gather(-1, index).transpose(-1, -2).contiguous()
    scales = by_column(parts.scales)
    zeros = None if parts.zeros is None else by_column(parts.zeros)
    codes, values = _round_columns(work, upper, (scales, inverse_scales(scales), zeros), config)
    # back to (b, out, in) in the columns' own order
    stored = parts.codes.clone()
    stored[..., :cols] = stored[..., :cols].scatter(-1, index, codes.transpose(-1, -2))
    parts.codes = stored
    values = torch.empty_like(weight).scatter_(-1, index, values.transpose(-1, -2))
    if flat:
        parts = BlockCodes(*(None if t is None else t.squeeze(0) for t in _fields(parts)))
        values = values.squeeze(0)
    return parts, values


def _round_columns(work: torch.Tensor, upper: torch.Tensor, grid: tuple, config: QuantConfig):
    """GPTQ's pass over the columns of ``work`` (b, in, out: one column per row, in the feedback's
    order; overwritten with the scaled errors) against each column's ``grid`` (scale, its inverse,
    zero point or None; (b, in, out) each): the codes and values, (b, in, out)."""
    family = format_of(config)
    scales, inverse, zeros = grid
    cols = work.shape[1]
    codes, values = torch.empty(work.shape, dtype=torch.uint8, device=work.device), torch.empty_like(work)
    diagonal = upper.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (b, in, 1)
    for start in range(0, cols, CHUNK):
        end = min(start + CHUNK, cols)
        for j in range(start, end):
            column = work[:, j]
            zero = None if zeros is None else zeros[:, j]
            codes[:, j], values[:, j] = family.nearest(
                column, scales[:, j], zero, config, inverse=inverse[:, j]
            )
            error = column.sub_(values[:, j]).div_(diagonal[:, j])  # the column is done: it holds its error
            if j + 1 < end:
                work[:, j + 1 : end].sub_(upper[:, j, j + 1 : end].unsqueeze(-1) * error.unsqueeze(-2))
        if end < cols:
            work[:, end:].sub_(upper[:, start:end, end:].transpose(-1, -2) @ work[:, start:end])
    return codes, values


def _fields(parts: BlockCodes) -> tuple:
    return (parts.codes, parts.scales, parts.scale_codes, parts.scales2, parts.stored_scales, parts.zeros)
