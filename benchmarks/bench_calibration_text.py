"""Tokenizing a large calibration text: only the prefix needed (`tokenize_prefix`) against
the whole text (what bitalloc did before), for the 256 and 8,192 tokens a profile asks for.

Each measurement runs in a fresh subprocess (peak RSS from getrusage). The tokenizer is a
byte-level BPE trained here on the built-in text (nothing downloaded); the text file is the
built-in text repeated to ``--mb`` megabytes. The baseline's memory grows with the file
(about 0.3 GB per MB with this tokenizer), so keep ``--mb`` modest on a shared machine.

    python benchmarks/bench_calibration_text.py [--mb 8]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast
from bitalloc.texts import tokenize, tokenize_prefix
tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_file(sys.argv[1]))
path, tokens, mode = sys.argv[2], int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
if mode == "whole":
    ids = tokenize(tok, open(path, encoding="utf-8").read())[:tokens]
else:
    ids = tokenize_prefix(tok, path, tokens)
seconds = time.perf_counter() - start
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": seconds, "rss_mib": rss, "ids": ids.tolist()}))
"""


def train(path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from bitalloc.texts import calibration_text

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=2000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    backend.train_from_iterator([calibration_text()[:300_000]], trainer)
    backend.save(str(path))


def measure(tokenizer: Path, text: Path, tokens: int, mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tokenizer), str(text), str(tokens), mode],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="size of the generated text file")
    args = parser.parse_args()
    from bitalloc.texts import calibration_text

    with tempfile.TemporaryDirectory() as folder:
        tokenizer, text = Path(folder) / "tokenizer.json", Path(folder) / "big.txt"
        train(tokenizer)
        block = calibration_text()
        with open(text, "w", encoding="utf-8") as handle:
            while handle.tell() < args.mb * 1e6:
                handle.write(block)
        size = text.stat().st_size / 1e6
        print(f"text {size:.1f} MB; times in s, peak RSS in MiB (fresh process each)")
        head = f"{'tokens':>7} {'whole s':>8} {'prefix s':>9} {'speed-up':>9}"
        print(head + f" {'whole MiB':>10} {'prefix MiB':>11} same ids")
        for tokens in (256, 8192):
            whole = measure(tokenizer, text, tokens, "whole")
            prefix = measure(tokenizer, text, tokens, "prefix")
            print(
                f"{tokens:>7} {whole['seconds']:>8.2f} {prefix['seconds']:>9.3f} "
                f"{whole['seconds'] / prefix['seconds']:>8.0f}x {whole['rss_mib']:>10.0f} "
                f"{prefix['rss_mib']:>11.0f} {whole['ids'] == prefix['ids']}"
            )


if __name__ == "__main__":
    main()
