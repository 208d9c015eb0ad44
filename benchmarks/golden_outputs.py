"""Golden outputs: numbers that a refactor must leave as they were, compared in a way that
holds on any machine of the project's kind.

Runs the public API and the CLI on (1) the demo model, weight-only, and (2) the first two
layers of SmolLM2 (GGUF), data-aware, and prints one JSON object: profile values, the plan
JSON (model source replaced by ``<source>``) and a summary of every tensor `apply` writes
(dtype, shape, norms and values at fixed sampled positions; per quantized matrix its codes
and dequantized values at sampled positions; per adapter matrix B·A at sampled positions,
which does not depend on the sign of each singular pair). `tests/test_golden.py` runs the
same function and compares: exactly what is exact by construction, floats and codes with
tolerances measured across thread counts and CPU code paths (see that file). The profile
values were recorded before the package layout move and kept since; the plan and tensor
summaries were recorded later from outputs whose sha256 digests equalled that recording's.

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


SAMPLES = 256  # sampled positions per tensor


def _positions(numel: int, salt: str) -> torch.Tensor:
    """Fixed flat positions (sorted, without repeats) in a tensor of ``numel`` elements."""
    seed = int.from_bytes(hashlib.sha256(salt.encode()).digest()[:8], "little")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=generator)[: min(SAMPLES, numel)].sort().values


def _floats(values: torch.Tensor, salt: str) -> dict:
    flat = values.detach().double().reshape(-1)
    return {"norm": flat.norm().item(), "sample": flat[_positions(flat.numel(), salt)].tolist()}


def tensor_digests(folder: Path) -> dict[str, str]:
    """sha256 of every tensor (name -> digest of dtype, shape and bytes) in a folder's safetensors
    (bit-exact: for checking a recording on the machine that made it, not for tests)."""
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


def tensor_summary(out: Path) -> dict:
    """What `apply` wrote to ``out``, summarized for tolerant comparison.

    ``tensors``: every stored tensor by ``folder/name``: dtype and shape, and for float
    tensors the norm. ``quantized``: per packed matrix, its
    codes at sampled positions (a string, one character per code: ``chr(48 + code)``) and its
    dequantized values. ``lora``: per adapted matrix, ‖A‖, ‖B‖ and B·A at sampled positions."""
    from safetensors.torch import load_file

    from bitalloc.quant import QuantizedTensor

    tensors: dict = {}
    stored: dict = {}
    for folder in (out / "quantized", out / "adapter"):
        for file in sorted(folder.glob("*.safetensors")):
            for key, tensor in sorted(load_file(str(file)).items()):
                name = f"{folder.name}/{key}"
                stored[name] = tensor
                entry = {"dtype": str(tensor.dtype), "shape": list(tensor.shape)}
                if tensor.is_floating_point():
                    entry["norm"] = tensor.double().norm().item()
                tensors[name] = entry
    quantized = {}
    info = json.loads((out / "quantized" / "bitalloc_quant.json").read_text())
    for module, entry in sorted(info["modules"].items()):
        parts = {
            part: stored[f"quantized/{module}.weight.{part}"]
            for part in ("codes", "scales", "scales2")
            if f"quantized/{module}.weight.{part}" in stored
        }
        q = QuantizedTensor.from_tensors(parts, entry["config"], tuple(entry["shape"]))
        codes = q.unpacked_codes()[:, : q.shape[1]].reshape(-1)
        at = _positions(codes.numel(), module)
        quantized[module] = {
            "codes": "".join(chr(48 + int(c)) for c in codes[at]),
            "dequantized": _floats(q.dequantize(), module),
        }
    lora = {}
    for name in sorted(stored):
        if name.endswith(".lora_A.weight"):
            a = stored[name].double()
            b = stored[name.replace(".lora_A.", ".lora_B.")].double()
            at = _positions(b.shape[0] * a.shape[1], name)
            rows, cols = at // a.shape[1], at % a.shape[1]
            product = (b[rows] * a[:, cols].T).sum(-1)
            module = name[len("adapter/") : -len(".lora_A.weight")]
            lora[module] = {"norm_A": a.norm().item(), "norm_B": b.norm().item(),
                            "product": product.tolist()}  # fmt: skip
    return {"tensors": tensors, "quantized": quantized, "lora": lora}


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


def golden(work: Path, digests: bool = False) -> dict:
    """Runs the two fixed runs in ``work`` with torch's thread settings as they are; with
    ``digests``, also the bit-exact sha256 of each plan JSON and stored tensor (``*_sha256``)."""
    import bitalloc

    out: dict = {}
    # (1) demo model, weight-only, through the API
    table = bitalloc.profile(None, work / "demo.parquet", configs=DEMO_CONFIGS, include=r"layer\.[01]\.",
                             quiet=True)  # fmt: skip
    out["demo_profile"] = profile_values(table)
    plan = bitalloc.plan(table, 3.0)
    out["demo_plan"] = json.loads(plan.to_json().replace(str(plan.model["source"]), "<source>"))
    plan.save(work / "demo-plan.json")
    bitalloc.apply(None, work / "demo-plan.json", work / "demo-out", quiet=True)
    out["demo_tensors"] = tensor_summary(work / "demo-out")
    if digests:
        out["demo_plan_sha256"] = sha(plan.to_json().replace(str(plan.model["source"]), "<source>"))
        out["demo_tensors_sha256"] = tensor_digests(work / "demo-out" / "quantized")
        out["demo_tensors_sha256"].update(tensor_digests(work / "demo-out" / "adapter"))
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
    out["smol_plan"] = json.loads(text.replace(str(gguf), "<source>"))
    cli("apply", str(gguf), "--plan", str(work / "smol-plan.json"), "-o", str(work / "smol-out"))
    out["smol_tensors"] = tensor_summary(work / "smol-out")
    if digests:
        out["smol_plan_sha256"] = sha(text.replace(str(gguf), "<source>"))
        out["smol_tensors_sha256"] = tensor_digests(work / "smol-out" / "quantized")
        out["smol_tensors_sha256"].update(tensor_digests(work / "smol-out" / "adapter"))
    return out


def main() -> None:
    """Records with one thread (as the first recording did); ``--threads N`` (0: torch's
    default) and ``--digests`` are for `golden_spread.py`."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--digests", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        json.dump(golden(Path(folder), args.digests), sys.stdout, indent=1, sort_keys=True)
        print()


if __name__ == "__main__":
    main()
