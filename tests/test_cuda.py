"""The device code paths: every test runs on the CPU, and on CUDA too where a GPU is present
(`benchmarks/gpu_check.py` runs this file on a GPU machine). Results on a device must
equal the CPU's to tolerance: QuantLinear, batched LoftQ, the profile, load_quantized."""

import pytest
import torch
from _models import make_tiny_llama

import bitalloc
from bitalloc.artifacts.nn import QuantLinear, load_quantized
from bitalloc.lora import loftq, loftq_batch
from bitalloc.planning.planner import plan
from bitalloc.quant import QuantizedTensor

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
CONFIGS = ["nf2-b64-s8b256", "nf4-b32-sfp16"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantlinear_matches_a_dense_linear_with_its_weight(device, dtype):
    torch.manual_seed(0)
    weight, bias = torch.randn(96, 128), torch.randn(96)
    layer = QuantLinear.from_quantized(QuantizedTensor.from_weight(weight, "nf3-b64-s8b256"), bias)
    layer = layer.to(device=device, dtype=dtype)
    dense = torch.nn.Linear(128, 96).to(device=device, dtype=dtype)
    with torch.no_grad():
        dense.weight.copy_(layer.dequantize(torch.float32))
        dense.bias.copy_(bias)
    x = torch.randn(3, 5, 128, device=device, dtype=dtype, requires_grad=True)
    y = layer(x)
    (grad,) = torch.autograd.grad(y.float().square().sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = dense(x2)
    (grad2,) = torch.autograd.grad(y2.float().square().sum(), x2)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert y.device.type == device and y.dtype == dtype
    torch.testing.assert_close(y.float(), y2.float(), rtol=tol, atol=tol * float(y2.detach().abs().max()))
    torch.testing.assert_close(grad.float(), grad2.float(), rtol=tol, atol=tol * float(grad2.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_batched_loftq_on_the_device_equals_one_matrix_on_the_cpu(device):
    torch.manual_seed(1)
    weights = torch.randn(3, 64, 128)
    for config in CONFIGS:
        batch = loftq_batch(weights, config, rank=4, iters=2, seeds=[1, 2, 3], device=device)
        for i, result in enumerate(batch):
            single = loftq(weights[i], config, rank=4, iters=2, seed=i + 1, device="cpu")
            assert result.rel_error == pytest.approx(single.rel_error, rel=1e-4)
            assert result.lora_A.device.type == "cpu"


@pytest.mark.parametrize("device", DEVICES)
def test_profile_and_load_on_the_device_equal_the_cpu(device, tmp_path):
    make_tiny_llama(tmp_path / "model", seed=3)
    options = dict(configs=CONFIGS, rank=4, iters=2, quiet=True, objective="weight")
    on_cpu = bitalloc.profile(str(tmp_path / "model"), device="cpu", **options)
    on_device = bitalloc.profile(str(tmp_path / "model"), device=device, **options)
    assert list(on_cpu["module"]) == list(on_device["module"])
    assert (on_cpu["storage_bits"] == on_device["storage_bits"]).all()
    torch.testing.assert_close(
        torch.tensor(on_device["error"].to_numpy()),
        torch.tensor(on_cpu["error"].to_numpy()),
        rtol=1e-4,
        atol=0,
    )
    plan_path = tmp_path / "plan.json"
    plan(on_device, 3.0).save(plan_path)
    out = bitalloc.apply(str(tmp_path / "model"), plan_path, tmp_path / "out", device=device, quiet=True)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    cpu_model = load_quantized(out / "quantized")
    device_model = load_quantized(out / "quantized", device=device)
    with torch.no_grad():
        want = cpu_model(ids).logits
        got = device_model(ids.to(device)).logits.cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_gptq_rounding_on_the_device_equals_the_cpu(device):
    """-gptq in the output objective, batched: the same weighted errors and (all but a few) codes."""
    g = torch.Generator().manual_seed(4)
    weights = torch.randn(2, 64, 128, generator=g) * 0.02
    x = torch.randn(512, 128, generator=g) @ (torch.randn(128, 128, generator=g) * 0.1 + torch.eye(128))
    h = x.T @ x / 512
    batch = loftq_batch(weights, "nf3-b64-s8b256-mse-gptq", rank=4, iters=2, seeds=[1, 2], device=device,
                        input_covariance=h)  # fmt: skip
    for i, result in enumerate(batch):
        single = loftq(weights[i], "nf3-b64-s8b256-mse-gptq", rank=4, iters=2, seed=i + 1, input_covariance=h)
        assert result.weighted_error == pytest.approx(single.weighted_error, rel=1e-3)
        differ = float((result.q.unpacked_codes() != single.q.unpacked_codes()).float().mean())
        assert differ < 0.01  # float rounding of the feedback may move a code at a midpoint
