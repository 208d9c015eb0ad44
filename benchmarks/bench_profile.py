"""Profiler memory and throughput.

1. Peak memory: generate a ~1.1B-parameter llama-shaped model (fp16 safetensors, 4
   shards; TinyLlama-1.1B shapes) and profile it with one config and T=1 through the
   normal CLI path, in a fresh process; report VmHWM (file-backed pages included)
   against the model's fp32 size and against a baseline that loads every shard with
   ``safetensors.torch.load_file`` (what a naive profiler does).
2. Throughput in matrix-configs/s with the read / quantize / factorize breakdown, and
   the speed-up over the paper's algorithm (full SVD, dense nearest-value search) on the
   same matrices.

    python benchmarks/bench_profile.py [--layers 22] [--workdir /tmp/bench_profile] [--keep]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import torch

HIDDEN, INTERMEDIATE, KV, VOCAB = 2048, 5632, 256, 32000
TINYLLAMA = (HIDDEN, INTERMEDIATE, KV, VOCAB)  # hidden, intermediate, k/v width, vocabulary
LLAMA_7B = (4096, 11008, 4096, 32000)


def llama_tensors(layers: int, dims: tuple = TINYLLAMA) -> list[tuple[str, tuple[int, ...]]]:
    HIDDEN, INTERMEDIATE, KV, VOCAB = dims  # noqa: N806
    names = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        names += [
            (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
            (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.v_proj.weight", (KV, HIDDEN)),
            (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
            (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
            (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE)),
            (p + "input_layernorm.weight", (HIDDEN,)),
            (p + "post_attention_layernorm.weight", (HIDDEN,)),
        ]
    names += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return names


def write_model(directory: Path, layers: int, shards: int = 4, dims: tuple = TINYLLAMA) -> int:
    """Stream a random fp16 llama to sharded safetensors; returns the parameter count."""
    HIDDEN, INTERMEDIATE, KV, VOCAB = dims  # noqa: N806
    directory.mkdir(parents=True, exist_ok=True)
    tensors = llama_tensors(layers, dims)
    per_shard = -(-len(tensors) // shards)
    weight_map, total = {}, 0
    generator = torch.Generator().manual_seed(0)
    for s in range(shards):
        part = tensors[s * per_shard : (s + 1) * per_shard]
        filename = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for name, shape in part:
            size = 2 * int(torch.tensor(shape).prod())
            header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = filename
        encoded = json.dumps(header).encode()
        encoded += b" " * (-len(encoded) % 8)
        with open(directory / filename, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)) + encoded)
            for _name, shape in part:
                tensor = (torch.randn(shape, generator=generator) * 0.02).to(torch.float16)
                handle.write(tensor.numpy().tobytes())
                total += tensor.numel()
    index = {"metadata": {"total_size": 2 * total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_hidden_layers": layers, "num_attention_heads": 32,
              "num_key_value_heads": 32 * KV // HIDDEN, "vocab_size": VOCAB,
              "torch_dtype": "float16"}  # fmt: skip
    (directory / "config.json").write_text(json.dumps(config))
    return total


PEAK = "print('VmHWM_kB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"


def run_python(code: str) -> tuple[float, int, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code + "\n" + PEAK], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(result.stderr[-3000:])
    peak = int(result.stdout.split("VmHWM_kB")[-1].strip().strip("[]'\" ").split()[0].strip("'"))
    return elapsed, peak * 1024, result.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--workdir", default="/tmp/bench_profile")
    parser.add_argument("--keep", action="store_true", help="keep the generated model")
    parser.add_argument("--throughput-layers", type=int, default=1)
    args = parser.parse_args()
    work = Path(args.workdir)
    model = work / "model"
    print(f"# bench_profile  {datetime.date.today()}  {platform.machine()}  {os.cpu_count()} cpus  "
          f"torch {torch.__version__}  cuda {torch.cuda.is_available()}")  # fmt: skip
    if not (model / "model.safetensors.index.json").exists():
        start = time.perf_counter()
        params = write_model(model, args.layers)
        print(f"# generated {params / 1e9:.2f}B params ({2 * params / 2**30:.2f} GiB fp16) "
              f"in {time.perf_counter() - start:.0f}s")  # fmt: skip
    else:
        params = sum(int(torch.tensor(s).prod()) for _, s in llama_tensors(args.layers))
    fp32_bytes = 4 * params

    # (1) peak memory: ours through the CLI vs load_file of every shard
    out = work / "profile.parquet"
    shutil.rmtree(f"{out}.partial", ignore_errors=True)
    out.unlink(missing_ok=True)
    ours_code = (f"from bitalloc.cli import main; "
                 f"assert main(['profile', {str(model)!r}, '-o', {str(out)!r}, '--configs', "
                 f"'nf4-b64-s8b256', '--iters', '1', '--device', 'cpu', '--quiet']) == 0")  # fmt: skip
    ours_time, ours_peak, _ = run_python(ours_code)
    naive_code = (f"import glob; from safetensors.torch import load_file; "
                  f"state = {{}}\nfor f in sorted(glob.glob({str(model)!r} + '/*.safetensors')): "
                  f"state.update({{k: v.float() for k, v in load_file(f).items()}})")  # fmt: skip
    naive_time, naive_peak, _ = run_python(naive_code)
    print("\n## peak memory (VmHWM), one config, T=1, 154 matrices")
    print(f"{'run':<34} {'peak GiB':>9} {'/ fp32 size':>11} {'time s':>8}")
    print(f"{'bitalloc profile (streamed)':<34} {ours_peak / 2**30:>9.2f} {ours_peak / fp32_bytes:>10.1%} "
          f"{ours_time:>8.1f}")  # fmt: skip
    print(f"{'baseline: load_file every shard':<34} {naive_peak / 2**30:>9.2f} "
          f"{naive_peak / fp32_bytes:>10.1%} {naive_time:>8.1f}")  # fmt: skip
    print(
        f"ratio ours/baseline peak: {ours_peak / naive_peak:.3f}; target peak <= 25% of fp32 "
        f"({fp32_bytes / 4 / 2**30:.2f} GiB): {'met' if ours_peak <= fp32_bytes / 4 else 'MISSED'}"
    )

    # (2) throughput on the first layer(s), default grid, T=5, vs the paper's algorithm
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_loftq import baseline_loftq

    from bitalloc.profiling.profiler import profile
    from bitalloc.profiling.settings import ProfileSettings
    from bitalloc.quant import QuantConfig

    stats: dict[str, float] = {}
    include = r"layers\.(" + "|".join(str(i) for i in range(args.throughput_layers)) + r")\."
    start = time.perf_counter()
    table = profile(model, include=include, device="cpu", quiet=True, stats=stats)
    elapsed = time.perf_counter() - start
    n = len(table)
    print(f"\n## throughput: {table['module'].nunique()} matrices x {len(ProfileSettings().grid())} configs "
          f"(default grid), r=16, T=5")  # fmt: skip
    print(f"bitalloc: {elapsed:.1f}s = {n / elapsed:.2f} matrix-configs/s  (" +
          ", ".join(f"{k} {v:.1f}s" for k, v in sorted(stats.items())) + ")")  # fmt: skip
    from bitalloc.checkpoints import open_source

    with open_source(model, include=r"layers\.0\.self_attn\.q_proj") as source:
        weight = source.read(source.modules()[0])
    config = QuantConfig.parse("nf4-b64-s8b256")
    start = time.perf_counter()
    baseline_loftq(weight, config, 16, 5)
    base = time.perf_counter() - start
    ours_row = table[(table.module == "model.layers.0.self_attn.q_proj") & (table.config == str(config))]
    start = time.perf_counter()
    from bitalloc.lora import loftq

    loftq(weight, config, keep_q=False)
    ours = time.perf_counter() - start
    print(
        f"one 2048x2048 {config}: paper's algorithm {base:.2f}s, bitalloc {ours:.2f}s, "
        f"ratio {base / ours:.1f}x (rel error {float(ours_row.rel_error.iloc[0]):.4f})"
    )
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
