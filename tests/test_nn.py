"""QuantLinear: exact forward/backward, packed-only saved tensors, PEFT wrapping, no merging."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from bitalloc.artifacts.nn import PackedWeight, QuantLinear
from bitalloc.quant import QuantizedTensor

pytestmark = pytest.mark.usefixtures("one_thread")


def packed_layer(rows=96, cols=200, config="nf4-b64-s8b256", bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator)
    quantized = QuantizedTensor.from_weight(weight, config)
    bias_values = torch.randn(rows, generator=generator) if bias else None
    return QuantLinear.from_quantized(quantized, bias_values, name="block.proj"), quantized


class Tiny(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.proj = layer
        self.head = nn.Linear(layer.out_features, 4)

    def forward(self, x):
        return self.head(torch.relu(self.proj(x)))


@pytest.mark.parametrize("config", ["nf4-b64-s8b256", "nf2-b64-s8b256", "int3-b32-sfp16", "nf4-b64-sbf16"])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_input_grad_match_the_dense_layer(config, bias):
    layer, quantized = packed_layer(config=config, bias=bias)  # 200 columns: a padded last block
    dense = quantized.dequantize()
    x = torch.randn(3, 5, 200, requires_grad=True)
    out = layer(x)
    expected = nn.functional.linear(x, dense, layer.bias)
    assert torch.equal(out, expected)
    grad = torch.randn_like(out)
    (got_grad,) = torch.autograd.grad(out, x, grad)
    (want_grad,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.dequantize(), dense, rtol=0, atol=0)


def test_saved_tensors_are_only_the_packed_weight():
    """Bytes kept for backward: the packed 4-bit weight (~13% of the fp32 matrix), no Q."""
    layer, quantized = packed_layer(512, 512, "nf4-b64-s8b256", bias=False)
    dense = nn.Linear(512, 512, bias=False)
    dense.weight.data = quantized.dequantize()
    dense.weight.requires_grad_(False)
    x = torch.randn(4, 512, requires_grad=True)

    def saved_bytes(module: nn.Module) -> int:
        sizes = []

        def pack(tensor):
            sizes.append(0 if tensor is x else tensor.numel() * tensor.element_size())
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            module(x).sum().backward()
        return sum(sizes)

    weight_bytes = 512 * 512 * 4
    packed = saved_bytes(layer)
    assert packed == 512 * 512 // 2 + 512 * 8 + 16 * 4  # codes + 8-bit scales + fp32 scales2
    assert packed == quantized.nbytes < 0.25 * weight_bytes
    assert saved_bytes(dense) >= weight_bytes  # a frozen nn.Linear keeps the dense matrix


def test_weight_is_a_stand_in_without_values():
    layer, _ = packed_layer()
    weight = layer.weight
    assert isinstance(weight, PackedWeight)
    assert weight.shape == (96, 200) and weight.dtype == torch.float32 and weight.device.type == "cpu"
    with pytest.raises(RuntimeError, match="--dequantized"):
        _ = weight.data
    with pytest.raises(RuntimeError, match="block.proj"):
        _ = weight + 1
    with pytest.raises(RuntimeError, match="no dense weight"):
        layer.weight = torch.zeros(96, 200)
    assert "weight" not in dict(layer.named_parameters())


def test_peft_wraps_it_and_merges_dequantized():
    torch.manual_seed(0)
    layer, _ = packed_layer()
    model = get_peft_model(Tiny(layer), LoraConfig(r=4, target_modules=["proj"], init_lora_weights=False))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == [
        "base_model.model.proj.lora_A.default.weight",
        "base_model.model.proj.lora_B.default.weight",
    ]
    x = torch.randn(2, 200)
    before = model(x)
    before.sum().backward()
    assert model.base_model.model.proj.lora_A["default"].weight.grad.abs().sum() > 0
    delta = model.base_model.model.proj.get_delta_weight("default").detach()
    with pytest.warns(UserWarning, match="no longer quantized"):
        merged = model.merge_and_unload()  # dequantized: a dense Linear holding Q + scaling * B @ A
    assert type(merged.proj) is nn.Linear
    torch.testing.assert_close(merged.proj.weight, layer.dequantize() + delta, rtol=0, atol=0)
    torch.testing.assert_close(merged(x), before, rtol=1e-5, atol=1e-5)


def test_to_dtype_changes_compute_not_the_stored_scales():
    layer, quantized = packed_layer(config="nf4-b64-sfp16")
    stored = {name: buffer.clone() for name, buffer in layer.named_buffers()}
    layer.to(torch.bfloat16)
    assert layer.weight.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.scales.dtype == torch.float16 and layer.codes.dtype == torch.uint8
    assert torch.equal(layer.scales, stored["scales"]) and torch.equal(layer.codes, stored["codes"])
    x = torch.randn(4, 200)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    expected = nn.functional.linear(x.bfloat16(), quantized.dequantize(torch.bfloat16), layer.bias)
    assert torch.equal(out, expected)


def test_state_dict_round_trip():
    layer, quantized = packed_layer(config="nf2-b64-s8b256")
    state = layer.state_dict()
    assert sorted(state) == ["bias", "codes", "scales", "scales2"]
    assert state["codes"].numel() == 96 * 256 * 2 // 8  # padded to 4 blocks of 64, 2 bits
    fresh = QuantLinear(200, 96, "nf2-b64-s8b256")
    fresh.load_state_dict(state)
    assert torch.equal(fresh.dequantize(), quantized.dequantize())
    assert torch.equal(fresh.bias, layer.bias)
    assert "config=nf2-b64-s8b256" in repr(fresh)
    files = QuantLinear(200, 96, "nf2-b64-s8b256")  # files name them weight.<part>
    files.load_state_dict({("weight." + k if k != "bias" else k): v for k, v in state.items()})
    assert torch.equal(files.dequantize(), quantized.dequantize())
