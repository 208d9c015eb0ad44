"""Peak memory in depth, and at 7B width: profile (weight and output objectives), apply, eval.

1. Depth: a generated TinyLlama-shaped fp16 llama (d 2048, d_ff 5632, 16 layers). Profile the
   first 4 layers and all 16 (one config, T=1, r=16) with the weight objective and with the
   output objective (random calibration token ids), each in a fresh process (VmHWM). The growth
   from 4 to 16 layers is compared with the fp16 bytes the 12 added layers hold (goal: within 2%).
2. 7B width: a generated llama-7B-shaped model (d 4096, d_ff 11008, vocabulary 32000) with 2
   and with 4 layers. Peak RSS of `apply` (one config, T=1, r=16, weight objective) and of
   `evaluate` on the applied folder (random token ids); the growth per layer extrapolates the
   peak to 32 layers.

    python benchmarks/bench_depth.py [--workdir /tmp/bench_depth] [--skip-width] [--skip-depth]
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_profile import LLAMA_7B, TINYLLAMA, llama_tensors, write_model  # noqa: E402

CONFIG = "nf4-b64-s8b256"

PROFILE = """
import bitalloc, torch
torch.set_num_threads(2)
ids = torch.randint(0, 32000, (4, 256), generator=torch.Generator().manual_seed(0))
extra = {{"calibration_ids": ids, "objective": "output"}} if {objective!r} == "output" else {{}}
bitalloc.profile({model!r}, {out!r}, configs=[{config!r}], rank=16, iters=1, include={include!r},
                 overwrite=True, quiet=True, **extra)
print("VmHWM_kB", [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])
"""

PLAN = """
import bitalloc, torch
torch.set_num_threads(2)
table = bitalloc.profile({model!r}, {table!r}, configs=[{config!r}], rank=16, iters=1, overwrite=True,
                         quiet=True)
bitalloc.plan(table, {bits!r}).save({plan!r})
"""

APPLY = """
import bitalloc, torch
torch.set_num_threads(2)
bitalloc.apply({model!r}, {plan!r}, {out!r}, quiet=True)
print("VmHWM_kB", [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])
"""

EVAL = """
import bitalloc, torch
torch.set_num_threads(2)
ids = torch.randint(0, 32000, (2, 256), generator=torch.Generator().manual_seed(1))
bitalloc.evaluate({out!r}, reference={model!r}, input_ids=ids, quiet=True)
print("VmHWM_kB", [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])
"""


def peak_mib(code: str) -> float:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    return int(result.stdout.split("VmHWM_kB")[-1].strip()) / 1024


def layer_bytes(dims: tuple) -> int:
    """fp16 bytes of one layer's tensors (matrices and norms)."""
    one = [shape for name, shape in llama_tensors(1, dims) if ".layers.0." in name]
    return sum(2 * _numel(shape) for shape in one)


def _numel(shape: tuple) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


def model(work: Path, name: str, layers: int, dims: tuple) -> Path:
    folder = work / name
    if not (folder / "config.json").exists():
        write_model(folder, layers, dims=dims)
    return folder


def depth(work: Path) -> None:
    deep = model(work, "tinyllama-16", 16, TINYLLAMA)
    added = 12 * layer_bytes(TINYLLAMA) / 2**20
    print("\n## profile peak RSS by depth (TinyLlama shapes, one config, T=1, r=16)\n")
    print(f"fp16 bytes of the 12 added layers: {added:.0f} MiB\n")
    print("| objective | 4 layers MiB | 16 layers MiB | growth MiB | growth / added weights |")
    print("|---|---|---|---|---|")
    for objective in ("weight", "output"):
        peaks = []
        for include in (r"layers\.[0-3]\.", None):
            out = str(work / f"profile-{objective}-{include is None}.parquet")
            code = PROFILE.format(model=str(deep), out=out, config=CONFIG, include=include,
                                  objective=objective)  # fmt: skip
            peaks.append(peak_mib(code))
        growth = peaks[1] - peaks[0]
        print(f"| {objective} | {peaks[0]:.0f} | {peaks[1]:.0f} | {growth:+.0f} | {growth / added:+.1%} |",
              flush=True)  # fmt: skip


def width(work: Path) -> None:
    from bitalloc.quant import QuantConfig

    bits = QuantConfig.parse(CONFIG).bits_per_param + 0.01
    rows = {}
    for layers in (2, 4):
        folder = model(work, f"llama7b-{layers}", layers, LLAMA_7B)
        out = work / f"applied-{layers}"
        subprocess.run(["rm", "-rf", str(out)], check=True)
        table, plan = str(work / f"table-7b-{layers}.parquet"), str(work / f"plan-7b-{layers}.json")
        subprocess.run([sys.executable, "-c", PLAN.format(model=str(folder), table=table, config=CONFIG,
                                                           bits=bits, plan=plan)], check=True)  # fmt: skip
        apply_peak = peak_mib(APPLY.format(model=str(folder), plan=plan, out=str(out)))
        eval_peak = peak_mib(EVAL.format(model=str(folder), out=str(out)))
        rows[layers] = (apply_peak, eval_peak)
        print(f"  {layers} layers: apply {apply_peak:.0f} MiB, eval {eval_peak:.0f} MiB", flush=True)
    per_layer = [(rows[4][i] - rows[2][i]) / 2 for i in range(2)]
    print("\n## 7B-shaped peak RSS (d 4096, d_ff 11008; one config, T=1, r=16)\n")
    print(f"fp16 bytes per layer: {layer_bytes(LLAMA_7B) / 2**20:.0f} MiB\n")
    print("| step | 2 layers MiB | 4 layers MiB | per layer MiB | 32 layers, extrapolated GiB |")
    print("|---|---|---|---|---|")
    for i, step in enumerate(("apply", "eval")):
        estimate = (rows[4][i] + 28 * max(per_layer[i], 0.0)) / 1024
        print(f"| {step} | {rows[2][i]:.0f} | {rows[4][i]:.0f} | {per_layer[i]:+.1f} | {estimate:.2f} |")
    print(json.dumps({"rows": rows}), file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/bench_depth")
    parser.add_argument("--skip-depth", action="store_true")
    parser.add_argument("--skip-width", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print(f"{platform.processor() or platform.machine()}, 2 threads, {datetime.date.today()}")
    if not args.skip_depth:
        depth(work)
    if not args.skip_width:
        width(work)


if __name__ == "__main__":
    main()
