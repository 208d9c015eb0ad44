"""The whitened (full input covariance) LoftQ step: exact optimum, and its special cases."""

from __future__ import annotations

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.lora import loftq, loftq_batch, whitening_factor
from bitalloc.quant import fake_quantize


def _inputs(n: int, cols: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    scales = torch.rand(cols, generator=generator) * 3 + 0.1
    shared = torch.randn(n, 1, generator=generator)  # correlated channels: H far from diagonal
    return torch.randn(n, cols, generator=generator) * scales + 2 * shared


def _covariance(x: torch.Tensor) -> torch.Tensor:
    return (x.double().T @ x.double() / x.shape[0]).float()


def test_one_step_is_the_weighted_optimum_checked_by_brute_force():
    """iters=1: Q = quant(W) and B·A must minimize ||(W - Q - M)·S||² over rank-r M for
    any S with S Sᵀ = H: the minimum is the tail of the singular values of (W - Q)·S, and
    no random rank-r M nor a perturbation of B, A does better."""
    torch.manual_seed(1)
    weight, x = torch.randn(12, 10, dtype=torch.float64).float(), _inputs(400, 10)
    h = _covariance(x)
    rank = 3
    result = loftq(weight, "nf2-b10-sfp32", rank, 1, lowrank="exact", input_covariance=h, damping=0.0)
    residual = (weight - fake_quantize(weight, "nf2-b10-sfp32")).double()
    evals, evecs = torch.linalg.eigh(h.double())
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T  # symmetric square root: another S
    sigma = torch.linalg.svdvals(residual @ root)
    optimum = float((sigma[rank:] ** 2).sum())

    def output_error(m: torch.Tensor) -> float:
        return float((((residual - m) @ root) ** 2).sum())

    b, a = result.lora_B.double(), result.lora_A.double()
    found = output_error(b @ a)
    assert found == pytest.approx(optimum, rel=1e-5)
    assert result.weighted_error == pytest.approx(found, rel=1e-4)
    # the measured output error on the inputs themselves
    actual = float((((residual - b @ a) @ x.double().T) ** 2).sum() / x.shape[0])
    assert actual == pytest.approx(found, rel=1e-4)
    generator = torch.Generator().manual_seed(2)
    for _ in range(200):
        m = torch.randn(12, rank, generator=generator, dtype=torch.float64) @ torch.randn(
            rank, 10, generator=generator, dtype=torch.float64
        )
        assert output_error(m) > optimum
        db = 1e-3 * torch.randn(b.shape, generator=generator, dtype=torch.float64)
        da = 1e-3 * torch.randn(a.shape, generator=generator, dtype=torch.float64)
        assert output_error((b + db) @ (a + da)) >= found * (1 - 1e-9)
    # the plain (unweighted) optimum is worse in the output norm
    plain = loftq(weight, "nf2-b10-sfp32", rank, 1, lowrank="exact")
    assert output_error(plain.lowrank().double()) > found * 1.05


@pytest.mark.parametrize("lowrank", ["exact", "randomized"])
def test_diagonal_covariance_equals_the_diagonal_path(lowrank):
    torch.manual_seed(3)
    weight = torch.randn(32, 64)
    h = torch.rand(64) * 5 + 0.05
    diagonal = loftq(weight, "nf3-b32-s8b256", 4, 3, lowrank=lowrank, column_weights=h, seed=7)
    dense = loftq(
        weight, "nf3-b32-s8b256", 4, 3, lowrank=lowrank, input_covariance=torch.diag(h), damping=0.0, seed=7
    )
    assert dense.best_iter == diagonal.best_iter
    assert dense.weighted_error == pytest.approx(diagonal.weighted_error, rel=1e-5)
    assert dense.error == pytest.approx(diagonal.error, rel=1e-5)
    torch.testing.assert_close(dense.lowrank(), diagonal.lowrank(), rtol=1e-4, atol=1e-5)
    assert torch.equal(dense.q.codes, diagonal.q.codes)


@pytest.mark.parametrize("lowrank", ["exact", "randomized"])
def test_identity_covariance_is_plain_loftq(lowrank):
    torch.manual_seed(4)
    weight = torch.randn(32, 64)
    plain = loftq(weight, "nf2-b64-s8b256", 8, 4, lowrank=lowrank, seed=3)
    dense = loftq(
        weight, "nf2-b64-s8b256", 8, 4, lowrank=lowrank, input_covariance=torch.eye(64), damping=0.0, seed=3
    )
    assert dense.errors == pytest.approx(plain.errors, rel=1e-5)
    assert dense.weighted_error == pytest.approx(plain.error, rel=1e-5)
    torch.testing.assert_close(dense.lora_A, plain.lora_A, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dense.lora_B, plain.lora_B, rtol=1e-4, atol=1e-5)


def test_whitening_lowers_the_output_error_on_correlated_inputs():
    torch.manual_seed(5)
    weight, x = torch.randn(64, 96), _inputs(2048, 96, seed=5)
    h = _covariance(x)
    diag = torch.diagonal(h).clone()
    full = loftq(weight, "nf3-b32-s8b256", 8, 3, input_covariance=h, damping=0.0, seed=1)
    diagonal = loftq(weight, "nf3-b32-s8b256", 8, 3, column_weights=diag, seed=1)

    def output_error(result) -> float:
        err = weight - result.q.dequantize() - result.lowrank()
        return float(((err.double() @ x.double().T) ** 2).sum() / x.shape[0])

    assert output_error(full) < 0.8 * output_error(diagonal)
    assert full.weighted_error == pytest.approx(output_error(full), rel=1e-3)


def test_batch_equals_single_with_one_covariance_per_matrix():
    torch.manual_seed(6)
    weights = torch.randn(3, 16, 32)
    hs = torch.stack([_covariance(_inputs(100, 32, seed=s)) for s in range(3)])
    batch = loftq_batch(weights, "nf3-b32-s8b256", 4, 2, input_covariance=hs, seeds=[1, 2, 3])
    for i in range(3):
        single = loftq(weights[i], "nf3-b32-s8b256", 4, 2, input_covariance=hs[i], seed=i + 1)
        assert batch[i].weighted_error == pytest.approx(single.weighted_error, rel=1e-5)


def test_rank_deficient_covariance_is_handled_by_damping_or_the_eigen_shift():
    """Fewer tokens than input channels: H is singular. λ > 0 makes it positive definite;
    with λ = 0 the eigenvalue shift takes over."""
    x = _inputs(8, 32)  # 8 tokens, 32 channels: rank 8
    h = x.double().T @ x.double() / x.shape[0]
    assert int(torch.linalg.matrix_rank(h)) == 8
    for damping in (0.01, 0.0):
        factor = whitening_factor(h, damping)
        assert bool(torch.isfinite(factor).all())
        rebuilt = factor @ factor.T
        assert float((rebuilt - h).abs().max()) <= max(damping, 1e-6) * float(h.diagonal().mean()) * 1.01
    result = loftq(torch.randn(16, 32), "nf3-b32-s8b256", 4, 2, input_covariance=h.float())
    assert result.weighted_error is not None and result.weighted_error >= 0


def test_bad_covariances_are_refused():
    weight = torch.randn(16, 32)
    with pytest.raises(BitallocError, match=r"must be \(32, 32\)"):
        loftq(weight, "nf3-b32-s8b256", 4, 2, input_covariance=torch.ones(32, 31))
    with pytest.raises(BitallocError, match="must be"):
        loftq(weight, "nf3-b32-s8b256", 4, 2, input_covariance=torch.eye(16))
    with pytest.raises(BitallocError, match="NaN"):
        loftq(weight, "nf3-b32-s8b256", 4, 2, input_covariance=torch.full((32, 32), float("nan")))
    with pytest.raises(BitallocError, match="zero"):
        loftq(weight, "nf3-b32-s8b256", 4, 2, input_covariance=torch.zeros(32, 32))
    with pytest.raises(BitallocError, match="not both"):
        loftq(weight, "nf3-b32-s8b256", 4, 2, input_covariance=torch.eye(32), column_weights=torch.ones(32))
    with pytest.raises(BitallocError, match="damping"):
        loftq(weight, "nf3-b32-s8b256", 4, 2, input_covariance=torch.eye(32), damping=-1.0)
