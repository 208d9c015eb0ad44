"""Planner benchmark: a LLaMA-70B-sized allocation (560 matrices x 36 configs), CBC vs HiGHS vs DP.

    python benchmarks/bench_plan.py [--profile demo_profile.parquet] [--seed 0] [--repeat 3] [--seeds 1]

Error-vs-config curves come from a profiler table (--profile) or, without one, from a
synthetic curve (error ~ 2^(-2 bits/param), shaped by method, block size and scale storage).
Every matrix's curve is scaled by lognormal(0, 2) with +-5% noise per entry (seeded).
Prints the time of `plan()` to a proven optimum per solver (reading the table and building
the model included): CBC (default), HiGHS, and the exact dynamic program, with ratios; a
10-budget sweep; the optimal error against the uniform and LoftQ first-k-layers baselines;
and with --seeds N the worst single-budget time over N seeds (branch and bound has a tail).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version

import numpy as np
import pandas as pd

from bitalloc.planning.planner import parse_sweep, plan, sweep
from bitalloc.planning.report import first_k_layers_baseline, uniform_baselines
from bitalloc.quant import QuantConfig

LLAMA_70B = {  # (out, in) of each linear layer in one decoder block
    "self_attn.q_proj": (8192, 8192),
    "self_attn.k_proj": (1024, 8192),
    "self_attn.v_proj": (1024, 8192),
    "self_attn.o_proj": (8192, 8192),
    "mlp.gate_proj": (28672, 8192),
    "mlp.up_proj": (28672, 8192),
    "mlp.down_proj": (8192, 28672),
}
LAYERS = 80
CONFIGS = [  # 2 codebooks x 3 bit widths x 3 block sizes x 2 scale storages = 36
    f"{method}{bits}-b{block}-s{scale}"
    for method in ("nf", "int")
    for bits in (2, 3, 4)
    for block in (32, 64, 128)
    for scale in ("fp16", "8b256")
]
BUDGETS = (2.5, 3.0, 3.5)
SOLVERS = ("cbc", "highs", "dp")
SWEEP = "2.25:4.5:0.25"
HIGH, LOW = "nf4-b64-s8b256", "nf2-b64-s8b256"  # LoftQ's mix, LQ-LoRA's scale storage


def synthetic_curve() -> dict[str, float]:
    """Error per parameter of a unit-variance matrix, for each config (illustrative)."""
    curve = {}
    for text in CONFIGS:
        config = QuantConfig.parse(text)
        shape = 1.25 if config.method == "int" else 1.0  # uniform levels fit Gaussians worse
        shape *= (config.block_size / 64) ** 0.2  # bigger blocks: larger absmax per block
        shape *= 1.03 if config.quantized_scales else 1.0  # 8-bit scales add a little error
        curve[text] = 2.0 ** (-2 * config.bits) * shape
    return curve


def profile_curve(path: str) -> dict[str, float]:
    """Per-config error relative to each matrix's mean, averaged (geometric) over matrices."""
    table = pd.read_parquet(path)
    table = table[table["module"].isin(_complete_modules(table))]
    per_param = table["error"].clip(lower=1e-30) / table["numel"]
    relative = np.log(per_param) - np.log(per_param).groupby(table["module"]).transform("mean")
    curve = np.exp(relative.groupby(table["config"]).mean())
    return {str(QuantConfig.parse(c)): float(v) for c, v in curve.items()}


def _complete_modules(table: pd.DataFrame) -> list[str]:
    counts = table.groupby("module")["config"].nunique()
    return list(counts[counts == counts.max()].index)


def build_table(curve: dict[str, float], seed: int) -> pd.DataFrame:
    """560 matrices with LLaMA-70B shapes; each curve scaled by lognormal(0, 2), +-5% noise."""
    rng = np.random.default_rng(seed)
    configs = {text: QuantConfig.parse(text) for text in curve}
    rows = []
    for layer in range(LAYERS):
        for kind, shape in LLAMA_70B.items():
            numel = shape[0] * shape[1]
            scale = rng.lognormal(0.0, 2.0)
            for text, config in configs.items():
                error = numel * curve[text] * scale * rng.uniform(0.95, 1.05)
                rows.append(
                    {
                        "module": f"model.layers.{layer}.{kind}",
                        "shape": list(shape),
                        "numel": numel,
                        "config": text,
                        "method": config.method,
                        "bits": config.bits,
                        "block_size": config.block_size,
                        "bits_per_param": config.bits_per_param,
                        "storage_bits": config.storage_bits(shape),
                        "error": error,
                        "rel_error": float(np.sqrt(error / numel)),
                        "qlora_error": error * 1.3,
                        "rank": 16,
                        "iters": 5,
                    }
                )
    return pd.DataFrame(rows)


def timed(function, repeat: int):
    """(median seconds, last result) over ``repeat`` calls."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", help="a profiler Parquet file to take the curves from")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="runs per timing (median)")
    parser.add_argument("--seeds", type=int, default=1, help="also report the worst sweep time over N seeds")
    args = parser.parse_args(argv)

    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"bitalloc planner benchmark  {now}")
    print(
        f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}, pulp {version('pulp')}, scipy {version('scipy')}"
    )
    if args.profile:
        curve = profile_curve(args.profile)
        print(f"curves: from {args.profile} ({len(curve)} configs)")
        if HIGH not in curve or LOW not in curve:
            print(f"  (no {HIGH}/{LOW} in the profile: first-k baseline skipped)")
    else:
        curve = synthetic_curve()
        print("curves: SYNTHETIC (no --profile): error ~ 2^(-2 bits) shaped by config")
    table = build_table(curve, args.seed)
    matrices = table["module"].nunique()
    print(
        f"problem: {matrices} matrices x {len(curve)} configs = {len(table)} rows, "
        f"{table.groupby('module')['numel'].first().sum() / 1e9:.1f}B parameters, "
        f"per-matrix scale lognormal(0, 2), seed {args.seed}, median of {args.repeat} runs\n"
    )

    header = (
        f"{'budget':>6}  {'cbc s':>7}  {'highs s':>7}  {'dp s':>7}  {'cbc/highs':>9}  {'cbc/dp':>7}  "
        f"{'achieved':>8}  {'objective':>13}  {'max rel diff':>12}  {'uniform/opt':>11}  {'first-k/opt':>11}"
    )
    print(header)
    print("-" * len(header))
    for budget in BUDGETS:
        times, plans = {}, {}
        for solver in SOLVERS:
            times[solver], plans[solver] = timed(
                lambda b=budget, s=solver: plan(table, b, solver=s), args.repeat
            )
        best = plans["cbc"].total_error
        difference = max(abs(p.total_error - best) / best for p in plans.values())
        uniform = uniform_baselines(table, budget)
        uniform_ratio = f"{uniform[0].error / best:.2f}x" if uniform else "none fits"
        first_k = None
        if HIGH in curve and LOW in curve:
            first_k = first_k_layers_baseline(table, budget, high=HIGH, low=LOW)
        first_k_ratio = f"{first_k.error / best:.2f}x" if first_k else "n/a"
        print(
            f"{budget:>6g}  {times['cbc']:>7.3f}  {times['highs']:>7.3f}  {times['dp']:>7.3f}  "
            f"{times['cbc'] / times['highs']:>8.2f}x  {times['cbc'] / times['dp']:>6.1f}x  "
            f"{plans['cbc'].achieved_bits:>8.4f}  {best:>13.6g}  {difference:>12.1e}  "
            f"{uniform_ratio:>11}  {first_k_ratio:>11}"
        )
    budgets = parse_sweep(SWEEP)
    print()
    for solver in SOLVERS:
        sweep_time, plans = timed(lambda s=solver: sweep(table, budgets, solver=s), 1)
        print(
            f"sweep {SWEEP} ({len(plans)} budgets, {solver:>5}): {sweep_time:7.3f} s "
            f"({sweep_time / len(plans):.3f} s per budget; the table is read once)"
        )
    print(
        "\nuniform/opt, first-k/opt: error of the best uniform config and of LoftQ's "
        f"'first k layers {HIGH}, rest {LOW}' (largest k that fits) over the optimum"
    )
    if args.seeds > 1:
        print(f"\nworst case over seeds {args.seed}..{args.seed + args.seeds - 1} x sweep {SWEEP}:")
        worst = dict.fromkeys(SOLVERS, (0.0, None))
        for seed in range(args.seed, args.seed + args.seeds):
            seeded = build_table(curve, seed)
            for budget in budgets:
                for solver in SOLVERS:
                    elapsed, _ = timed(lambda b=budget, s=solver, t=seeded: plan(t, b, solver=s), 1)
                    if elapsed > worst[solver][0]:
                        worst[solver] = (elapsed, (seed, budget))
        for solver, (elapsed, (seed, budget)) in worst.items():
            print(f"  {solver:>5}: {elapsed:7.3f} s (seed {seed}, budget {budget:g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
