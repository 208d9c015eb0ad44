"""QuantLinear against a 16-bit nn.Linear: forward and forward+backward time, memory kept.

A 4096x4096 layer on 8k tokens (batch 8 x 1024), weight frozen, gradient wrt the input
(what LoRA fine-tuning needs of the base layer). QuantLinear dequantizes its packed weight
in forward and again in backward; the table shows what that costs and what it saves.

    python benchmarks/bench_quantlinear.py [--size 4096] [--tokens 8192] [--dtype bf16]
"""

from __future__ import annotations

import argparse

import torch
from common import timed
from torch import nn

from bitalloc.artifacts.nn import QuantLinear
from bitalloc.quant import QuantizedTensor

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CONFIGS = ("nf4-b64-s8b256", "nf2-b64-s8b256")


def saved_bytes(layer: nn.Module, x: torch.Tensor) -> int:
    """Bytes autograd keeps for backward through ``layer``, not counting the input itself."""
    sizes = []

    def pack(tensor):
        if tensor.data_ptr() != x.data_ptr():
            sizes.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        layer(x)
    return sum(sizes)


def weight_bytes(layer: nn.Module) -> int:
    if isinstance(layer, QuantLinear):
        return sum(t.numel() * t.element_size() for t in layer.packed())
    return layer.weight.numel() * layer.weight.element_size()


def bench_device(device: torch.device, size: int, tokens: int, dtype: torch.dtype, repeats: int) -> list:
    torch.manual_seed(0)
    weight = torch.randn(size, size) / size**0.5
    dense = nn.Linear(size, size, bias=False, dtype=dtype, device=device)
    dense.weight.data.copy_(weight)
    dense.weight.requires_grad_(False)
    layers = [(f"nn.Linear {dtype_name(dtype)}", dense)]
    for config in CONFIGS:
        packed = QuantizedTensor.from_weight(weight, config).to(device)
        layers.append((f"QuantLinear {config}", QuantLinear.from_quantized(packed, dtype=dtype)))
    batch = max(1, tokens // 1024)
    x = torch.randn(batch, tokens // batch, size, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn_like(x)
    rows = []
    for name, layer in layers:

        def forward(layer=layer):
            with torch.no_grad():
                layer(x)

        def forward_backward(layer=layer):
            x.grad = None
            layer(x).backward(grad)

        rows.append(
            (
                str(device), name, weight_bytes(layer), saved_bytes(layer, x),
                timed(forward, device, repeats), timed(forward_backward, device, repeats),
            )
        )  # fmt: skip
    return rows


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--devices", default="cpu,cuda", help="comma-separated; cuda is skipped if absent")
    args = parser.parse_args()
    devices = [d for d in args.devices.split(",") if d != "cuda" or torch.cuda.is_available()]
    print(
        f"{args.size}x{args.size} layer, {args.tokens} tokens, {args.dtype}, median of {args.repeats}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
    )
    header = (
        f"{'device':<7} {'layer':<28} {'weight MB':>9} {'saved MB':>9} {'fwd ms':>9} "
        f"{'fwd+bwd ms':>11} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for device in devices:
        rows = bench_device(torch.device(device), args.size, args.tokens, DTYPES[args.dtype], args.repeats)
        baseline = rows[0][5]
        for dev, name, weight, saved, fwd, fwd_bwd in rows:
            print(
                f"{dev:<7} {name:<28} {weight / 2**20:>9.2f} {saved / 2**20:>9.2f} {fwd * 1e3:>9.1f} "
                f"{fwd_bwd * 1e3:>11.1f} {fwd_bwd / baseline:>6.2f}"
            )
    print("ratio: fwd+bwd time over the 16-bit nn.Linear's on the same device; saved: kept for backward")


if __name__ == "__main__":
    main()
