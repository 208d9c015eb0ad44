"""The GPU path, checked and timed in one run (under 8 minutes on one H100/H200).

(a) the device tests (tests/test_cuda.py: every test on the CPU and on CUDA);
(b) profile of a generated 7B-shaped llama (d 4096, d_ff 11008, 32 heads; ``--layers``
    blocks, default grid, output objective, T=5) extrapolated to 32 layers, with peak GPU
    memory (target: < 5 minutes for 32 layers);
(c) QuantLinear forward+backward at 2/3/4 bits against a dense bf16 nn.Linear (and
    bitsandbytes NF4 when installed), batch 4 x 2048 tokens at 7B width, 4096 -> 11008
    (target: <= 1.5x the dense step);
(d) profile equality CPU vs CUDA on one 4096 x 4096 matrix, every config of the grid.

It prints one table: check, figure, target, verdict. ``--dry-run`` runs the same code paths
at tiny sizes on the CPU (no GPU needed; the test suite runs it), so the script is known
to work before a GPU is lent.

    python benchmarks/gpu_check.py [--layers 2] [--dry-run] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from common import timed
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
BITS = (2, 3, 4)
FULL_LAYERS = 32


@dataclass(frozen=True)
class Sizes:
    """What a run measures: 7B shapes on a GPU, tiny ones for ``--dry-run``."""

    hidden: int
    ffn: int
    heads: int
    vocab: int
    tokens: int  # calibration tokens (b)
    batch: tuple[int, int]  # (sequences, length) for (c)
    repeats: int


FULL = Sizes(hidden=4096, ffn=11008, heads=32, vocab=32000, tokens=4096, batch=(4, 2048), repeats=5)
TINY = Sizes(hidden=64, ffn=128, heads=2, vocab=256, tokens=128, batch=(2, 32), repeats=1)


# ---- (a) ------------------------------------------------------------------------------


def device_tests(dry_run: bool) -> dict:
    selection = ["tests/test_cuda.py"] + (["-k", "quantlinear and dtype0"] if dry_run else [])
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    summary = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return {
        "check": "(a) device tests (tests/test_cuda.py)",
        "figure": summary.strip("= "),
        "target": "all pass",
        "ok": done.returncode == 0,
        "seconds": time.perf_counter() - start,
    }


# ---- (b) ------------------------------------------------------------------------------


def write_llama(folder: Path, sizes: Sizes, layers: int) -> None:
    """A random llama of ``sizes`` with ``layers`` blocks as bf16 safetensors, one tensor
    generated at a time (nothing else in memory)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    config = LlamaConfig(
        hidden_size=sizes.hidden, intermediate_size=sizes.ffn, num_hidden_layers=layers,
        num_attention_heads=sizes.heads, num_key_value_heads=sizes.heads, vocab_size=sizes.vocab,
        architectures=["LlamaForCausalLM"],
    )  # fmt: skip
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    d, f = sizes.hidden, sizes.ffn
    shapes = {
        "model.embed_tokens.weight": (sizes.vocab, d),
        "model.norm.weight": (d,),
        "lm_head.weight": (sizes.vocab, d),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{p}self_attn.{name}.weight"] = (d, d)
        shapes.update({f"{p}mlp.gate_proj.weight": (f, d), f"{p}mlp.up_proj.weight": (f, d),
                       f"{p}mlp.down_proj.weight": (d, f), f"{p}input_layernorm.weight": (d,),
                       f"{p}post_attention_layernorm.weight": (d,)})  # fmt: skip
    tensors = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def profile_7b(device: torch.device, sizes: Sizes, layers: int, work: Path) -> dict:
    import bitalloc
    from bitalloc.profiling.settings import ProfileSettings

    folder = work / "model"
    write_llama(folder, sizes, layers)
    ids = torch.randint(0, sizes.vocab, (sizes.tokens // 512 or 1, min(512, sizes.tokens)),
                        generator=torch.Generator().manual_seed(1))  # fmt: skip
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    stats: dict = {}
    start = time.perf_counter()
    table = bitalloc.profile(
        str(folder), work / "profile.parquet", objective="output", calibration_ids=ids, iters=5,
        device=str(device), quiet=True, stats=stats,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    configs = len(ProfileSettings().grid())
    assert len(table) == layers * 7 * configs, len(table)
    estimate = seconds / layers * FULL_LAYERS
    return {
        "check": f"(b) profile {sizes.hidden}/{sizes.ffn}, {layers} layers, {configs} configs, output, T=5",
        "figure": f"{seconds:.1f} s ({stats.get('calibration', 0.0):.1f} s calibration) -> "
        f"{estimate / 60:.1f} min for {FULL_LAYERS} layers; peak GPU {peak / 2**30:.1f} GiB",
        "target": f"< 5 min for {FULL_LAYERS} layers",
        "ok": estimate < 300 if sizes is FULL else bool(table["weighted_error"].notna().all()),
        "seconds": seconds,
    }


# ---- (c) ------------------------------------------------------------------------------


def quantlinear_speed(device: torch.device, sizes: Sizes) -> list[dict]:
    from bitalloc.artifacts.nn import QuantLinear
    from bitalloc.quant import QuantizedTensor

    dtype = torch.bfloat16
    torch.manual_seed(0)
    weight = torch.randn(sizes.ffn, sizes.hidden) / sizes.hidden**0.5
    dense = nn.Linear(sizes.hidden, sizes.ffn, bias=False, device=device, dtype=dtype)
    dense.weight.data.copy_(weight)
    dense.weight.requires_grad_(False)
    layers = [("dense bf16 nn.Linear", dense)]
    for bits in BITS:
        packed = QuantizedTensor.from_weight(weight, f"nf{bits}-b64-s8b256").to(device)
        layers.append((f"QuantLinear nf{bits}-b64-s8b256", QuantLinear.from_quantized(packed, dtype=dtype)))
    try:
        import bitsandbytes as bnb

        if device.type == "cuda":
            nf4 = bnb.nn.Linear4bit(
                sizes.hidden, sizes.ffn, bias=False, compute_dtype=dtype, quant_type="nf4"
            )
            nf4.weight = bnb.nn.Params4bit(weight.to(dtype), requires_grad=False, quant_type="nf4")
            layers.append(("bitsandbytes NF4", nf4.to(device)))
    except ImportError:
        pass
    x = torch.randn(*sizes.batch, sizes.hidden, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(*sizes.batch, sizes.ffn, device=device, dtype=dtype)
    rows, baseline = [], None
    for name, layer in layers:

        def step(layer=layer):
            x.grad = None
            layer(x).backward(grad)

        seconds = timed(step, device, sizes.repeats)
        baseline = baseline or seconds
        ratio = seconds / baseline
        tokens = sizes.batch[0] * sizes.batch[1]
        quantlinear = name.startswith("QuantLinear")
        rows.append({
            "check": f"(c) fwd+bwd {name}",
            "figure": f"{seconds * 1e3:.2f} ms, {tokens / seconds / 1e3:.0f}k tokens/s, {ratio:.2f}x dense",
            "target": "<= 1.5x dense" if quantlinear else "",
            "ok": ratio <= 1.5 if quantlinear and device.type == "cuda" else True,  # CPU: no target
            "seconds": seconds,
        })  # fmt: skip
    return rows


# ---- (d) ------------------------------------------------------------------------------


def cpu_vs_device(device: torch.device, sizes: Sizes) -> dict:
    from bitalloc.lora import loftq
    from bitalloc.profiling.settings import ProfileSettings

    torch.manual_seed(2)
    weight = torch.randn(sizes.hidden, sizes.hidden) * 0.02
    worst = 0.0
    start = time.perf_counter()
    for config in ProfileSettings().grid():
        on_cpu = loftq(weight, config, rank=16, iters=5, seed=7, device="cpu")
        on_device = loftq(weight, config, rank=16, iters=5, seed=7, device=device)
        worst = max(worst, abs(on_device.rel_error / on_cpu.rel_error - 1))
    return {
        "check": f"(d) LoftQ rel_error CPU vs {device.type}, {sizes.hidden}x{sizes.hidden}, default grid",
        "figure": f"max relative difference {worst:.2e}",
        "target": "<= 1e-3",
        "ok": worst <= 1e-3,
        "seconds": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=2, help="blocks of the generated 7B-shaped model")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU: the same code paths")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, sizes = torch.device("cpu"), TINY
    elif torch.cuda.is_available():
        device, sizes = torch.device("cuda"), FULL
    else:
        print("gpu_check: no CUDA device here (use --dry-run on a CPU machine)", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run, tiny sizes)"
    print(f"gpu_check on {name}, torch {torch.__version__}")
    rows = [device_tests(args.dry_run)]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        rows.append(profile_7b(device, sizes, args.layers, Path(work)))
    rows += quantlinear_speed(device, sizes)
    rows.append(cpu_vs_device(device, sizes))
    width = max(len(r["check"]) for r in rows)
    print(f"{'check':<{width}}  {'figure':<70}  {'target':<24}  verdict")
    for row in rows:
        verdict = "ok" if row["ok"] else "FAIL"
        print(f"{row['check']:<{width}}  {row['figure']:<70}  {row['target']:<24}  {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
