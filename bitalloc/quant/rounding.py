"""Rounding with error feedback (GPTQ, arXiv 2210.17323): codes chosen for the layer's output.

Nearest rounding minimizes each weight's own error. With the layer's input second moment
H = XᵀX/n known, the output error ‖(W − Q) X‖²/n = tr((W − Q) H (W − Q)ᵀ) is lower when each
column's rounding error is compensated by the columns not yet rounded. GPTQ does it in one pass:
with U upper triangular, UᵀU = H⁻¹ (H damped: H + λI), column j is rounded to its nearest stored
value q_j and the rest of the row moves by −(w_j − q_j)/U_jj · U_j,(j+1:). Columns are taken in
order, in chunks whose updates are applied as one matrix product ("lazy batch" updates).

The stored format does not change: every block's scale (and zero point) is computed first from
the whole input matrix as the config says (absmax, range, or the ``-mse`` search), then codes are
chosen against those stored scales, so a code stands for exactly what nearest rounding's would.
With a diagonal H (or none) the feedback vanishes and the codes are nearest rounding's.
"""

from __future__ import annotations

import torch

from ..errors import BitallocError
from .blockwise import _blocks, element_weights, inverse_scales
from .config import QuantConfig
from .formats import BlockCodes, format_of

CHUNK = 128  # columns per lazy-batch update: a Python step per column, one matmul per chunk


def feedback_factor(factor: torch.Tensor) -> torch.Tensor:
    """U (float64, upper triangular, same batch shape) with UᵀU = (L Lᵀ)⁻¹ for the lower
    Cholesky factor ``factor`` L of the damped covariance (`bitalloc.lora.whitening_factor`)."""
    inverse = torch.cholesky_inverse(factor.to(torch.float64))
    inverse = (inverse + inverse.transpose(-1, -2)) / 2
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
    return upper


def gptq_quantize(
    weight: torch.Tensor,
    config: QuantConfig | str,
    upper: torch.Tensor,
    column_weights: torch.Tensor | None = None,
) -> tuple[BlockCodes, torch.Tensor]:
    """Quantize (..., out, in) with error feedback through ``upper`` U ((..., in, in) or (in, in),
    UᵀU = H⁻¹, `feedback_factor`); returns (the stored parts, Q as float32 (..., out, in)).

    The block scales (and zeros) come from ``weight`` as `blockwise.quantize` computes them
    (``column_weights`` weigh the ``-mse`` search); only the codes differ from nearest rounding."""
    config = QuantConfig.parse(config)
    family = format_of(config)
    flat = weight.dim() == 2
    work = (weight.unsqueeze(0) if flat else weight).to(torch.float32).clone()
    upper = upper.to(device=work.device, dtype=torch.float32)
    if upper.dim() == 2:
        upper = upper.unsqueeze(0)
    cols, size = work.shape[-1], config.block_size
    if tuple(upper.shape[-2:]) != (cols, cols):
        raise BitallocError(f"the feedback factor must be ({cols}, {cols}), got {tuple(upper.shape)}")
    blocks = _blocks(work, size)
    weights = element_weights(column_weights, work, size) if config.search else None
    parts = family.quantize(blocks, config, weights)  # the stored scales, fixed before rounding
    # columns as rows (contiguous): (b, in, out) work, codes and values; (b, blocks, out) scales
    work = work.transpose(-1, -2).contiguous()
    codes = parts.codes.transpose(-1, -2).contiguous()
    values = torch.empty_like(work)
    scales = parts.scales.transpose(-1, -2).contiguous()
    inverse = inverse_scales(scales)
    zeros = None if parts.zeros is None else parts.zeros.transpose(-1, -2).contiguous()
    diagonal = upper.diagonal(dim1=-2, dim2=-1).unsqueeze(-1)  # (b, in, 1)
    for start in range(0, cols, CHUNK):
        end = min(start + CHUNK, cols)
        for j in range(start, end):
            k = j // size
            column = work[:, j]
            zero = None if zeros is None else zeros[:, k]
            code, value = family.nearest(column, scales[:, k], zero, config, inverse=inverse[:, k])
            codes[:, j], values[:, j] = code, value
            error = column.sub_(value).div_(diagonal[:, j])  # the column is done: its row holds the error
            if j + 1 < end:
                work[:, j + 1 : end].sub_(upper[:, j, j + 1 : end].unsqueeze(-1) * error.unsqueeze(-2))
        if end < cols:
            work[:, end:].sub_(upper[:, start:end, end:].transpose(-1, -2) @ work[:, start:end])
    codes = codes.transpose(-1, -2).contiguous()
    values = values.transpose(-1, -2).contiguous()
    parts.codes = codes
    if flat:
        parts = BlockCodes(*(None if t is None else t.squeeze(0) for t in _fields(parts)))
        values = values.squeeze(0)
    return parts, values


def _fields(parts: BlockCodes) -> tuple:
    return (parts.codes, parts.scales, parts.scale_codes, parts.scales2, parts.stored_scales, parts.zeros)
