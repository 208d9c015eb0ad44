"""merge_and_unload over QuantLinears: a dense model equal to merging into `apply --dequantized`,
with a warning that it is no longer quantized; merge_adapter/unmerge_adapter restore the
packed layers."""

from __future__ import annotations

import pytest
import torch
from _models import make_tiny_llama
from peft import PeftModel
from test_apply import logits
from transformers import AutoModelForCausalLM

import bitalloc
from bitalloc.artifacts.nn import QuantLinear, load_quantized
from bitalloc.planning.planner import plan as make_plan
from bitalloc.profiling.profiler import profile

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    make_tiny_llama(root / "model", shard_size=None)
    table = profile(root / "model", configs=["nf2-b64-s8b256", "nf4-b64-sfp16"], rank=8, iters=2,
                    device="cpu", quiet=True)  # fmt: skip
    plan = make_plan(table, 3.0)
    out = bitalloc.apply(root / "model", plan, root / "out", device="cpu", quiet=True, dequantized=True)
    return plan, out


def merged_dequantized_route(out, dtype):
    base = AutoModelForCausalLM.from_pretrained(out / "dequantized", dtype=dtype)
    return PeftModel.from_pretrained(base, out / "adapter").merge_and_unload()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_and_unload_equals_the_dequantized_route(case, tmp_path, dtype):
    plan, out = case
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "quantized", dtype=dtype),
                                      out / "adapter")  # fmt: skip
    with_adapter = logits(model)
    with pytest.warns(UserWarning, match="no longer quantized"):
        merged = model.merge_and_unload()
    assert not any(isinstance(m, QuantLinear) for m in merged.modules())
    assert "quantization_config" not in merged.config.to_dict() and not getattr(merged, "is_quantized", False)
    assert {p.dtype for p in merged.parameters()} == {dtype}
    reference = merged_dequantized_route(out, torch.bfloat16) if dtype == torch.bfloat16 else None
    for name in plan.modules:
        weight = merged.get_submodule(name).weight
        assert type(merged.get_submodule(name)) is torch.nn.Linear and weight.dtype == dtype
        if reference is not None:  # bf16 Q, as apply --dequantized writes it: the same numbers
            assert torch.equal(weight, reference.get_submodule(name).weight)
    tolerance = 0.05 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(logits(merged).float(), with_adapter.float(), rtol=0, atol=tolerance)
    merged.save_pretrained(tmp_path / "merged")  # a plain checkpoint: no bitalloc needed
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=dtype)
    assert getattr(plain, "hf_quantizer", None) is None
    torch.testing.assert_close(logits(plain), logits(merged), rtol=0, atol=0)


def test_merge_adapter_then_unmerge_restores_the_packed_layers(case):
    plan, out = case
    model = PeftModel.from_pretrained(load_quantized(out / "quantized"), out / "adapter")
    before = logits(model)
    name = next(iter(plan.modules))
    packed = model.base_model.model.get_submodule(name).base_layer
    with pytest.warns(UserWarning, match="no longer quantized"):
        model.merge_adapter()
    assert type(model.base_model.model.get_submodule(name).base_layer) is torch.nn.Linear
    torch.testing.assert_close(logits(model), before, rtol=1e-4, atol=1e-5)
    model.unmerge_adapter()
    assert model.base_model.model.get_submodule(name).base_layer is packed
    torch.testing.assert_close(logits(model), before, rtol=0, atol=0)
