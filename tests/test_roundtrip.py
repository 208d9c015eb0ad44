"""apply -> load_quantized round trip over a covering set of configs: NF and INT codebooks,
every bit width, each kind of scale storage, rows that are not a multiple of B0 (padding)
and block counts that are not a multiple of B1 (partial scale groups). The loaded Q must be
exactly LoftQ's Q, and Q + scaling·B·A from the adapter must be LoftQ's approximation."""

import pytest
import torch
from _models import llama_module_names, make_tiny_llama

import bitalloc
from bitalloc.checkpoints import open_source
from bitalloc.lora import loftq, module_seed
from bitalloc.quant import QuantConfig

# hidden 192 (not a multiple of 128), intermediate 320 (not a multiple of 128)
SIZES = dict(hidden_size=192, intermediate_size=320, num_attention_heads=4, num_key_value_heads=2)
CONFIGS = [
    "nf2-b64-s8b256",
    "nf3-b128-sfp16",
    "nf4-b32-sbf16",
    "nf8-b64-sfp32",
    "int2-b32-s8b64fp16",
    "int3-b128-s4b16bf16",
    "int4-b128-sfp32",
    "int8-b64-s8b256",
]
RANK, ITERS = 4, 2


def hand_plan(model_dir, names: list[str]) -> bitalloc.Plan:
    """A valid plan giving the i-th matrix CONFIGS[i % 8] (what a profile + pins would give)."""
    source = open_source(model_dir, modules=names)
    modules = {}
    for i, name in enumerate(names):
        config = QuantConfig.parse(CONFIGS[i % len(CONFIGS)])
        shape = source.shape(name)
        entry = config.to_dict()
        entry.update(storage_bits=config.storage_bits(shape), shape=list(shape), numel=shape[0] * shape[1],
                     rank=RANK, error=0.0)  # fmt: skip
        modules[name] = entry
    storage = sum(e["storage_bits"] for e in modules.values())
    numel = sum(e["numel"] for e in modules.values())
    return bitalloc.Plan(
        model={"source": str(model_dir), "fingerprint": source.fingerprint()},
        budget={"target_bits": 9.0, "achieved_bits": round(storage / numel, 6), "includes_lora": False},
        solver={"name": "dp", "status": "optimal", "objective": 0.0, "gap": 0.0},
        defaults={"rank": RANK, "iters": ITERS},
        modules=modules,
    )


@pytest.fixture(scope="module")
def applied(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip")
    model = make_tiny_llama(root / "model", shard_size=None, **SIZES)
    names = llama_module_names()
    plan = hand_plan(root / "model", names)
    plan.save(root / "plan.json")
    out = bitalloc.apply(
        root / "model", root / "plan.json", root / "out", lora_alpha=8.0, device="cpu", quiet=True
    )
    return model, names, out


def test_every_config_is_covered(applied):
    _, names, _ = applied
    used = {CONFIGS[i % len(CONFIGS)] for i in range(len(names))}
    assert used == set(CONFIGS)
    parsed = [QuantConfig.parse(c) for c in CONFIGS]
    assert {c.method for c in parsed} == {"nf", "int"} and {c.bits for c in parsed} == {2, 3, 4, 8}
    assert {str(c).split("-s")[1] for c in parsed} >= {
        "fp32",
        "fp16",
        "bf16",
        "8b256",
        "8b64fp16",
        "4b16bf16",
    }


def test_loaded_q_is_exactly_loftq_q_and_adapter_restores_the_approximation(applied):
    from peft import PeftModel

    model, names, out = applied
    quantized = bitalloc.load_quantized(out / "quantized")
    peft_model = PeftModel.from_pretrained(bitalloc.load_quantized(out / "quantized"), str(out / "adapter"))
    for i, name in enumerate(names):
        config = CONFIGS[i % len(CONFIGS)]
        weight = model.get_submodule(name).weight.detach().float()
        seed = module_seed(name, config)
        expected = loftq(weight, config, rank=RANK, iters=ITERS, lora_alpha=8.0, seed=seed, device="cpu")
        layer = quantized.get_submodule(name)
        assert isinstance(layer, bitalloc.QuantLinear) and str(layer.config) == config
        q = layer.dequantize(torch.float32)
        assert torch.equal(q, expected.q.dequantize(torch.float32)), name  # exact
        lora = peft_model.base_model.model.get_submodule(name)
        delta = lora.scaling["default"] * (lora.lora_B["default"].weight @ lora.lora_A["default"].weight)
        approx = q + delta.detach()
        reference = expected.q.dequantize(torch.float32) + expected.lowrank()
        assert torch.linalg.norm(approx - reference) <= 1e-5 * torch.linalg.norm(reference), name
        # and it is the LoftQ approximation of W that the plan measured
        rel = float(torch.linalg.norm(weight - approx) / torch.linalg.norm(weight))
        assert rel == pytest.approx(expected.rel_error, rel=1e-4, abs=1e-6), name
