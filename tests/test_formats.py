"""Asymmetric integer formats (uint, a zero point per block) and the -mse scale search.

The uint dequantization must equal, bit for bit on the same codes, what each target library
computes from them: compressed-tensors, torchao and HQQ (installed), and GPTQ's documented
qweight/qzeros layout (GPTQModel is not installable here: its formula is checked structurally).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from bitalloc.errors import BitallocError
from bitalloc.lora import loftq
from bitalloc.quant import QuantConfig, QuantizedTensor, fake_quantize, storage_bits


def gaussian(rows: int = 256, cols: int = 512, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


# ---- grammar and storage ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text",
    [
        "uint4-b128-sfp16-z4",
        "uint2-b64-sbf16-zbf16",
        "uint3-b32-sfp32-z3-mse",
        "uint8-b64-sfp16-zfp16-mse",
        "nf2-b64-s8b256-mse",
        "int3-b128-sfp16-mse",
    ],
)
def test_new_configs_round_trip(text):
    config = QuantConfig.parse(text)
    assert str(config) == text and QuantConfig.parse(str(config)) == config
    assert config.search == text.endswith("-mse")
    assert config.asymmetric == text.startswith("uint")


@pytest.mark.parametrize(
    "bad, words",
    [
        ("uint4-b128-sfp16", "store a zero point"),
        ("uint4-b128-sfp16-z3", "-z4"),
        ("uint4-b128-sfp16-zbf16", "scale's dtype"),
        ("uint4-b128-s8b256-z4", "float scales"),
        ("nf4-b64-sfp16-z4", "symmetric"),
        ("int4-b64-sfp16-zfp16", "symmetric"),
        ("uint5-b64-sfp16-z5", "unsupported bits"),
        ("nf4-b64-sfp16-mse-mse", "unknown config"),
    ],
)
def test_bad_new_configs_say_why_in_one_line(bad, words):
    with pytest.raises(BitallocError) as info:
        QuantConfig.parse(bad)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_uint_storage_is_exact():
    # 100 x 200 at B0=64: 4 blocks per row (256 padded columns), 400 blocks
    assert storage_bits((100, 200), "uint4-b64-sfp16-z4") == 100 * 256 * 4 + 400 * 16 + 400 * 4
    assert storage_bits((100, 200), "uint2-b64-sbf16-zbf16") == 100 * 256 * 2 + 400 * 16 + 400 * 16
    assert storage_bits((100, 200), "uint3-b64-sfp32-zfp32-mse") == 100 * 256 * 3 + 400 * 64
    assert QuantConfig.parse("uint4-b128-sfp16-z4").bits_per_param == 4 + 20 / 128
    # the search flag costs nothing
    assert storage_bits((100, 200), "nf2-b64-s8b256-mse") == storage_bits((100, 200), "nf2-b64-s8b256")
    weight = gaussian(100, 200)
    for text in ("uint4-b64-sfp16-z4", "uint3-b64-sbf16-zbf16-mse", "uint2-b32-sfp32-z2"):
        packed = QuantizedTensor.from_weight(weight, text)
        assert packed.nbytes * 8 == sum(
            math.ceil(bits / 8) * 8
            for bits in QuantConfig.parse(text).storage_bits_parts((100, 200)).values()
        )


@pytest.mark.parametrize(
    "text",
    ["uint2-b64-sfp16-z2", "uint3-b32-sbf16-z3-mse", "uint4-b128-sfp16-zfp16", "uint8-b64-sbf16-zbf16-mse"],
)
def test_uint_packing_round_trips_and_matches_fake_quantize(text):
    weight = gaussian(48, 200, seed=3)  # 200 columns: a partial last block
    packed = QuantizedTensor.from_weight(weight, text)
    again = QuantizedTensor.from_tensors(packed.tensors(), text, (48, 200))
    q = packed.dequantize()
    assert torch.equal(again.dequantize(), q)
    assert torch.equal(fake_quantize(weight, text), q)
    config = QuantConfig.parse(text)
    codes = packed.unpacked_codes()
    assert int(codes.max()) <= 2**config.bits - 1
    if config.zero == "int":
        assert int(packed.zero_values().max()) <= 2**config.bits - 1
    wrong = dict(packed.tensors(), zeros=packed.zeros[:-1])
    with pytest.raises(ValueError, match="zeros"):
        QuantizedTensor.from_tensors(wrong, text, (48, 200))


def _parts(weight: torch.Tensor, text: str):
    """(codes (rows, cols) int64, scales (rows, groups) stored dtype, zeros (rows, groups), Q float32)."""
    packed = QuantizedTensor.from_weight(weight, text)
    rows, cols = weight.shape
    codes = packed.unpacked_codes()[:, :cols].long()
    return codes, packed.scales, packed.zero_values(), packed.dequantize()


# ---- equal, bit for bit, to each target's own dequantization --------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_int_zero_equals_compressed_tensors(bits, dtype):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    text = f"uint{bits}-b64-s{dtype}-z{bits}-mse"
    codes, scales, zeros, q = _parts(gaussian(64, 256, seed=bits), text)
    offset = 2 ** (bits - 1)  # compressed-tensors' int type is signed: q - 2^(b-1), z - 2^(b-1)
    signed = (codes - offset).to(torch.int8)
    signed_zero = (zeros.long() - offset).to(torch.int8)
    packed = pack_to_int32(signed, bits)  # weight_packed, as pack-quantized stores it
    assert torch.equal(unpack_from_int32(packed, bits, signed.shape), signed)
    zero_packed = pack_to_int32(signed_zero, bits, packed_dim=0)  # weight_zero_point
    assert torch.equal(unpack_from_int32(zero_packed, bits, signed_zero.shape, packed_dim=0), signed_zero)
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=False, strategy="group", group_size=64)
    theirs = dequantize(signed, scales, signed_zero, args)
    assert theirs.dtype == scales.dtype
    assert torch.equal(theirs, q.to(scales.dtype))  # our Q is exact: its rounding is theirs
    theirs32 = dequantize(signed, scales.float(), signed_zero, args, dtype=torch.float32)
    assert torch.equal(theirs32, q)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_zero_equals_torchao(bits):
    from torchao.quantization.quant_primitives import dequantize_affine

    text = f"uint{bits}-b128-sbf16-z{bits}"
    codes, scales, zeros, q = _parts(gaussian(32, 512, seed=10 + bits), text)
    # torchao's asymmetric intN (MappingType.ASYMMETRIC): signed codes and an int8 zero point
    offset = 2 ** (bits - 1)
    signed, zero = (codes - offset).to(torch.int8), (zeros.long() - offset).to(torch.int8)
    for out in (torch.bfloat16, torch.float32):
        theirs = dequantize_affine(
            signed, (1, 128), scales, zero, torch.int8, -offset, offset - 1, output_dtype=out
        )
        assert torch.equal(theirs, q.to(out)), out


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_float_zero_equals_hqq(bits, dtype):
    from hqq.core.quantize import Quantizer

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    text = f"uint{bits}-b64-s{dtype}-z{dtype}-mse"
    codes, scales, zeros, q = _parts(gaussian(32, 256, seed=20 + bits), text)
    group = 64
    # HQQ, axis=1: groups are rows of W.reshape(-1, group_size), one scale and zero each
    grouped = codes.reshape(-1, group).to(torch.uint8)
    packing = Quantizer.bit_to_packing[bits]
    meta = {
        "nbits": bits,
        "group_size": group,
        "shape": codes.shape,
        "scale": scales.reshape(-1, 1),
        "zero": zeros.reshape(-1, 1),
        "axis": 1,
        "packing": packing,
        "compute_dtype": torch_dtype,
        "view_as_float": False,
    }
    w_q = Quantizer.pack[packing](grouped)
    theirs = Quantizer.dequantize(w_q, meta)
    assert theirs.dtype == torch_dtype
    assert torch.equal(theirs, q.to(torch_dtype))
    assert torch.equal(theirs.float(), q)  # our float32 Q holds exactly HQQ's values


def _gptq_pack(values: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ's int32 packing along dim 0 (qweight: input dim; qzeros: its transposed use along the
    output dim), 32/bits values per word, lowest bits first (bits 2, 4, 8)."""
    per = 32 // bits
    rows = values.shape[0]
    words = torch.zeros((rows // per, values.shape[1]), dtype=torch.int64)
    for i in range(per):
        words |= (values[i::per].long() & ((1 << bits) - 1)) << (bits * i)
    return words  # int64 holding the uint32 words


def _gptq_unpack(words: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    parts = [(words >> (bits * i)) & ((1 << bits) - 1) for i in range(per)]
    return torch.stack(parts, dim=1).reshape(-1, words.shape[1])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_zero_matches_gptq_layout(bits):
    """GPTQ stores qweight (in/pack, out), qzeros (groups, out/pack) holding z - 1 (the format
    GPTQModel calls v1; its v2 holds z) and fp16 scales (groups, out); w = (q - z)·s."""
    text = f"uint{bits}-b128-sfp16-z{bits}"
    weight = gaussian(64, 256, seed=30 + bits)
    codes, scales, zeros, q = _parts(weight, text)
    qweight = _gptq_pack(codes.t(), bits)  # (in/pack, out)
    qzeros = _gptq_pack((zeros.long() - 1) & (2**bits - 1), bits).t()  # (groups, out/pack)
    # GPTQ reads them back: unpack, zeros + 1 (v1), then per column group g = i // group_size
    q_codes = _gptq_unpack(qweight, bits)  # (in, out)
    z = (_gptq_unpack(qzeros.t(), bits).t() + 1) & (2**bits - 1)  # (groups, out)
    s = scales.t()  # (groups, out), fp16
    g_idx = torch.arange(256) // 128
    theirs = (q_codes - z[g_idx]).to(torch.float16) * s[g_idx]
    assert torch.equal(theirs.t(), q.to(torch.float16))


# ---- the scale search ---------------------------------------------------------------------------------
def _mse(weight: torch.Tensor, text: str, **kwargs) -> float:
    return float((weight - fake_quantize(weight, text, **kwargs)).square().mean())


@pytest.mark.parametrize(
    "plain, factor",
    [
        ("int2-b64-s8b256", 1.8),
        ("nf2-b64-s8b256", 1.8),
        ("uint2-b64-sfp16-z2", 1.4),
        ("uint2-b64-sfp16-zfp16", 1.5),
        ("int3-b64-sfp16", 1.2),
        ("nf3-b128-s8b256", 1.1),
        ("nf4-b64-sfp16", 1.03),
        ("uint4-b128-sbf16-z4", 1.03),
    ],
)
def test_search_lowers_the_error(plain, factor):
    weight = gaussian(512, 1024, seed=5)
    before, after = _mse(weight, plain), _mse(weight, plain + "-mse")
    assert after * factor < before, (plain, before, after)


def test_search_is_never_worse_per_block_than_absmax():
    # heavy tails: the ratio 1 is always a candidate, so no block is worse before scale storage
    # (NF: up to the search's level table, whose codes can be one level off within 1/4096 of a
    # midpoint: measured excess <= 0.07% on a few blocks)
    torch.manual_seed(2)
    weight = torch.distributions.StudentT(3.0).sample((64, 1024)) * 0.02
    for text, slack in [("int3-b64-sfp32", 1e-5), ("uint3-b64-sfp32-zfp32", 1e-5), ("nf4-b64-sfp32", 2e-3)]:
        plain = (weight - fake_quantize(weight, text)).square().reshape(64, -1, 64).sum(-1)
        searched = (weight - fake_quantize(weight, text + "-mse")).square().reshape(64, -1, 64).sum(-1)
        assert bool((searched <= plain * (1 + slack) + 1e-12).all()), text
        assert float(searched.sum()) < float(plain.sum()), text


def test_weighted_search_lowers_the_weighted_error():
    weight = gaussian(256, 512, seed=7)
    h = torch.rand(512, generator=torch.Generator().manual_seed(8)) ** 4 + 0.01
    for text in ("int2-b64-sfp16-mse", "uint2-b64-sfp16-z2-mse", "nf2-b64-s8b256-mse"):
        plain = ((weight - fake_quantize(weight, text)).square() * h).sum()
        weighted = ((weight - fake_quantize(weight, text, column_weights=h)).square() * h).sum()
        assert weighted < 0.97 * plain, text
    # the weights change nothing without the search
    assert torch.equal(fake_quantize(weight, "int2-b64-sfp16", h), fake_quantize(weight, "int2-b64-sfp16"))


def test_bad_column_weights_are_refused():
    with pytest.raises(BitallocError, match="512 values"):
        fake_quantize(gaussian(8, 512), "int2-b64-sfp16-mse", torch.ones(100))
    with pytest.raises(BitallocError, match=">= 0"):
        fake_quantize(gaussian(8, 512), "int2-b64-sfp16-mse", -torch.ones(512))


@pytest.mark.parametrize("weighting", ["none", "columns", "covariance"])
def test_loftq_searches_every_iteration_and_keeps_its_q(weighting):
    weight = gaussian(96, 128, seed=11)
    x = torch.randn(400, 128, generator=torch.Generator().manual_seed(12)) * torch.linspace(0.2, 3, 128)
    kwargs = {
        "none": {},
        "columns": {"column_weights": x.square().mean(0)},
        "covariance": {"input_covariance": x.T @ x / 400},
    }[weighting]
    plain = loftq(weight, "int2-b32-sfp16", rank=8, iters=3, seed=1, **kwargs)
    searched = loftq(weight, "int2-b32-sfp16-mse", rank=8, iters=3, seed=1, **kwargs)
    assert searched.rel_error < 0.85 * plain.rel_error
    if weighting != "none":
        assert searched.weighted_error < plain.weighted_error
    # Q rebuilt from the kept iterate is the Q the error was measured with
    approx = searched.q.dequantize() + searched.lowrank()
    rel = float(torch.linalg.norm(weight - approx) / torch.linalg.norm(weight))
    assert rel == pytest.approx(searched.rel_error, rel=1e-4)


# ---- apply -> load_quantized, and the plan file ------------------------------------------------------
ROUND_TRIP = [
    "uint2-b64-sfp16-z2",
    "uint3-b128-sbf16-zbf16-mse",
    "uint4-b32-sfp32-z4-mse",
    "uint8-b64-sfp16-zfp16",
    "nf2-b64-s8b256-mse",
    "int3-b128-sfp16-mse",
]


def test_apply_and_load_quantized_round_trip_new_formats(tmp_path):
    from _models import llama_module_names, make_tiny_llama

    import bitalloc
    from bitalloc.checkpoints import open_source
    from bitalloc.lora import module_seed

    sizes = dict(hidden_size=192, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2)
    model = make_tiny_llama(tmp_path / "model", shard_size=None, **sizes)
    names = llama_module_names()
    source = open_source(tmp_path / "model", modules=names)
    modules = {}
    for i, name in enumerate(names):
        config = QuantConfig.parse(ROUND_TRIP[i % len(ROUND_TRIP)])
        shape = source.shape(name)
        entry = config.to_dict()
        entry.update(storage_bits=config.storage_bits(shape), shape=list(shape), numel=shape[0] * shape[1],
                     rank=4, error=0.0)  # fmt: skip
        modules[name] = entry
    storage = sum(e["storage_bits"] for e in modules.values())
    numel = sum(e["numel"] for e in modules.values())
    plan = bitalloc.Plan(
        model={"source": str(tmp_path / "model"), "fingerprint": source.fingerprint()},
        budget={"target_bits": 9.0, "achieved_bits": round(storage / numel, 6), "includes_lora": False},
        solver={"name": "dp", "status": "optimal", "objective": 0.0, "gap": 0.0},
        defaults={"rank": 4, "iters": 2},
        modules=modules,
    )
    plan.save(tmp_path / "plan.json")
    loaded_plan = bitalloc.Plan.load(tmp_path / "plan.json")
    first = loaded_plan.modules[names[1]]
    assert first["method"] == "uint" and first["scale"] == {"dtype": "bf16", "zero": "bf16", "search": "mse"}
    out = bitalloc.apply(
        tmp_path / "model", tmp_path / "plan.json", tmp_path / "out", device="cpu", quiet=True
    )
    quantized = bitalloc.load_quantized(out / "quantized")
    for i, name in enumerate(names):
        config = ROUND_TRIP[i % len(ROUND_TRIP)]
        weight = model.get_submodule(name).weight.detach().float()
        expected = loftq(weight, config, rank=4, iters=2, seed=module_seed(name, config), device="cpu")
        layer = quantized.get_submodule(name)
        assert str(layer.config) == config
        assert torch.equal(layer.dequantize(torch.float32), expected.q.dequantize()), name
        assert layer.quantized().nbytes * 8 >= QuantConfig.parse(config).storage_bits(layer.shape)
    x = torch.randint(0, 100, (1, 8))
    assert torch.isfinite(quantized(x).logits).all()


def test_plan_scale_object_is_checked_against_the_config():
    config = QuantConfig.parse("uint4-b128-sfp16-z4-mse")
    assert config.to_dict()["scale"] == {"dtype": "fp16", "zero": 4, "search": "mse"}
    assert QuantConfig.parse("nf2-b64-s8b256").to_dict()["scale"] == {
        "bits": 8, "block_size": 256, "second_level": "fp32"
    }  # fmt: skip


def _small_plan(configs: dict[str, str]):
    import bitalloc

    modules = {}
    for name, text in configs.items():
        config = QuantConfig.parse(text)
        entry = config.to_dict()
        entry.update(storage_bits=config.storage_bits((256, 512)), shape=[256, 512], numel=256 * 512,
                     rank=0, error=0.0)  # fmt: skip
        modules[name] = entry
    bits = sum(e["storage_bits"] for e in modules.values()) / sum(e["numel"] for e in modules.values())
    return bitalloc.Plan(
        budget={"target_bits": 5.0, "achieved_bits": round(bits, 6), "includes_lora": False},
        solver={"name": "dp", "status": "optimal", "objective": 0.0, "gap": 0.0},
        defaults={"rank": 0, "iters": 0},
        modules=modules,
    )


def test_exports_map_uint_to_asymmetric_groups():
    from compressed_tensors.quantization import QuantizationConfig
    from torchao.core.config import config_from_dict

    from bitalloc.export import export

    plan = _small_plan({
        "model.layers.0.self_attn.q_proj": "uint4-b128-sfp16-z4",
        "model.layers.0.self_attn.k_proj": "uint4-b128-sfp16-z4-mse",
        "model.layers.0.self_attn.v_proj": "int4-b128-sfp16",
    })  # fmt: skip
    gptq = export(plan, "gptqmodel")
    payload = json.loads(gptq.text)
    assert payload["sym"] is False and payload["bits"] == 4
    override = {"bits": 4, "group_size": 128, "sym": True}
    assert payload["dynamic"] == {"+:^model\\.layers\\.0\\.self_attn\\.v_proj$": override}
    assert any("asymmetric mode" in note for note in gptq.notes)
    assert any("-mse scale search (1 of 3" in note for note in gptq.notes)
    rounds = json.loads(export(plan, "autoround").text)
    assert rounds["model.layers.0.self_attn.q_proj"]["sym"] is False
    assert rounds["model.layers.0.self_attn.v_proj"]["sym"] is True
    ct = json.loads(export(plan, "compressed-tensors").text)
    config = QuantizationConfig.model_validate(ct)
    schemes = {tuple(g.targets): g.weights.symmetric for g in config.config_groups.values()}
    assert schemes == {
        ("model.layers.0.self_attn.v_proj",): True,
        ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"): False,
    }
    ao = config_from_dict(json.loads(export(plan, "torchao").text))
    mapping = {name: str(c.mapping_type.name) for name, c in ao.fqn_to_config.items()}
    assert mapping["model.layers.0.self_attn.q_proj"] == "ASYMMETRIC"
    assert mapping["model.layers.0.self_attn.v_proj"] == "SYMMETRIC"
    # compressed-tensors' budget re-check counts the packed zero points of the asymmetric groups
    sym = export(_small_plan({"a.q_proj": "int4-b128-sfp16"}), "compressed-tensors").target_bits
    asym = export(_small_plan({"a.q_proj": "uint4-b128-sfp16-z4"}), "compressed-tensors").target_bits
    assert asym == pytest.approx(sym + 4 / 128, abs=1e-6)
