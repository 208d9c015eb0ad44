"""Opening a GGUF file again within one process: parsed once, or every time.

One ``bitalloc profile`` of a GGUF file opens it several times (selection, calibration, the
model skeleton per pass) and builds its transformers config and tokenizer from the metadata
more than once. bitalloc keeps the parsed file and the rebuilt config files per process,
keyed by the file's identity (path, inode, size, modification time). This prints, for the
SmolLM2 GGUF file, each operation with every cache lookup missing (the baseline: what
every open cost before) against the same operation repeated with the cache kept, and a
data-aware profile of its first two layers both ways (median of ``--repeats``).

    python benchmarks/bench_gguf_open.py [--repeats 3] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import smollm2_path


def _timed(action, repeats: int, cold: bool) -> float:
    """Median seconds of ``action``; ``cold``: every lookup misses (a fresh key per call), as
    if nothing were kept."""
    from bitalloc.checkpoints import gguf

    keyed = gguf._identity
    fresh = iter(range(10**9))
    if cold:
        gguf._identity = lambda path: (*keyed(path), next(fresh))
    else:
        action()  # fills the cache: the timed repeats are what every later open costs
    try:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            action()
            times.append(time.perf_counter() - start)
    finally:
        gguf._identity = keyed
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true", help="also a 2-layer data-aware profile")
    args = parser.parse_args()
    import bitalloc
    from bitalloc.checkpoints import GGUFSource

    path = smollm2_path()
    work = Path(tempfile.mkdtemp(prefix="bench-gguf-"))
    counter = iter(range(10**6))
    actions = {
        "open (parse metadata)": lambda: GGUFSource(path),
        "write config + tokenizer": lambda: GGUFSource(path).write_config(work / f"c{next(counter)}"),
    }
    if args.profile:

        def profile() -> None:
            bitalloc.profile(path, work / f"p{next(counter)}.parquet", calibration="default",
                             objective="activation", configs=["nf2-b64-s8b256"],
                             include=r"model\.layers\.[01]\.", iters=1, quiet=True)  # fmt: skip

        actions["profile, 2 layers, data-aware"] = profile
    GGUFSource(path).write_config(work / "warm-up")  # imports, page cache
    print("| operation | parsed every time (s) | kept per process (s) | ratio |")
    print("|---|---|---|---|")
    for name, action in actions.items():
        cold = _timed(action, args.repeats, cold=True)
        warm = _timed(action, args.repeats, cold=False)
        print(f"| {name} | {cold:.2f} | {warm:.2f} | {cold / warm:.1f}x |")


if __name__ == "__main__":
    main()
