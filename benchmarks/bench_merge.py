"""Peak memory of `bitalloc merge` (streamed) against the in-memory route on a generated llama.

A random llama of about 110M parameters (hidden 768, 8 layers, vocab 32000, bf16 on disk,
about 220 MB) is profiled with one config (nf4-b64-s8b256, r=16, T=1), planned and
applied once (cached in the work folder). Then, each in a fresh process (peak RSS from
getrusage):

- streamed: ``bitalloc.merge(OUT, MERGED)`` (bf16);
- in memory: ``from_pretrained(OUT/quantized, dtype=bf16)`` + ``PeftModel.from_pretrained``
  + ``merge_and_unload()`` + ``save_pretrained`` (the same bf16 result);
- imports only: the same imports and nothing else (what a process costs before any work).

Both outputs are compared tensor by tensor (they must be equal). Usage:
``python benchmarks/bench_merge.py [WORK_DIR]``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

IMPORTS = "import resource, sys, time, torch, transformers, peft, bitalloc\ntorch.set_num_threads(2)\n"
REPORT = "print('RESULT', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
ROUTES = {
    "imports only": "pass\n",
    "streamed (bitalloc merge)": "bitalloc.merge(sys.argv[1], sys.argv[2], quiet=True)\n",
    "in memory (merge_and_unload)": (
        "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1] + '/quantized', dtype=torch.bfloat16)\n"
        "import warnings\nwarnings.simplefilter('ignore')\n"
        "m = PeftModel.from_pretrained(m, sys.argv[1] + '/adapter').merge_and_unload()\n"
        "m.save_pretrained(sys.argv[2])\n"
    ),
}


def build(work: Path) -> Path:
    """The applied OUT of the generated model (built once, kept in ``work``)."""
    out = work / "out"
    if out.is_dir():
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import bitalloc

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
                         num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)  # fmt: skip
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(work / "model")
    table = bitalloc.profile(work / "model", configs=["nf4-b64-s8b256"], rank=16, iters=1, quiet=True)
    plan = bitalloc.plan(table, 8.0)
    return bitalloc.apply(work / "model", plan, out, quiet=True)


def measure(route: str, out: Path, target: Path) -> tuple[float, float]:
    """(seconds, peak RSS MiB) of one route in a fresh process."""
    shutil.rmtree(target, ignore_errors=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", IMPORTS + ROUTES[route] + REPORT, str(out), str(target)],
                            capture_output=True, text=True, check=False)  # fmt: skip
    if result.returncode != 0:
        raise SystemExit(f"{route} failed:\n{result.stderr[-3000:]}")
    peak = float(result.stdout.split("RESULT")[-1].split()[0])
    return time.perf_counter() - start, peak


def compare(first: Path, second: Path) -> float:
    """The largest absolute difference between the two checkpoints' tensors."""
    from safetensors.torch import load_file

    def tensors(folder: Path) -> dict:
        found = {}
        for file in sorted(folder.glob("*.safetensors")):
            found.update(load_file(file))
        return found

    a, b = tensors(first), tensors(second)
    if set(a) != set(b):
        raise SystemExit(f"the outputs hold different tensors: {sorted(set(a) ^ set(b))[:3]}")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main() -> None:
    work = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.gettempdir()) / "bitalloc-bench-merge"
    work.mkdir(parents=True, exist_ok=True)
    out = build(work)
    size = sum(f.stat().st_size for f in (work / "model").glob("*.safetensors")) / 2**20
    packed = sum(f.stat().st_size for f in (out / "quantized").glob("*.safetensors")) / 2**20
    results = {route: measure(route, out, work / f"merged-{i}") for i, route in enumerate(ROUTES)}
    difference = compare(work / "merged-1", work / "merged-2")
    merged = sum(f.stat().st_size for f in (work / "merged-1").glob("*.safetensors")) / 2**20
    print(f"model {size:.0f} MiB bf16, OUT/quantized weights {packed:.0f} MiB, merged {merged:.0f} MiB bf16")
    print(f"streamed vs in-memory outputs: max |difference| {difference}\n")
    base = results["in memory (merge_and_unload)"][1]
    imports = results["imports only"][1]
    print("| route | seconds | peak RSS MiB | above imports MiB | ratio to in memory |")
    print("|---|---|---|---|---|")
    for route, (seconds, peak) in results.items():
        print(f"| {route} | {seconds:.1f} | {peak:.0f} | {peak - imports:.0f} | {peak / base:.2f} |")
    print(json.dumps({route: {"seconds": s, "peak_mib": p} for route, (s, p) in results.items()}))


if __name__ == "__main__":
    main()
