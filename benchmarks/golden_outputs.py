"""Golden outputs: numbers and bytes that a refactor must leave exactly as they were.

Runs the public API and the CLI on (1) the demo model, weight-only, and (2) the first two
layers of SmolLM2 (GGUF), data-aware, and prints one JSON object: profile values, plan
JSON digests, and the sha256 of every tensor `apply` writes. `tests/test_golden.py` runs
the same function and compares with `tests/data/golden.json` (made before the layout
move of issue 9 and kept since).

    python benchmarks/golden_outputs.py > tests/data/golden.json
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

import torch
from common import smollm2_path

DEMO_CONFIGS = ["nf2-b64-s8b256", "nf3-b128-sfp16", "int4-b32-s8b64", "nf4-b64-s8b256"]
SMOL_CONFIGS = ["nf2-b64-s8b256", "nf3-b64-s8b256", "nf4-b64-s8b256"]
SMOL_INCLUDE = r"model\.layers\.[01]\."


def tensor_digests(folder: Path) -> dict[str, str]:
    """sha256 of every tensor (name -> digest of dtype, shape and bytes) in a folder's safetensors."""
    from safetensors import safe_open

    digests = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in sorted(handle.keys()):
                tensor = handle.get_tensor(key).contiguous()
                data = tensor.view(-1).view(torch.uint8).numpy().tobytes()
                head = f"{tensor.dtype}|{list(tensor.shape)}|".encode()
                digests[f"{folder.name}/{key}"] = hashlib.sha256(head + data).hexdigest()
    return digests


def profile_values(table) -> list[list]:
    columns = ["module", "config", "storage_bits", "error", "rel_error", "qlora_error"]
    if "weighted_error" in table.columns:
        columns.append("weighted_error")
    return [[row[c] for c in columns] for _, row in table[columns].iterrows()]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def cli(*args: str) -> None:
    from bitalloc.cli import main

    with contextlib.redirect_stdout(io.StringIO()):
        code = main([*args, "--quiet"] if args[0] in ("profile", "apply") else list(args))
    if code != 0:
        raise SystemExit(f"bitalloc {' '.join(args)} exited {code}")


def golden(work: Path) -> dict:
    import bitalloc

    torch.set_num_threads(1)
    out: dict = {}
    # (1) demo model, weight-only, through the API
    table = bitalloc.profile(None, work / "demo.parquet", configs=DEMO_CONFIGS, include=r"layer\.[01]\.",
                             quiet=True)  # fmt: skip
    out["demo_profile"] = profile_values(table)
    plan = bitalloc.plan(table, 3.0)
    out["demo_plan_sha256"] = sha(plan.to_json().replace(str(plan.model["source"]), "<source>"))
    plan.save(work / "demo-plan.json")
    bitalloc.apply(None, work / "demo-plan.json", work / "demo-out", quiet=True)
    out["demo_tensors"] = tensor_digests(work / "demo-out" / "quantized")
    out["demo_tensors"].update(tensor_digests(work / "demo-out" / "adapter"))
    # (2) SmolLM2, first two layers, data-aware, through the CLI
    gguf = smollm2_path()
    configs = ",".join(SMOL_CONFIGS)
    cli("profile", str(gguf), "-o", str(work / "smol.parquet"), "--configs", configs, "--include",
        SMOL_INCLUDE, "--calibration", "default", "--objective", "activation", "--iters", "2")  # fmt: skip
    table = bitalloc.read_profile(work / "smol.parquet")
    out["smol_profile"] = profile_values(table)
    cli(
        "plan", "--profile", str(work / "smol.parquet"), "--budget", "3.0", "-o", str(work / "smol-plan.json")
    )
    text = (work / "smol-plan.json").read_text()
    out["smol_plan_sha256"] = sha(text.replace(str(gguf), "<source>"))
    cli("apply", str(gguf), "--plan", str(work / "smol-plan.json"), "-o", str(work / "smol-out"))
    out["smol_tensors"] = tensor_digests(work / "smol-out" / "quantized")
    out["smol_tensors"].update(tensor_digests(work / "smol-out" / "adapter"))
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        json.dump(golden(Path(folder)), sys.stdout, indent=1, sort_keys=True)
        print()


if __name__ == "__main__":
    main()
