"""What noticing every changed weight byte costs (digest format 2), on a generated 1.1B llama.

The profile hashes each matrix's stored bytes while it reads it; reusing a finished profile
trusts the recorded digests when the files' size and mtime are unchanged, and re-hashes
otherwise (or with --verify). Measured here, each against reading the same matrices
without hashing (the baseline every profile pays anyway):

1. read all selected matrices as float32 (baseline) vs read + sha256 of the stored bytes;
2. the check a reuse runs when nothing changed (file stats) vs a full re-hash (--verify);
3. peak memory of profiling the first 4 layers vs all layers (one config, T=1): peak RSS
   must not grow with depth.

    python benchmarks/bench_fingerprint.py [--layers 22] [--workdir /tmp/bench_fingerprint]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_profile import write_model  # noqa: E402

PROFILE_PEAK = """
import re, bitalloc, torch
torch.set_num_threads(1)
bitalloc.profile({model!r}, {out!r}, configs=["nf4-b64-s8b256"], rank=4, iters=1, include={include!r},
                 overwrite=True, quiet=True)
print("VmHWM_kB", [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])
"""


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_mib(model: Path, out: Path, include: str | None) -> float:
    code = PROFILE_PEAK.format(model=str(model), out=str(out), include=include)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(result.stdout.split("VmHWM_kB")[-1].strip()) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--workdir", default="/tmp/bench_fingerprint")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import bitalloc

    work = Path(args.workdir)
    model = work / f"llama-{args.layers}"
    if not (model / "config.json").exists():
        params = write_model(model, args.layers)
        print(f"generated {params / 1e9:.2f}B parameters in {model}")
    source = bitalloc.open_source(model)
    modules = source.modules()
    numel = sum(source.shape(m)[0] * source.shape(m)[1] for m in modules)
    read = timed(lambda: [source.read(m) for m in modules])
    read_hash = timed(lambda: [source.read_with_digest(m) for m in modules])
    digests = {m: source.tensor_digest(m) for m in modules}
    stats = source.file_stats()
    unchanged = timed(lambda: source.changed_modules(digests, stats))
    verify = timed(lambda: source.changed_modules(digests, stats, verify=True))
    print(f"\n## fingerprint cost: {len(modules)} matrices, {numel / 1e9:.2f}B parameters (fp16)")
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} thread, "
          f"{datetime.date.today()}\n")  # fmt: skip
    print("| step | seconds | vs reading |")
    print("|---|---|---|")
    print(f"| read every matrix as float32 (baseline) | {read:.2f} | 1.00x |")
    print(f"| read + sha256 of every stored byte (profile) | {read_hash:.2f} | {read_hash / read:.2f}x |")
    print(f"| reuse check, files unchanged (stats) | {unchanged:.4f} | {unchanged / read:.4f}x |")
    print(f"| reuse check with --verify (re-hash all) | {verify:.2f} | {verify / read:.2f}x |")
    shallow = peak_mib(model, work / "p4.parquet", r"layers\.[0-3]\.")
    deep = peak_mib(model, work / "pall.parquet", None)
    print("\n## peak RSS by depth (one config, T=1)\n\n| layers | peak RSS MiB |\n|---|---|")
    print(f"| 4 | {shallow:.0f} |\n| {args.layers} | {deep:.0f} |")
    print(
        f"\ndeep - shallow: {deep - shallow:+.0f} MiB "
        f"({(deep - shallow) / (args.layers - 4):+.1f} MiB per layer)"
    )


if __name__ == "__main__":
    main()
