"""Bad arguments to the public API raise BitallocError (one clear line), never RuntimeError,
TypeError or ValueError from deep inside; results never carry the caller's autograd graph."""

import json

import pytest
import torch

import bitalloc
from bitalloc.lora.decomposition import MAX_ITERS

W = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
CONFIG = "nf4-b32-sfp32"


@pytest.mark.parametrize(
    "call",
    [
        lambda: bitalloc.loftq(torch.empty(32, 64, device="meta"), CONFIG, rank=4),
        lambda: bitalloc.loftq_batch(torch.empty(2, 32, 64, device="meta"), CONFIG, rank=4),
        lambda: bitalloc.loftq(W, CONFIG, rank=4, device="meta"),
        lambda: bitalloc.loftq(W, CONFIG, rank=4, column_weights=torch.zeros(64)),
        lambda: bitalloc.loftq(W, CONFIG, rank=4, column_weights=torch.ones(63)),
        lambda: bitalloc.loftq(W, CONFIG, rank=4, column_weights=torch.ones(2, 64)),
        lambda: bitalloc.loftq(W, CONFIG, rank=4, column_weights=[1.0] * 64),
        lambda: bitalloc.loftq(W, CONFIG, rank=4, column_weights=torch.empty(64, device="meta")),
        lambda: bitalloc.loftq_batch(W[None], CONFIG, rank=4, column_weights=torch.ones(3, 64)),
        lambda: bitalloc.loftq(W, CONFIG, rank=4, input_covariance=[[1.0]]),
        lambda: bitalloc.loftq(W, CONFIG, rank=4, input_covariance=torch.eye(64, device="meta")),
        lambda: bitalloc.loftq(W, CONFIG, rank=4, iters=MAX_ITERS + 1),
        lambda: bitalloc.loftq(W, CONFIG, rank=4, iters=10**9),
        lambda: bitalloc.loftq(W, CONFIG, rank=4, seed="x"),
        lambda: bitalloc.loftq_batch(W[None], CONFIG, rank=4, seeds="a"),
        lambda: bitalloc.apply(None, None, "out"),
        lambda: bitalloc.apply(None, 5, "out"),
        lambda: bitalloc.load_quantized(123),
        lambda: bitalloc.load_quantized(None),
        lambda: bitalloc.read_profile(5),
        lambda: bitalloc.Plan.load(5),
    ],
    ids=["meta", "meta-batch", "device-meta", "cw-zero", "cw-length", "cw-2d", "cw-list", "cw-meta",
         "cw-batch", "cov-list", "cov-meta", "iters-max", "iters-huge", "seed-str", "seeds-str",
         "apply-none", "apply-int", "load-int", "load-none", "read-profile-int", "plan-load-int"],
)  # fmt: skip
def test_bad_argument_is_bitalloc_error(call, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(bitalloc.BitallocError) as caught:
        call()
    assert type(caught.value) is bitalloc.BitallocError and "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_iters_limit_is_in_the_plan_schema():
    from importlib import resources

    schema = json.loads(resources.files("bitalloc.planning").joinpath("plan.schema.json").read_text())
    assert schema["properties"]["defaults"]["properties"]["iters"]["maximum"] == MAX_ITERS
    bitalloc.loftq(W, CONFIG, rank=4, iters=MAX_ITERS)  # the limit itself is allowed


@pytest.mark.parametrize("weighted", ["none", "columns", "covariance"])
def test_requires_grad_input_gives_detached_results(weighted):
    weight = W.clone().requires_grad_(True)
    extra = {
        "none": {},
        "columns": {"column_weights": torch.rand(64, requires_grad=True) + 0.5},
        "covariance": {"input_covariance": (torch.eye(64) * 2).requires_grad_(True)},
    }[weighted]
    result = bitalloc.loftq(weight * 1.0, CONFIG, rank=4, iters=2, **extra)  # a non-leaf with a graph
    for tensor in (result.lora_A, result.lora_B, result.q.dequantize(), result.q.codes, result.q.scales):
        assert tensor.requires_grad is False and tensor.grad_fn is None
