"""Size of `OUT/quantized` for SmolLM2-135M (the installed Q4_1 GGUF) at 3.5 bits/param, with
the tensors outside the plan written as float32 (the old behaviour, `--unplanned-dtype fp32`)
and as bitalloc writes them by default (a GGUF's quantized embedding as bf16), and with the
embedding stored packed (`--embedding int8-b32-sfp16`, or `ggml8-b32-s0`: llama.cpp's q8_0,
which stores the GGUF's Q8_0 embedding again without loss; both 8.5 bits per value), against
the GGUF.

The sizes do not depend on the LoRA rank or LoftQ iterations, so the profile and apply run
with rank 0 and one iteration (plain quantization: seconds, not minutes).

    python benchmarks/bench_sizes.py --work /tmp/bench_sizes
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from pathlib import Path

from common import smollm2_path

import bitalloc


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--budget", type=float, default=3.5)
    args = parser.parse_args()
    gguf = smollm2_path()
    args.work.mkdir(parents=True, exist_ok=True)
    configs = ["nf3-b64-s8b256", "nf4-b64-s8b256"]
    work = args.work
    table = bitalloc.profile(gguf, work / "profile.parquet", configs=configs, rank=0, iters=1, quiet=True)
    plan = bitalloc.plan(table, args.budget)
    rows = [("source GGUF (Q4_1, Q8_0 embedding)", gguf.stat().st_size)]
    for label, name, options in (
        ("OUT/quantized, unplanned fp32", "fp32", {"unplanned_dtype": "fp32"}),
        ("OUT/quantized, default (embedding bf16)", "default", {}),
        ("OUT/quantized, --embedding int8-b32-sfp16", "embedding", {"embedding_config": "int8-b32-sfp16"}),
        ("OUT/quantized, --embedding ggml8-b32-s0 (q8_0)", "q8_0", {"embedding_config": "ggml8-b32-s0"}),
    ):
        out = args.work / f"out-{name}"
        shutil.rmtree(out, ignore_errors=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bitalloc.apply(gguf, plan, out, quiet=True, device="cpu", **options)
        rows.append((label, folder_bytes(out / "quantized")))
    print(f"SmolLM2-135M, {len(plan.modules)} matrices at {plan.achieved_bits:.3f} bits/param")
    print("| artifact | MB | ratio to the GGUF |\n|---|---|---|")
    for label, size in rows:
        print(f"| {label} | {size / 1e6:.1f} | {size / rows[0][1]:.2f} |")


if __name__ == "__main__":
    main()
