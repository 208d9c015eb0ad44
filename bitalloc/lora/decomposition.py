"""LoftQ: W ~ Q + B A with Q quantized and B A of rank r (arXiv 2310.08659).

Start with A = B = 0 and repeat T times: Q = quant(W - B A); B A = best rank-r
approximation of W - Q. The error can rise with T on some matrices, so the best
iterate is kept. The error weighed is a `bitalloc.lora.weighting` value. With `Diagonal`
h (per input channel, e.g. activation second moments) the low-rank step minimizes
||(W - Q - B A) diag(sqrt h)||_F instead, as LQ-LoRA does with Fisher weights.

With `Whitened` H = XᵀX/n (the full second moment of the layer's inputs) it
minimizes the layer's output error ||(W - Q - B A) X||²/n = ||(W - Q - B A) L||²_F, where
L Lᵀ = H + λI (Cholesky, λ = ``damping`` · mean(diag H)). The best rank-r correction is
[(W - Q) L]_r L⁻¹: B = U_r Σ_r^½ and A = Σ_r^½ V_rᵀ L⁻¹ by a triangular solve (L⁻¹ is
never formed). It is the optimum QERA (arXiv 2410.06040) reaches with a matrix square
root and EoRA (arXiv 2410.21271) with an eigendecomposition; Cholesky is the cheapest.
A diagonal H gives the `Diagonal` path, H = I (λ = 0) plain LoftQ.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import time
from dataclasses import dataclass, field

import torch

from ..devices import one_cpu_thread, resolve_device
from ..errors import BitallocError
from ..quant import QuantConfig, QuantizedTensor, fake_quantize
from ..quant.blockwise import check_matrix
from ..quant.rounding import gptq_quantize
from .lowrank import LOWRANK_METHODS, exact_lowrank, randomized_lowrank
from .weighting import (  # noqa: F401  (DEFAULT_DAMPING and whitening_factor: re-exported)
    DEFAULT_DAMPING,
    IDENTITY,
    Weighting,
    check_tensor,
    weighting_from,
    whitening_factor,
)


@dataclass
class LoftQResult:
    """One matrix's decomposition: ``scaling * lora_B @ lora_A`` is the low-rank part."""

    config: QuantConfig
    rank: int
    lora_A: torch.Tensor  # (r, in)
    lora_B: torch.Tensor  # (out, r)
    errors: list[float]  # relative error after each iteration; errors[0] is plain quantization
    best_iter: int  # index into errors of the kept iterate
    error: float  # ||W - Q - scaling B A||_F^2 of the kept iterate
    qlora_error: float  # ||W - quant(W)||_F^2 (A = B = 0)
    weight_norm_sq: float  # ||W||_F^2
    scaling: float = 1.0
    weighted_error: float | None = None  # ||(W - Q - B A) diag(sqrt h)||_F^2 (or ·L with H) when given
    weighted_errors: list[float] | None = None
    q_input: torch.Tensor | None = field(default=None, repr=False)  # W - (previous B A)
    # per-column weights of the -mse scale search (h, or diag of H + λI), to rebuild the same Q
    search_weights: torch.Tensor | None = field(default=None, repr=False)
    q_values: torch.Tensor | None = field(default=None, repr=False)  # Q of -gptq rounding (its codes)
    _q: QuantizedTensor | None = field(default=None, repr=False)

    @property
    def rel_error(self) -> float:
        """||W - Q - B A||_F / ||W||_F of the kept iterate."""
        return self.errors[self.best_iter]

    @property
    def q(self) -> QuantizedTensor:
        """The packed quantized matrix Q of the kept iterate."""
        if self._q is None:
            if self.q_input is None:
                raise ValueError("this result was computed without keeping Q (keep_q=False)")
            self._q = QuantizedTensor.from_weight(
                self.q_input, self.config, self.search_weights, self.q_values
            )
            self.q_input = self.q_values = None
        return self._q

    def lowrank(self) -> torch.Tensor:
        """scaling * B @ A, float32 (out, in)."""
        return self.scaling * (self.lora_B.float() @ self.lora_A.float())


def check_rank(rank: object, shape: tuple[int, int] | None = None) -> None:
    """BitallocError unless ``rank`` is a whole number, 0 <= rank <= min(shape)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise BitallocError(f"rank must be a whole number >= 0 (0: no LoRA correction), got {rank!r}")
    if shape is not None and rank > min(shape):
        raise BitallocError(f"rank {rank} exceeds the matrix size {shape[0]}x{shape[1]}")


# LoftQ's error stops falling after a few iterations (the paper uses up to 5) and drifts to
# NaN after ~1,300 in float32: the API, the profile settings and the plan schema all stop here.
MAX_ITERS = 100


def check_iters(iters: object) -> None:
    """BitallocError unless ``iters`` is a whole number, 0 <= iters <= MAX_ITERS."""
    if isinstance(iters, bool) or not isinstance(iters, int) or not 0 <= iters <= MAX_ITERS:
        raise BitallocError(f"iters must be a whole number from 0 to {MAX_ITERS}, got {iters!r}")


def check_lora_alpha(lora_alpha: object) -> None:
    """BitallocError unless ``lora_alpha`` is None or a finite positive number."""
    if lora_alpha is None:
        return
    if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, (int, float)):
        raise BitallocError(f"lora_alpha must be a positive number, got {lora_alpha!r}")
    if not math.isfinite(lora_alpha) or lora_alpha <= 0:
        raise BitallocError(f"lora_alpha must be a finite positive number, got {lora_alpha!r}")


def lora_scaling(rank: int, lora_alpha: float | None, use_rslora: bool = False) -> float:
    """PEFT's scaling: alpha / r (alpha / sqrt(r) with rsLoRA); 1 when alpha is None or r = 0."""
    if lora_alpha is None or rank == 0:
        return 1.0
    return float(lora_alpha) / (math.sqrt(rank) if use_rslora else rank)


# The adapter stores the correction as B/√s and A/√s (s: the scaling), so that PEFT's
# s·B·A is the correction: a scaling far from 1 overflows or flushes the factors to zero
# (float32 and the 16-bit dtypes they are trained in). Within these bounds they move by at
# most a factor 1000.
MIN_SCALING, MAX_SCALING = 1e-6, 1e6


def check_lora_scaling(rank: int, lora_alpha: float | None, use_rslora: bool = False) -> None:
    """BitallocError unless the scaling of ``lora_alpha`` at ``rank`` is in [MIN_SCALING,
    MAX_SCALING] (see above): extreme finite alphas would write inf or all-zero factors."""
    check_lora_alpha(lora_alpha)
    scaling = lora_scaling(rank, lora_alpha, use_rslora)
    if not MIN_SCALING <= scaling <= MAX_SCALING:
        kind = "alpha/sqrt(r)" if use_rslora else "alpha/r"
        raise BitallocError(
            f"lora_alpha {lora_alpha!r} at rank {rank} gives a LoRA scaling {kind} = {scaling:.3g}, outside "
            f"[{MIN_SCALING:g}, {MAX_SCALING:g}]: the stored factors would overflow or vanish; use an alpha "
            "nearer the rank"
        )


class _Clock:
    """Adds the seconds spent in a named step to ``timings`` (no-op when it is None)."""

    def __init__(self, timings: dict[str, float] | None, device: torch.device):
        self.timings, self.cuda = timings, device.type == "cuda"

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.timings is None:
            yield
            return
        if self.cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        yield
        if self.cuda:
            torch.cuda.synchronize()
        self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


# Below this many elements per batch, intra-op threads cost more than they give (docs/benchmarks.md).
SINGLE_THREAD_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class LoraSettings:
    """How the LoRA factors are scaled: ``lora_alpha`` (None: scaling 1, i.e. alpha = r) and
    rsLoRA (alpha / sqrt(r) instead of alpha / r). ``scaling · B · A`` is always LoftQ's
    low-rank part, whatever the scaling."""

    lora_alpha: float | None = None
    use_rslora: bool = False


@dataclass(frozen=True)
class Factorization:
    """The rank-r step: "randomized" (warm-started range finder with ``oversample`` extra
    probes and ``power_iters`` subspace iterations) or "exact" (full SVD)."""

    method: str = "randomized"
    oversample: int = 16
    power_iters: int = 4


# keyword options of loftq_batch -> the value they belong to
_OPTIONS = {
    "lora_alpha": "lora",
    "use_rslora": "lora",
    "lowrank": "factorization",
    "oversample": "factorization",
    "power_iters": "factorization",
    "column_weights": "weighting",
    "input_covariance": "weighting",
    "damping": "weighting",
    "whitening": "weighting",
}


# shape: the public function's documented keywords (each a value or a field of one)
def loftq_batch(
    weights: torch.Tensor,
    config: QuantConfig | str,
    rank: int = 16,
    iters: int = 5,
    *,
    lora: LoraSettings | None = None,
    factorization: Factorization | None = None,
    seeds: list[int] | None = None,
    weighting: Weighting | None = None,
    keep_q: bool = True,
    device: str | torch.device | None = None,
    timings: dict[str, float] | None = None,
    **options,
) -> list[LoftQResult]:
    """LoftQ for a batch of same-shaped matrices (b, out, in), computed in float32.

    ``lora`` sets the factors' scaling, ``factorization`` the rank-r step and ``weighting``
    (`bitalloc.lora.weighting`: `Diagonal` h, `Whitened` H or its factor; default plain
    LoftQ) the error minimized. The keyword ``options`` override single fields:
    ``lora_alpha``, ``use_rslora``, ``lowrank`` (the method), ``oversample``,
    ``power_iters``, and the statistics spelled as tensors: ``column_weights`` (b, in) or
    (in,) (diagonal), ``input_covariance`` (b, in, in) or (in, in) with ``damping`` λ (a
    fraction of mean(diag H); see the module docstring) or ``whitening`` (its factor L,
    computed once for several configs), one of them and not with ``weighting``. ``seeds``
    (one per matrix) seed the randomized factorization. ``timings``, if given, accumulates
    seconds spent in ``quantize`` and ``factorize``.
    """
    lora, factorization, weighting = _values(lora, factorization, weighting, options)
    config = QuantConfig.parse(config)
    check_matrix(weights)
    weights = weights.detach()  # results never carry the caller's autograd graph
    if weights.dim() == 2:
        weights = weights.unsqueeze(0)
    if weights.dim() != 3:
        raise BitallocError(f"expected (batch, out, in) matrices, got shape {tuple(weights.shape)}")
    if factorization.method not in LOWRANK_METHODS:
        raise BitallocError(
            f"unknown low-rank method {factorization.method!r}: expected one of {LOWRANK_METHODS}"
        )
    batch, rows, cols = weights.shape
    check_rank(rank, (rows, cols))
    check_iters(iters)
    check_lora_scaling(rank, lora.lora_alpha, lora.use_rslora)
    if rank == 0:
        iters = 0  # no low-rank correction: plain quantization
    seeds = _checked_seeds(seeds, batch)
    device = resolve_device(device, fallback=weights.device)
    if device.type == "meta":
        raise BitallocError("device meta has no values to compute with: use cpu or cuda")
    bound = weighting.checked(batch, cols).bound(batch, cols, device)  # factored with every thread
    run = _Run(config, rank, iters, lora, factorization, seeds, keep_q, timings)
    with torch.no_grad(), one_cpu_thread(device, when=weights.numel() < SINGLE_THREAD_ELEMENTS):
        return _loftq_batch(weights.to(device=device, dtype=torch.float32), run, bound)


def _values(lora, factorization, weighting, options: dict) -> tuple[LoraSettings, Factorization, Weighting]:
    """``loftq_batch``'s settings values with the keyword ``options`` folded in."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"loftq_batch() got an unexpected keyword argument {unknown[0]!r}")
    picked = {kind: {} for kind in set(_OPTIONS.values())}
    for key, value in options.items():
        picked[_OPTIONS[key]][key] = value
    lora = dataclasses.replace(lora or LoraSettings(), **picked["lora"])
    factor = {("method" if k == "lowrank" else k): v for k, v in picked["factorization"].items()}
    factorization = dataclasses.replace(factorization or Factorization(), **factor)
    spelled = {k: v for k, v in picked["weighting"].items() if k != "damping"}
    if weighting is not None and any(v is not None for v in spelled.values()):
        raise BitallocError(f"give weighting or {', '.join(sorted(spelled))}, not both")
    if weighting is None:
        weighting = weighting_from(**picked["weighting"])
    elif not isinstance(weighting, Weighting):
        kind = type(weighting).__name__
        raise BitallocError(f"weighting must be a bitalloc.lora.weighting value, got {kind}")
    return lora, factorization, weighting


def _checked_seeds(seeds, batch: int) -> list[int]:
    seeds = [0] * batch if seeds is None else seeds
    if isinstance(seeds, (str, bytes)) or not hasattr(seeds, "__len__"):
        raise BitallocError(f"seeds must be a list of whole numbers, got {type(seeds).__name__}")
    seeds = list(seeds)
    if len(seeds) != batch:
        raise BitallocError(f"got {len(seeds)} seeds for {batch} matrices")
    if any(isinstance(s, bool) or not isinstance(s, numbers.Integral) for s in seeds):
        raise BitallocError(f"seeds must be whole numbers, got {seeds[:3]!r}")
    return seeds


@dataclass(frozen=True)
class _Run:
    """One `loftq_batch` call's checked settings."""

    config: QuantConfig
    rank: int
    iters: int
    lora: LoraSettings
    factorization: Factorization
    seeds: list[int]
    keep_q: bool
    timings: dict[str, float] | None


def _sq_norm(x: torch.Tensor) -> torch.Tensor:
    """‖x‖²_F per matrix: fp32 pairwise reduction (accurate to ~1e-6 relative), squared in
    fp64; values whose squares overflow fp32 (|w| > ~1e19) are summed in fp64 instead."""
    norm = torch.linalg.vector_norm(x, dim=(-2, -1))
    if not bool(torch.isfinite(norm).all()):
        norm = torch.linalg.vector_norm(x.double(), dim=(-2, -1))
    return norm.double() ** 2


def _factorize(run: _Run, target: torch.Tensor, step: int, warm):
    """The rank-r step of iteration ``step`` (warm-started from the previous subspace: later
    iterations need fewer passes)."""
    if run.factorization.method == "exact":
        return exact_lowrank(target, run.rank)
    power_iters = run.factorization.power_iters
    return randomized_lowrank(
        target,
        run.rank,
        oversample=run.factorization.oversample,
        power_iters=power_iters if warm is None else max(1, power_iters // 2),
        warm_start=warm,
        seeds=[x + step for x in run.seeds],
    )


# shape: the LoftQ iteration with its best-iterate bookkeeping reads best as one piece
def _loftq_batch(weight: torch.Tensor, run: _Run, bound) -> list[LoftQResult]:
    config, rank, iters, keep_q = run.config, run.rank, run.iters, run.keep_q
    batch, rows, cols = weight.shape
    device = weight.device
    weighted = bound is not None
    # the -mse scale search weighs each block's error per input column: h, or diag(L Lᵀ) = diag(H + λI)
    search_weights = bound.search_weights() if config.search and weighted else None
    # -gptq rounding needs the full covariance; with h or none its feedback vanishes: nearest rounding
    feedback = bound.feedback() if config.gptq and weighted and bound.full else None

    def quantize(x: torch.Tensor) -> torch.Tensor:
        if feedback is not None:
            return gptq_quantize(x, config, feedback, search_weights)[1]
        return fake_quantize(x, config, search_weights)

    weigh = bound.weigh if weighted else None
    weight_sq = _sq_norm(weight)
    weighted_weight_sq = _sq_norm(weigh(weight)) if weighted else weight_sq
    # iterate 0: plain quantization, A = B = 0
    clock = _Clock(run.timings, device)
    q_input = weight
    keep_values = keep_q and feedback is not None  # -gptq codes are rebuilt from Q, not from q_input
    with clock("quantize"):
        q_values = quantize(weight)
    residual = weight - q_values
    q_values = q_values if keep_values else None  # not held through the loop when not needed
    err_sq = [_sq_norm(residual)]
    # the weighted residual: the error's matrix and the next low-rank step's target (with a
    # full L the one big matmul of an iteration, so it is computed once per residual)
    weighted_residual = weigh(residual) if weighted else residual
    werr_sq = [_sq_norm(weighted_residual)] if weighted else err_sq
    best_score = werr_sq[0].clone()
    best_iter = torch.zeros(batch, dtype=torch.long, device=device)
    best_u = torch.zeros(batch, rows, rank, device=device)
    best_vh = torch.zeros(batch, rank, cols, device=device)
    best_q_input = q_input if keep_q else None
    best_q_values = q_values if keep_values else None
    warm = None
    for step in range(1, iters + 1):
        target = weighted_residual
        with clock("factorize"):
            u, s, vh = _factorize(run, target, step, warm)
        warm = vh.transpose(-1, -2)
        u = u * s.sqrt().unsqueeze(-2)
        vh = vh * s.sqrt().unsqueeze(-1)
        if weighted and bound.full:
            # (R - B A) L = R L - U_r Σ_r V_rᵀ since A L = Σ_r^½ V_rᵀ: no in x in matmul
            werr_sq.append(_sq_norm(target - u @ vh))
        if weighted:
            vh = bound.unweigh(vh)
        low = u @ vh
        err = residual - low
        err_sq.append(_sq_norm(err))
        if weighted and not bound.full:
            werr_sq.append(_sq_norm(weigh(err)))
        improved = werr_sq[-1] < best_score
        if bool(improved.any()):
            mask = improved.view(batch, 1, 1)
            best_score = torch.where(improved, werr_sq[-1], best_score)
            best_iter = torch.where(improved, torch.full_like(best_iter, step), best_iter)
            best_u = torch.where(mask, u, best_u)
            best_vh = torch.where(mask, vh, best_vh)
            if keep_q:
                best_q_input = torch.where(mask, q_input, best_q_input)
            if keep_values:
                best_q_values = torch.where(mask, q_values, best_q_values)
        if step < iters:
            q_input = weight - low
            with clock("quantize"):
                q_values = quantize(q_input)
            residual = weight - q_values
            q_values = q_values if keep_values else None
            weighted_residual = weigh(residual) if weighted else residual
    best = (best_iter, best_u, best_vh, best_q_input, best_q_values, search_weights)
    errors = (err_sq, werr_sq if weighted else None, weight_sq, weighted_weight_sq)
    return _results(run, best, errors)


def _results(run: _Run, best, errors) -> list[LoftQResult]:
    """One `LoftQResult` per matrix from the kept iterates (``best``) and the error tables."""
    best_iter, best_u, best_vh, best_q_input, best_q_values, search_weights = best
    err_sq, werr_sq, weight_sq, weighted_weight_sq = errors
    scaling = lora_scaling(run.rank, run.lora.lora_alpha, run.lora.use_rslora)
    root = math.sqrt(scaling)
    err_table = torch.stack(err_sq, dim=1).cpu()
    werr_table = torch.stack(werr_sq, dim=1).cpu() if werr_sq is not None else None
    norms = weight_sq.cpu()
    wnorms = weighted_weight_sq.cpu()
    results = []
    for i in range(len(best_iter)):
        k = int(best_iter[i])
        results.append(
            LoftQResult(
                config=run.config,
                rank=run.rank,
                lora_A=(best_vh[i] / root).contiguous(),
                lora_B=(best_u[i] / root).contiguous(),
                errors=_relative(err_table[i], norms[i]),
                best_iter=k,
                error=float(err_table[i, k]),
                qlora_error=float(err_table[i, 0]),
                weight_norm_sq=float(norms[i]),
                scaling=scaling,
                weighted_error=None if werr_table is None else float(werr_table[i, k]),
                weighted_errors=None if werr_table is None else _relative(werr_table[i], wnorms[i]),
                q_input=best_q_input[i] if run.keep_q else None,
                search_weights=None if search_weights is None else search_weights[i].clone(),
                q_values=None if best_q_values is None else best_q_values[i],
            )
        )
    return results


def _relative(errors_sq: torch.Tensor, norm_sq: torch.Tensor) -> list[float]:
    """sqrt(error / norm) per iteration; a zero matrix has zero error (not 0/0)."""
    if float(norm_sq) == 0.0:
        return [0.0] * errors_sq.numel()
    return (errors_sq / norm_sq).clamp_min(0).sqrt().tolist()


def loftq(
    weight: torch.Tensor,
    config: QuantConfig | str,
    rank: int = 16,
    iters: int = 5,
    lora_alpha: float | None = None,
    **kwargs,
) -> LoftQResult:
    """LoftQ for one (out, in) matrix; see ``loftq_batch`` for the options.

    ``iters=0`` is plain quantization (QLoRA): A = B = 0.
    """
    check_matrix(weight)
    if weight.dim() != 2:
        raise BitallocError(f"expected a 2-D matrix (out, in), got shape {tuple(weight.shape)}")
    seed = kwargs.pop("seed", None)
    if seed is not None:
        kwargs["seeds"] = [seed]
    column_weights = kwargs.get("column_weights")
    if column_weights is not None and check_tensor(column_weights, "column_weights").dim() != 1:
        raise BitallocError(
            f"column_weights must be one weight per input column, shape ({weight.shape[1]},), "
            f"got shape {tuple(column_weights.shape)}"
        )
    if kwargs.get("input_covariance") is not None:
        check_tensor(kwargs["input_covariance"], "input_covariance")
    if lora_alpha is not None:
        kwargs["lora_alpha"] = lora_alpha
    return loftq_batch(weight.unsqueeze(0), config, rank, iters, **kwargs)[0]
