"""-gptq rounding: GPTQ's error feedback through the input covariance (bitalloc.quant.rounding).

The codes are checked against a plain transcription of GPTQ (one column at a time, the whole rest
of the row updated, float64), the output error must drop against nearest rounding on correlated
inputs, a diagonal covariance must give nearest rounding's codes, the stored scales must be those
of nearest rounding, and LoftQ's packed Q must be the rounded one.
"""

from __future__ import annotations

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.lora import loftq, whitening_factor
from bitalloc.quant import (
    QuantConfig,
    QuantizedTensor,
    fake_quantize,
    feedback_factor,
    gptq_quantize,
    quantize,
)
from bitalloc.quant.codebooks import codebook, nearest_index

CONFIGS = [
    "nf2-b64-s8b256",
    "nf3-b32-sfp16-mse",
    "int4-b64-sfp32",
    "uint2-b64-sfp16-z2-mse",
    "uint3-b32-sbf16-zbf16",
]


def correlated_covariance(cols: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=g) * 0.15 + torch.eye(cols)
    x = torch.randn(4 * cols, cols, generator=g) @ mixing
    return x.T @ x / x.shape[0]


def output_error(weight: torch.Tensor, q: torch.Tensor, factor: torch.Tensor) -> float:
    return float((((weight - q).double() @ factor.double()) ** 2).sum())


def reference_gptq(weight: torch.Tensor, config: str, h: torch.Tensor) -> torch.Tensor:
    """GPTQ as its paper writes it, for symmetric codebooks: float64, columns in decreasing order
    of diag(H), one at a time, every later column updated at once, U from H⁻¹ in that order; the
    scales are the stored ones of nearest rounding ("static groups")."""
    config = QuantConfig.parse(config)
    scales = quantize(weight, config).scales.double()
    levels = codebook(config.method, config.bits).double()
    damped = h.double() + 0.01 * h.double().diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    order = torch.argsort(damped.diagonal(), descending=True, stable=True)
    u = torch.linalg.cholesky(torch.linalg.inv(damped)[order][:, order], upper=True)
    work, out = weight.double()[:, order].clone(), torch.empty(weight.shape, dtype=torch.float64)
    for j in range(weight.shape[1]):
        scale = scales[:, int(order[j]) // config.block_size]
        x = torch.where(scale > 0, work[:, j] / scale, 0.0).clamp(-1, 1)
        q = levels[nearest_index(x.float(), levels.float()).long()] * scale
        out[:, int(order[j])] = q
        work[:, j + 1 :] -= ((work[:, j] - q) / u[j, j])[:, None] * u[j, j + 1 :][None, :]
    return out.float()


@pytest.mark.parametrize("config", CONFIGS)
def test_feedback_lowers_the_output_error_and_keeps_the_stored_scales(config):
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(96, 160, generator=g) * 0.05
    h = correlated_covariance(160)
    factor = whitening_factor(h).float()
    parts, q = gptq_quantize(weight, config, feedback_factor(factor))
    nearest = quantize(weight, config)
    # the format is unchanged: the same stored scales (and zeros), only codes differ
    assert torch.equal(parts.scales, nearest.scales)
    for got, want in ((parts.zeros, nearest.zeros), (parts.scale_codes, nearest.scale_codes)):
        assert (got is None) == (want is None) and (got is None or torch.equal(got, want))
    changed = float((parts.codes != nearest.codes).float().mean())
    assert 0.05 < changed < 0.6  # measured 0.22-0.30: feedback moves codes, not all of them
    before = output_error(weight, fake_quantize(weight, config), factor)
    after = output_error(weight, q, factor)
    assert after < 0.8 * before  # measured 0.46-0.63 on these inputs
    # the packed matrix stands for Q exactly
    packed = QuantizedTensor.from_block_codes(parts, QuantConfig.parse(config), tuple(weight.shape))
    assert torch.equal(packed.dequantize(), q)
    assert torch.equal(QuantizedTensor.from_weight(weight, config, rounded=q).dequantize(), q)


@pytest.mark.parametrize("config", ["nf2-b64-s8b256", "int3-b32-sfp16"])
def test_codes_equal_a_plain_transcription_of_gptq(config):
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(48, 300, generator=g)  # 300 columns: three lazy-batch chunks, a partial block
    spread = torch.rand(300, generator=g) * 3 + 0.1
    h = correlated_covariance(300, seed=3) * spread[:, None] * spread[None, :]  # an uneven diagonal
    feedback = feedback_factor(whitening_factor(h))
    assert not torch.equal(feedback.order, torch.arange(300))
    _, q = gptq_quantize(weight, config, feedback)
    want = reference_gptq(weight, config, h)
    # float32 against float64 updates: a value within rounding of a midpoint may round the other
    # way and carry on; measured 0 of 14,400 codes differ
    assert float((q != want).float().mean()) < 0.002
    factor = whitening_factor(h)
    assert output_error(weight, q, factor) == pytest.approx(output_error(weight, want, factor), rel=1e-3)


def test_batched_rows_equal_one_matrix_at_a_time():
    g = torch.Generator().manual_seed(4)
    weights = torch.randn(3, 40, 128, generator=g)
    factors = torch.stack([whitening_factor(correlated_covariance(128, seed=s)) for s in range(3)])
    parts, q = gptq_quantize(weights, "nf3-b64-s8b256", feedback_factor(factors))
    for i in range(3):
        one_parts, one_q = gptq_quantize(weights[i], "nf3-b64-s8b256", feedback_factor(factors[i]))
        assert torch.allclose(q[i], one_q, atol=1e-6)
        assert float((parts.codes[i] != one_parts.codes).float().mean()) < 0.002


@pytest.mark.parametrize("config", ["nf2-b64-s8b256", "uint3-b32-sfp16-z3-mse"])
def test_a_diagonal_covariance_is_nearest_rounding(config):
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(32, 128, generator=g)
    h = torch.diag(torch.rand(128, generator=g) + 0.1)
    parts, q = gptq_quantize(weight, config, feedback_factor(whitening_factor(h, 0.0)))
    assert torch.equal(parts.codes, quantize(weight, config).codes)
    assert torch.equal(q, fake_quantize(weight, config))


def test_loftq_packs_the_rounded_q_and_its_error_drops():
    g = torch.Generator().manual_seed(6)
    weight = torch.randn(128, 192, generator=g) * 0.02
    h = correlated_covariance(192, seed=7)
    factor = whitening_factor(h).float()
    errors = {}
    for config in ("nf2-b64-s8b256-mse", "nf2-b64-s8b256-mse-gptq"):
        result = loftq(weight, config, rank=8, iters=2, input_covariance=h)
        rebuilt = result.q.dequantize() + result.lowrank()
        # the packed codes are the ones the error was measured on
        assert output_error(weight, rebuilt, factor) == pytest.approx(result.weighted_error, rel=1e-4)
        errors[config] = result.weighted_error
    assert errors["nf2-b64-s8b256-mse-gptq"] < 0.85 * errors["nf2-b64-s8b256-mse"]  # measured 0.71


def test_without_a_full_covariance_gptq_is_nearest_rounding():
    g = torch.Generator().manual_seed(8)
    weight = torch.randn(64, 128, generator=g)
    h = torch.rand(128, generator=g) + 0.5
    for options in ({}, {"column_weights": h}):
        plain = loftq(weight, "nf3-b64-s8b256", 4, 2, seed=1, **options)
        rounded = loftq(weight, "nf3-b64-s8b256-gptq", 4, 2, seed=1, **options)
        assert rounded.errors == plain.errors
        assert torch.equal(rounded.q.codes, plain.q.codes)


def test_config_grammar():
    config = QuantConfig.parse("nf2-b64-s8b256-mse-gptq")
    assert config.gptq and config.search and str(config) == "nf2-b64-s8b256-mse-gptq"
    assert str(QuantConfig.parse("uint4-b128-sfp16-z4-gptq")) == "uint4-b128-sfp16-z4-gptq"
    scale = {"bits": 8, "block_size": 256, "second_level": "fp32", "search": "mse", "rounding": "gptq"}
    assert config.to_dict()["scale"] == scale
    # the storage is the nearest-rounding twin's, bit for bit
    assert config.storage_bits((576, 1536)) == QuantConfig.parse("nf2-b64-s8b256").storage_bits((576, 1536))
    with pytest.raises(BitallocError, match="unknown config string"):
        QuantConfig.parse("nf2-b64-s8b256-gptq-mse")  # the order is -mse, then -gptq
    with pytest.raises(BitallocError, match="-gptq"):
        QuantConfig(method="ggml", bits=4, block_size=32, scale_dtype="0", gptq=True)
    with pytest.raises(BitallocError, match="gptq must be True or False"):
        QuantConfig(gptq="yes")


def test_a_wrong_feedback_shape_is_one_clear_error():
    with pytest.raises(BitallocError, match=r"feedback factor must be \(64, 64\)"):
        gptq_quantize(torch.randn(8, 64), "nf4-b64-sfp32", feedback_factor(torch.eye(32)))


def test_profile_plan_and_apply_store_the_rounded_codes(tmp_path):
    """Through the pipeline: the profile measures -gptq configs with the calibration H, and apply's
    packed codes are GPTQ's (not nearest rounding's) for every planned matrix."""
    from _models import make_tiny_llama
    from safetensors.torch import load_file

    from bitalloc.artifacts.writer import apply
    from bitalloc.checkpoints import open_source
    from bitalloc.lora import module_seed
    from bitalloc.planning.planner import plan
    from bitalloc.profiling.calibration import calibrate, weighting
    from bitalloc.profiling.profiler import profile

    directory = tmp_path / "tiny"
    directory.mkdir()
    make_tiny_llama(directory, seed=1)
    ids = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    configs = ["nf2-b64-s8b256-gptq", "nf3-b64-s8b256-mse-gptq"]
    table = profile(directory, tmp_path / "profile.parquet", configs=configs, rank=4, iters=2, quiet=True,
                    calibration_ids=ids)  # fmt: skip
    chosen = plan(table, 2.8)
    apply(directory, chosen.save(tmp_path / "plan.json"), tmp_path / "out", quiet=True, calibration_ids=ids)
    stored = load_file(tmp_path / "out/quantized/bitalloc-model.safetensors")
    names = list(chosen.assignments)
    covariances = calibrate(directory, names, input_ids=ids, covariance=True).covariances
    source = open_source(directory)
    moved = 0
    for name, config in chosen.assignments.items():
        expected = loftq(source.read(name), config, 4, 2, seed=module_seed(name, config),
                         weighting=weighting(covariances, name))  # fmt: skip
        row = table[(table.module == name) & (table.config == config)].iloc[0]
        assert expected.weighted_error == pytest.approx(row["weighted_error"], rel=1e-6)
        # nearest rounding of the same input to the quantizer, with the same scales
        nearest = QuantizedTensor.from_weight(
            expected.q_input, config.replace("-gptq", ""), expected.search_weights
        )
        assert torch.equal(stored[f"{name}.weight.codes"], expected.q.codes)
        assert torch.equal(nearest.scales, expected.q.scales)
        moved += int(not torch.equal(expected.q.codes, nearest.codes))
    assert moved == len(names)  # every matrix's codes differ from nearest rounding's


def test_profile_refuses_gptq_without_the_input_covariance(tmp_path):
    from _models import make_tiny_llama

    from bitalloc.profiling.profiler import profile

    make_tiny_llama(tmp_path / "tiny", seed=1)
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    for options in ({}, {"objective": "activation", "calibration_ids": ids}):
        with pytest.raises(BitallocError, match="-gptq rounding feeds errors back through"):
            profile(
                tmp_path / "tiny",
                tmp_path / "p.parquet",
                configs=["nf3-b64-s8b256-gptq"],
                quiet=True,
                **options,
            )
    assert not (tmp_path / "p.parquet").exists()
