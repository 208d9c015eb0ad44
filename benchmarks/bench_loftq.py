"""LoftQ speed and error: bitalloc's core against a straightforward implementation of the paper.

The baseline, written here, is the paper's algorithm as published code does it: a full
SVD of the residual every iteration and a dense (numel x levels) nearest-value search.
Prints one row per (size, config): both times, the time ratio and the error ratio.
``--search`` prints instead the cost of the ``-mse`` scale search: the same config with and
without it (best of ``--repeat`` interleaved runs), the time ratio and both errors. ``--gptq``
prints the cost of ``-gptq`` rounding in the output objective (a synthetic input covariance of
correlated features): each config with ``-mse`` against ``-mse-gptq``, times and output errors.

    python benchmarks/bench_loftq.py [--sizes 2048,4096] [--device cpu|cuda] [--search | --gptq]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from bitalloc.lora import loftq
from bitalloc.quant import QuantConfig, codebook


def baseline_quantize(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Block absmax + dense argmin over the codebook: the reference code's quantizer."""
    levels = codebook(config.method, config.bits, weight.device)
    blocks = weight.reshape(-1, config.block_size)
    scales = blocks.abs().amax(dim=1, keepdim=True)
    normalized = blocks / scales
    index = (normalized.unsqueeze(-1) - levels).abs().argmin(dim=-1)
    return (levels[index] * scales).reshape(weight.shape)


def baseline_loftq(weight: torch.Tensor, config: QuantConfig, rank: int, iters: int) -> float:
    """The paper's alternating algorithm with full SVDs; returns the relative error."""
    lowrank = torch.zeros_like(weight)
    for _ in range(iters):
        q = baseline_quantize(weight - lowrank, config)
        u, s, vh = torch.linalg.svd(weight - q, full_matrices=False)
        lowrank = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return float((weight - q - lowrank).norm() / weight.norm())


def synthetic_weight(size: int, device: str) -> torch.Tensor:
    """A heavy-tailed matrix with some low-rank structure, like trained LLM weights."""
    generator = torch.Generator().manual_seed(size)
    weight = torch.distributions.StudentT(5.0).sample((size, size)) * 0.02
    weight += torch.randn(size, 32, generator=generator) @ torch.randn(32, size, generator=generator) * 2e-3
    return weight.to(device)


def timed(fn, *args, **kwargs):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="2048,4096")
    parser.add_argument("--configs", default="nf2-b64-sfp32,nf4-b64-sfp32")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--search", action="store_true", help="time the -mse scale search instead")
    parser.add_argument("--gptq", action="store_true", help="time -gptq rounding instead")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if args.search or args.gptq:
        suffix_cost(args, "-mse-gptq" if args.gptq else "-mse")
        return

    print(
        f"# bench_loftq  {datetime.date.today()}  {platform.machine()}  "
        f"{os.cpu_count()} cpus  torch {torch.__version__}  threads {torch.get_num_threads()}  "
        f"device {args.device}"
    )
    print(f"# rank {args.rank}, iters {args.iters}")
    header = f"{'size':>6} {'config':>15} {'baseline s':>11} {'bitalloc s':>11} {'speedup':>8} "
    header += f"{'base err':>9} {'ours err':>9} {'err ratio':>9}"
    print(header)
    for size in (int(s) for s in args.sizes.split(",")):
        weight = synthetic_weight(size, args.device)
        for text in args.configs.split(","):
            config = QuantConfig.parse(text)
            loftq(weight[:256, :256], config, rank=args.rank, iters=1)  # warm-up
            base_time, base_err = timed(baseline_loftq, weight, config, args.rank, args.iters)
            ours_time, result = timed(loftq, weight, config, rank=args.rank, iters=args.iters, keep_q=False)
            print(
                f"{size:>6} {text:>15} {base_time:>11.2f} {ours_time:>11.3f} "
                f"{base_time / ours_time:>7.1f}x {base_err:>9.5f} {result.rel_error:>9.5f} "
                f"{result.rel_error / base_err:>9.4f}",
                flush=True,
            )


def synthetic_covariance(size: int, device: str) -> torch.Tensor:
    """XᵀX/n of inputs with correlated features (a random mixing of Gaussian ones), float32."""
    generator = torch.Generator().manual_seed(size + 1)
    mixing = torch.randn(size, size, generator=generator) * (0.3 / size**0.5) + torch.eye(size)
    x = torch.randn(2 * size, size, generator=generator) @ mixing
    return (x.T @ x / x.shape[0]).to(device)


def suffix_cost(args, suffix: str) -> None:
    """LoftQ time per matrix-config with and without ``suffix`` (-mse: the scale search, weight
    error; -mse-gptq: GPTQ rounding against the -mse config, output error), interleaved."""
    gptq = suffix.endswith("-gptq")
    print(
        f"# bench_loftq {'--gptq' if gptq else '--search'}  {datetime.date.today()}  {platform.machine()}  "
        f"{os.cpu_count()} cpus  torch {torch.__version__}  threads {torch.get_num_threads()}  "
        f"device {args.device}  rank {args.rank}, iters {args.iters}, best of {args.repeat}"
    )
    names = ("-mse", "-mse-gptq") if gptq else ("plain", "-mse")
    header = f"{'size':>6} {'config':>26} {names[0] + ' s':>9} {names[1] + ' s':>11} {'ratio':>6} "
    print(header + f"{names[0] + ' err':>9} {names[1] + ' err':>13}")
    for size in (int(s) for s in args.sizes.split(",")):
        weight = synthetic_weight(size, args.device)
        options = {"input_covariance": synthetic_covariance(size, args.device)} if gptq else {}
        for text in args.configs.split(","):
            base = str(QuantConfig.parse(text + "-mse")) if gptq else text
            other = str(QuantConfig.parse(text + suffix))
            for config in (base, other):
                loftq(weight[:256, :256], config, rank=args.rank, iters=1)  # warm-up
            times = {base: [], other: []}
            errors = {}
            for _ in range(args.repeat):
                for config in (base, other):
                    took, result = timed(
                        loftq, weight, config, rank=args.rank, iters=args.iters, keep_q=False, **options
                    )
                    times[config].append(took)
                    errors[config] = result.weighted_errors[result.best_iter] if gptq else result.rel_error
            first, second = min(times[base]), min(times[other])
            print(
                f"{size:>6} {other:>26} {first:>9.3f} {second:>11.3f} {second / first:>6.2f} "
                f"{errors[base]:>9.5f} {errors[other]:>13.5f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
