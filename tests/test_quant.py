"""Number formats: codebooks, config strings, storage accounting, quantization, packing."""

import math

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.quant import (
    QuantConfig,
    QuantizedTensor,
    codebook,
    fake_quantize,
    nearest_code,
    pack_bits,
    packed_size,
    quantize,
    storage_bits,
    unpack_bits,
)

QLORA_NF4 = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
]


def test_nf2_codebook():
    assert codebook("nf", 2).tolist() == pytest.approx([-1.0, 0.0, 0.3379, 1.0], abs=1e-4)


def test_nf4_codebook_is_qlora():
    assert codebook("nf", 4).tolist() == pytest.approx(QLORA_NF4, abs=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codebook_shapes(bits):
    nf = codebook("nf", bits)
    assert nf.numel() == 2**bits
    assert nf[0] == -1 and nf[-1] == 1 and (nf == 0).sum() == 1
    assert bool((nf[1:] > nf[:-1]).all())
    assert (nf > 0).sum() == 2 ** (bits - 1)  # one more positive level than negative
    assert codebook("int", bits).tolist() == pytest.approx(torch.linspace(-1, 1, 2**bits).tolist(), abs=1e-7)


def test_nearest_code_matches_dense_argmin():
    values = torch.rand(10000) * 2 - 1
    for method, bits in [("nf", 3), ("int", 4), ("nf", 8)]:
        levels = codebook(method, bits)
        dense = (values[:, None] - levels[None, :]).abs().argmin(dim=1)
        got = nearest_code(values, levels).long()
        # equal except for exact ties, where either neighbour is as near
        diff = (levels[got] - values).abs() - (levels[dense] - values).abs()
        assert diff.abs().max() < 1e-7


@pytest.mark.parametrize(
    "text",
    ["nf4-b64-sfp32", "nf2-b64-s8b256", "int3-b128-s8b64fp16", "nf8-b32-sbf16", "int2-b16-s4b32bf16"],
)
def test_config_round_trip(text):
    config = QuantConfig.parse(text)
    assert str(config) == text
    assert QuantConfig.parse(str(config)) == config


def test_config_fields():
    config = QuantConfig.parse("int3-b128-s8b64fp16")
    assert (config.method, config.bits, config.block_size) == ("int", 3, 128)
    assert (config.scale_bits, config.scale_block_size, config.second_level) == (8, 64, "fp16")
    # an explicit fp32 second level prints in its canonical (suffix-free) form
    assert str(QuantConfig.parse("nf2-b64-s8b256fp32")) == "nf2-b64-s8b256"


@pytest.mark.parametrize(
    "bad",
    ["nf5-b64-sfp32", "q4-b64-sfp32", "nf4", "nf4-b64", "nf4-b64-sfp8", "nf4-b0-sfp32", "", "nf4-b64-s7b0"],
)
def test_config_rejects_with_grammar(bad):
    with pytest.raises(ValueError) as info:
        QuantConfig.parse(bad)
    message = str(info.value)
    assert "nf2-b64-s8b256" in message or "unsupported" in message or "positive" in message


def test_unsupported_bits_message():
    with pytest.raises(ValueError, match="unsupported bits 5"):
        QuantConfig(bits=5)


def test_bits_per_param_nominal():
    assert QuantConfig.parse("nf4-b64-s8b256").bits_per_param == pytest.approx(4.127, abs=5e-4)
    assert QuantConfig.parse("nf4-b64-sfp32").bits_per_param == 4.5
    assert QuantConfig.parse("nf2-b64-s8b256").bits_per_param == pytest.approx(2.127, abs=5e-4)
    assert QuantConfig.parse("nf3-b128-sbf16").bits_per_param == 3.125


def test_storage_bits_hand_computed():
    # 576x576 at B0=128: 5 blocks per row (640 padded columns), 2880 blocks, 12 groups of 256
    assert storage_bits((576, 576), "nf2-b128-s8b256") == 576 * 640 * 2 + 2880 * 8 + 12 * 32
    assert storage_bits((576, 576), "nf4-b64-sfp32") == 576 * 576 * 4 + 576 * 9 * 32
    assert storage_bits((576, 576), "int3-b128-s8b64fp16") == 576 * 640 * 3 + 2880 * 8 + 45 * 16
    # a partial last group: 100 rows x 3 blocks = 300 scales -> 2 groups of 256
    assert storage_bits((100, 192), "nf4-b64-s8b256") == 100 * 192 * 4 + 300 * 8 + 2 * 32
    # divisible shapes reach the nominal bits/param exactly
    config = QuantConfig.parse("nf4-b64-s8b256")
    assert storage_bits((4096, 4096), config) / 4096**2 == pytest.approx(config.bits_per_param)
    with pytest.raises(ValueError):
        storage_bits((4096,), config)


CONFIGS = ["nf4-b64-sfp32", "nf2-b64-s8b256", "int3-b128-s8b64fp16", "nf8-b32-sbf16", "nf3-b64-s4b16bf16"]


@pytest.mark.parametrize("text", CONFIGS)
def test_quantize_dequantize_round_trip(text):
    config = QuantConfig.parse(text)
    weight = torch.randn(96, 200)  # 200 is no multiple of the block sizes: padding
    q = fake_quantize(weight, config)
    assert q.shape == weight.shape
    # quantizing an already-quantized matrix gives it back (a fixed point)
    assert torch.allclose(fake_quantize(q, config), q, atol=1e-5 * float(q.abs().max()))
    packed = QuantizedTensor.from_weight(weight, config)
    assert torch.equal(packed.dequantize(), q)
    # the packed bytes are the exact storage, part by part
    parts = config.storage_bits_parts(weight.shape)
    for name, tensor in packed.tensors().items():
        assert tensor.numel() * tensor.element_size() == math.ceil(parts[name] / 8)
    assert packed.nbytes == math.ceil(config.storage_bits(weight.shape) / 8)
    rebuilt = QuantizedTensor.from_tensors(packed.tensors(), text, weight.shape)
    assert torch.equal(rebuilt.dequantize(), q)


def test_quantization_error_falls_with_bits():
    weight = torch.randn(128, 256)
    errors = [float((weight - fake_quantize(weight, f"nf{b}-b64-sfp32")).norm()) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] / float(weight.norm()) < 0.01


def test_block_values_on_the_grid():
    weight = torch.randn(4, 64)
    parts = quantize(weight, "nf4-b64-sfp32")
    assert torch.equal(parts.scales.squeeze(1), weight.abs().amax(dim=1))
    levels = codebook("nf", 4)
    q = fake_quantize(weight, "nf4-b64-sfp32")
    normalized = q / parts.scales
    assert (normalized.unsqueeze(-1) - levels).abs().min(dim=-1).values.max() < 1e-6


def test_quantized_scales_never_zero():
    absmax = torch.tensor([1e-9, 1.0, 0.5, 0.0])  # a tiny scale next to a large one
    weight = torch.zeros(4, 64)
    weight[:, 0] = absmax
    parts = quantize(weight, "nf4-b64-s8b4")
    assert parts.scale_codes.tolist() == [1, 255, 128, 0]
    assert float(parts.scales[0, 0]) > 0 and float(parts.scales[3, 0]) == 0


def test_quantized_scale_accuracy():
    weight = torch.randn(64, 512)
    exact = fake_quantize(weight, "nf4-b64-sfp32")
    double = fake_quantize(weight, "nf4-b64-s8b256")
    base = float((weight - exact).norm())
    assert float((weight - double).norm()) < 1.05 * base


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("count", [1, 7, 8, 9, 1001])
def test_pack_round_trip(bits, count):
    codes = torch.randint(0, 2**bits, (count,), dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(count, bits)
    assert torch.equal(unpack_bits(packed, bits, count), codes)


def test_pack_layout_is_little_endian():
    assert pack_bits(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    assert pack_bits(torch.tensor([0xA, 0x5]), 4).tolist() == [0x5A]
    # 8 three-bit codes fill exactly 3 bytes
    assert pack_bits(torch.tensor([7, 0, 0, 0, 0, 0, 0, 7]), 3).tolist() == [7, 0, 0b11100000]


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.tensor([1.0, 2.0]), "2-D"),
        (torch.zeros(0, 4), "empty"),
        (torch.tensor([[1.0, float("nan")]]), "NaN"),
        (torch.tensor([[1.0, float("inf")]]), "NaN or Inf"),
    ],
)
def test_bad_matrices(bad, message):
    with pytest.raises(ValueError, match=message):
        QuantizedTensor.from_weight(bad, "nf4-b64-sfp32")


# ---- bounds and bad input: BitallocError naming the field ---------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("nf4-b4-sfp32", "block size B0 4: supported are 8 to 4096"),
        ("nf4-b4097-sfp32", "block size B0 4097: supported are 8 to 4096"),
        ("nf2-b1000000-s8b256", "block size B0 1000000"),
        ("nf2-b99999999999999999999-s8b256", "block size B0 99999999999999999999: far outside"),
        ("nf4-b" + "9" * 5000 + "-sfp32", "block size B0 999999999999...(5000 digits)"),
        ("nf4-b64-s8b1", "scale block size B1 1: supported are 2 to 65536"),
        ("nf4-b64-s8b65537", "scale block size B1 65537"),
        ("nf4-b64-s16b256", "scale bits b0 16: supported are 2, 3, 4, 8"),
        ("nf9-b64-sfp32", "unsupported bits 9"),
        ("nf٤-b64-sfp32", "unknown config string"),  # digits of other scripts are not the grammar
        ("nf4-b６４-sfp32", "unknown config string"),
    ],
)
def test_config_bounds_name_the_field(text, message):
    with pytest.raises(BitallocError) as info:
        QuantConfig.parse(text)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert len(str(info.value)) < 400


@pytest.mark.parametrize("text", ["nf4-b8-sfp32", "int2-b4096-sbf16", "nf2-b64-s8b2", "nf3-b64-s2b65536fp16"])
def test_config_bounds_are_inclusive(text):
    assert str(QuantConfig.parse(text)) == text


@pytest.mark.parametrize("value", [None, 5, 4.0, b"nf4-b64-sfp32", ["nf4-b64-sfp32"]])
def test_parse_takes_only_strings(value):
    with pytest.raises(BitallocError, match="config must be a string"):
        QuantConfig.parse(value)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"block_size": "64"}, "block size B0 must be an integer, got '64'"),
        ({"bits": 2.0}, "bits must be an integer, got 2.0"),
        ({"bits": True}, "bits must be an integer, got True"),
        ({"block_size": 10**5000}, "unsupported block size B0 <int of 16610 bits>"),
        ({"method": []}, "unknown quantization method []"),
        ({"scale_block_size": 64}, "float scales (scale_bits None) take no scale_block_size"),
        ({"scale_bits": 8}, "quantized scales need a scale block size (B1)"),
        ({"scale_bits": 8, "scale_block_size": 1}, "scale block size B1 1"),
    ],
)
def test_config_fields_are_checked(fields, message):
    with pytest.raises(BitallocError) as info:
        QuantConfig(**fields)
    assert message in str(info.value)


def test_grid_bound_stops_a_huge_block_before_allocating():
    """--block-sizes 1000000 once padded every row to 10^6 columns (1.1 GB for a small model)."""
    from bitalloc.profiling.settings import ProfileSettings

    with pytest.raises(BitallocError, match="block size B0 1000000: supported are 8 to 4096"):
        ProfileSettings(block_sizes=(1000000,)).grid()
    with pytest.raises(BitallocError, match="block size B0 1000000"):
        fake_quantize(torch.randn(4, 16), "nf4-b1000000-sfp32")


@pytest.mark.parametrize("shape", [("a", 1), None, (1.5, 3), (0, 5), (True, 5), "12", (4, 4, 4)])
def test_storage_bits_bad_shapes(shape):
    with pytest.raises(BitallocError, match="2-D matrix shape"):
        storage_bits(shape, "nf4-b64-sfp32")


def test_storage_bits_is_exact_for_any_size():
    rows, cols = 10**30, 10**30 + 1  # float division would overflow or round
    blocks = rows * (cols // 64 + 1)
    assert storage_bits((rows, cols), "nf4-b64-s8b256") == blocks * (64 * 4 + 8) + -(-blocks // 256) * 32
