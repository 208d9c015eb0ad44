"""llama.cpp's ggml types as configs: distance to the rate-distortion bound and quantization cost.

On i.i.d. Gaussian weights (see bench_formats.py for the bound D(R) = σ²·2^(-2R)), one row per
ggml config and, as the baseline of the same run, nf4 with 8-bit scales: bits per weight (ggml's
block bytes), error D/σ², bits above the bound, and the time of one quantize-dequantize on the CPU
(the LoftQ step) with its ratio to the baseline's. The k-quants run llama.cpp's reference search
(16 to 21 candidate grids per sub-block, C's summation order), the block-32 types one pass.

    python benchmarks/bench_ggml.py [--rows 2048] [--cols 2048] [--repeats 3]
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import time

import torch

from bitalloc.quant import QuantConfig, fake_quantize
from bitalloc.quant.ggml import TYPES

BASELINE = "nf4-b64-s8b256"


def measure(weight: torch.Tensor, config: str, repeats: int) -> tuple[float, float, float]:
    """(bits per weight, relative squared error, best seconds of ``repeats`` quantizations)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        q = fake_quantize(weight, config)
        times.append(time.perf_counter() - start)
    error = float(((q - weight) ** 2).mean() / weight.var())
    return QuantConfig.parse(config).storage_bits(tuple(weight.shape)) / weight.numel(), error, min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--cols", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    weight = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(0))
    print(f"{datetime.date.today()} {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, Gaussian {args.rows}x{args.cols}")  # fmt: skip
    print("| config | type | bits/weight | D/σ² | above the bound (bits) | ms | × nf4 time |")
    print("|---|---|---|---|---|---|---|")
    base_time = None
    for config in [BASELINE, *TYPES]:
        bits, error, seconds = measure(weight, config, args.repeats)
        base_time = base_time or seconds
        name = TYPES[config].name if config in TYPES else "-"
        above = bits - 0.5 * math.log2(1 / error)
        print(f"| {config} | {name} | {bits:.4f} | {error:.5f} | {above:.3f} | {seconds * 1000:.0f} | "
              f"{seconds / base_time:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
