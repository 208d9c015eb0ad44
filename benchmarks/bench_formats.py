"""Formats against the rate-distortion bound on Gaussian weights, with and without the -mse search.

For i.i.d. Gaussian weights of variance σ² no quantizer at R bits per weight has a squared error
below D(R) = σ²·2^(-2R). A format storing R bits per weight (codes, scales, zero points and
padding: `storage_bits` / numel) with error D sits R - ½·log2(σ²/D) bits above that bound.
Prints one row per (config): bits per weight, error D/σ² and the distance to the bound for
the absmax (or min-max) scales and for the searched ones, and the error ratio.

    python benchmarks/bench_formats.py [--rows 1024] [--cols 4096] [--bits 2,3,4]
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform

import torch

from bitalloc.quant import QuantConfig, fake_quantize

FAMILIES = (
    "nf{b}-b64-s8b256",
    "int{b}-b64-s8b256",
    "nf{b}-b64-sfp16",
    "int{b}-b128-sfp16",
    "uint{b}-b128-sfp16-z{b}",
    "uint{b}-b64-sfp16-z{b}",
    "uint{b}-b64-sfp16-zfp16",
)


def distance(rate: float, error: float) -> float:
    """Bits above the Gaussian rate-distortion bound: R - ½·log2(σ²/D), with σ² = 1."""
    return rate - 0.5 * math.log2(1.0 / error)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--bits", default="2,3,4")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    weight = torch.randn(args.rows, args.cols, generator=torch.Generator().manual_seed(args.seed))
    variance = float(weight.var())
    print(
        f"# bench_formats  {datetime.date.today()}  {platform.machine()}  torch {torch.__version__}  "
        f"Gaussian {args.rows}x{args.cols}, seed {args.seed}"
    )
    print(
        f"{'config':>26} {'bits/w':>7} {'D/σ² plain':>11} {'above':>6} {'D/σ² -mse':>10} {'above':>6} "
        f"{'ratio':>6}"
    )
    for bits in (int(b) for b in args.bits.split(",")):
        for family in FAMILIES:
            text = family.format(b=bits)
            config = QuantConfig.parse(text)
            rate = config.storage_bits((args.rows, args.cols)) / weight.numel()
            plain = float((weight - fake_quantize(weight, config)).square().mean()) / variance
            searched = float((weight - fake_quantize(weight, text + "-mse")).square().mean()) / variance
            print(
                f"{text:>26} {rate:>7.4f} {plain:>11.5f} {distance(rate, plain):>6.3f} {searched:>10.5f} "
                f"{distance(rate, searched):>6.3f} {plain / searched:>6.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
