"""Does H-aware rounding (GPTQ-style error feedback, block scales fixed beforehand) pay?

The same SmolLM2-135M plans as `bench_quality.py` (output objective, the
profile of --variant in its work folder), rebuilt three ways and evaluated on the same two
held-out texts:

- nearest: LoftQ as profiled (Q by nearest rounding, whitened rank-r step, T iterations);
- gptq-1:  Q = GPTQ(W) (columns in order, each rounded to the nearest level of its block's
           stored scale, its error fed forward through the Cholesky factor of H⁻¹, as GPTQ
           with static groups: the stored format is unchanged), then one whitened step;
- gptq-2:  one more round: Q = GPTQ(W − B·A), whitened step again; the better iterate by
           output error.

The summed output error on the calibration data (what GPTQ minimizes) is printed beside the
held-out perplexities: rounding is kept only if it lowers the *held-out* perplexity.

    python benchmarks/bench_rounding.py [--variant o16384] [--budgets 3.5,4]
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from pathlib import Path

import torch
from bench_quality import CONFIGS, load_model
from common import Cache, docstring_text, smollm2_path


def gptq_quantize(weight: torch.Tensor, covariance: torch.Tensor, config, damping: float) -> torch.Tensor:
    """Q (dequantized, float32) of ``weight`` in ``config``'s format with error feedback."""
    from bitalloc.quant import QuantConfig
    from bitalloc.quant.blockwise import _blocks, quantize_scales
    from bitalloc.quant.codebooks import codebook, nearest_index

    config = QuantConfig.parse(config)
    rows, cols = weight.shape
    absmax = _blocks(weight, config.block_size).abs().amax(dim=-1)
    scales = quantize_scales(absmax, config)[0]  # the stored scales, fixed before rounding
    h = covariance.double()
    h = h + damping * h.diagonal().mean() * torch.eye(cols, dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    upper = torch.linalg.cholesky(inverse, upper=True)  # GPTQ's Cholesky form of H⁻¹
    levels = codebook(config.method, config.bits, weight.device).double()
    work = weight.double().clone()
    out = torch.empty_like(work)
    for j in range(cols):
        scale = scales[:, j // config.block_size].double()
        x = torch.where(scale > 0, work[:, j] / scale.clamp_min(1e-30), 0.0)
        q = levels[nearest_index(x.float(), levels.float()).long()] * scale
        out[:, j] = q
        err = (work[:, j] - q) / upper[j, j]
        work[:, j + 1 :] -= err[:, None] * upper[j, j + 1 :][None, :]
    return out.float()


def whitened_step(residual: torch.Tensor, factor: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """Best rank-r M for ||(R − M) L||; returns (M, output error)."""
    target = residual @ factor
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    a = torch.linalg.solve_triangular(factor, s[:, None] * vh, upper=False, left=False)
    low = u @ a
    return low, float(((target - (u * s) @ vh) ** 2).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--variant", default="o16384")
    parser.add_argument("--budgets", default="3.5,4")
    parser.add_argument("--methods", default="nearest,gptq-1,gptq-2")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="/tmp/bitalloc-bench-quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    from bitalloc.evaluation import perplexity
    from bitalloc.lora import loftq, module_seed, whitening_factor
    from bitalloc.planning.planner import plan
    from bitalloc.profiling.calibration import load_input_statistics
    from bitalloc.profiling.table import read_profile
    from bitalloc.texts import evaluation_text, tokenize

    work = Path(args.work)
    cache = Cache(work / "rounding.json")
    path = work / f"{args.variant}-r{args.rank}-t{args.iters}.parquet"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run bench_quality.py --variants {args.variant} first")
    table = read_profile(path)
    covariances = load_input_statistics(path, smollm2_path())
    model, tokenizer = load_model(smollm2_path())
    texts = {"eval": evaluation_text(), "docstrings": docstring_text()}
    ids = {name: tokenize(tokenizer, text, args.eval_tokens) for name, text in texts.items()}
    original = {m: model.get_submodule(m).weight.detach().clone() for m in sorted(set(table["module"]))}
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        chosen = plan(table, budget)
        for method in args.methods.split(","):
            key = f"{args.variant} {budget} {method} {args.eval_tokens}"
            if cache.get(key) is None:
                start, total = time.perf_counter(), 0.0
                for name, config in chosen.assignments.items():
                    weight, h = original[name], covariances[name]
                    if method == "nearest":
                        result = loftq(weight, config, args.rank, args.iters, seed=module_seed(name, config),
                                       input_covariance=h, damping=covariances.damping)  # fmt: skip
                        rebuilt, error = result.q.dequantize() + result.lowrank(), result.weighted_error
                    else:
                        factor = whitening_factor(h, covariances.damping).float()
                        best, error, low = None, math.inf, torch.zeros_like(weight)
                        for _ in range(1 if method == "gptq-1" else 2):
                            q = gptq_quantize(weight - low, h, config, covariances.damping)
                            low, step_error = whitened_step(weight - q, factor, args.rank)
                            if step_error < error:
                                best, error = q + low, step_error
                        rebuilt = best
                    model.get_submodule(name).weight.data.copy_(rebuilt)
                    total += error
                value = {n: perplexity(model, None, ids[n], context=512) for n in texts}
                value["output_error"] = total
                value["seconds"] = time.perf_counter() - start
                cache.put(key, value)
                for name, weight in original.items():
                    model.get_submodule(name).weight.data.copy_(weight)
                print(f"  {key}: {value}", flush=True)
            rows.append((budget, method, cache.get(key)))
    print(f"\nSmolLM2-135M, plans of {path.name} (configs {', '.join(CONFIGS)}), {time.strftime('%Y-%m-%d')}")
    print("| budget | rounding | summed output error (calibration) | ppl eval | ppl docstrings | build s |")
    print("|---|---|---|---|---|---|")
    for budget, method, value in rows:
        print(f"| {budget:g} | {method} | {value['output_error']:.5g} | {value['eval']:.2f} | "
              f"{value['docstrings']:.2f} | {value['seconds']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
