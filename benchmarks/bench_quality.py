"""Does the data-aware plan win? Perplexity of four allocations of SmolLM2-135M per budget.

For each budget (average storage bits per parameter over the quantized matrices, exact
storage counted, LoRA not counted) four allocations, all with LoftQ init (r=16, the
profile's T), each built in memory by setting every planned W <- Q + B·A from `loftq`
with the allocation's config (and, for the data-aware plan, the same h as its profile):

1. uniform: one config for every matrix; the candidates that fit with the lowest profiled
   error are evaluated and the best by measured perplexity is reported;
2. first-k: LoftQ's mix, the first k layers nf4-b64, the rest nf2-b64, largest k that fits;
3. weight: the ILP plan minimizing sum ||W - Q - BA||^2 (weight-only profile);
4. activation: the ILP plan minimizing sum ||(W - Q - BA) diag(sqrt h)||^2 (data-aware
   profile; h from the built-in calibration text, block by block).

Perplexity is measured on the built-in evaluation text (disjoint from the calibration
text; see `bitalloc.evaluate`). Profiles, calibration and perplexities are cached in
--work, so a rerun only computes what is missing (delete the folder to time a fresh run).

    python benchmarks/bench_quality.py [--budgets 3.5,4] [--iters 2] [--eval-tokens 8192]

A fresh run takes about 9 minutes on a 2-core CPU machine (results: docs/data_aware.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import time
import warnings
from pathlib import Path

import torch
from common import GGUF_FILE, Cache, smollm2_path

CONFIGS = [f"nf{bits}-b{block}-s8b256" for bits in (2, 3, 4) for block in (64, 128)]


def timed_profile(model, output: Path, cache: Cache, key: str, **kwargs):
    from bitalloc.profiling.profiler import profile

    stats: dict[str, float] = {}
    start = time.perf_counter()
    table = profile(model, output, quiet=True, stats=stats, **kwargs)
    elapsed = time.perf_counter() - start
    if cache.get(key) is None and stats.get("factorize"):  # a fresh run, not a cached table
        calibration = stats.get("calibration", 0.0)
        cache.put(key, {"profile_s": elapsed - calibration, "calibration_s": calibration})
    return table


def load_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, file = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, dtype=torch.float32)
    return model.eval(), tokenizer


class Builder:
    """Puts Q + B·A of an allocation into the model's Linear layers (LoftQ seeded as the
    profiler seeds it); reconstructions are cached, so allocations share their work."""

    def __init__(self, model, rank: int, iters: int, column_weights: dict[str, torch.Tensor]):
        self.model, self.rank, self.iters, self.h = model, rank, iters, column_weights
        self.original = {}
        self.cache: dict[tuple[str, str, bool], tuple[torch.Tensor, float]] = {}

    def weight(self, module: str, config: str, weighted: bool) -> tuple[torch.Tensor, float]:
        from bitalloc.loftq import loftq, module_seed

        key = (module, config, weighted)
        if key not in self.cache:
            if module not in self.original:
                self.original[module] = self.model.get_submodule(module).weight.detach().clone()
            original = self.original[module]
            result = loftq(
                original, config, self.rank, self.iters, seed=module_seed(module, config),
                column_weights=self.h[module] if weighted else None,
            )  # fmt: skip
            error = result.weighted_error if weighted else result.error
            self.cache[key] = (result.q.dequantize() + result.lowrank(), error)
        return self.cache[key]

    def build(self, assignments: dict[str, str], weighted: bool) -> float:
        """Set every assigned weight; returns the summed error (check against the profile)."""
        total = 0.0
        for module, config in assignments.items():
            weight, error = self.weight(module, config, weighted)
            self.model.get_submodule(module).weight.data.copy_(weight)
            total += error
        return total

    def restore(self) -> None:
        for module, weight in self.original.items():
            self.model.get_submodule(module).weight.data.copy_(weight)


def assignment_key(assignments: dict[str, str], weighted: bool) -> str:
    text = json.dumps([sorted(assignments.items()), weighted])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--budgets", default="3.5,4")
    parser.add_argument("--iters", type=int, default=2, help="LoftQ T (default 2)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument("--uniform-candidates", type=int, default=2, help="uniform configs to evaluate")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: the machine is shared)")
    parser.add_argument("--work", default="/tmp/bitalloc-bench-quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    from bitalloc.evaluation import perplexity
    from bitalloc.planning.planner import plan
    from bitalloc.planning.report import first_k_layers_baseline, uniform_baselines
    from bitalloc.profiling.calibration import load_column_weights
    from bitalloc.texts import evaluation_text, text_digest, text_name, tokenize

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = Cache(work / "results.json")
    gguf = smollm2_path()
    budgets = [float(b) for b in args.budgets.split(",")]
    common = dict(configs=CONFIGS, rank=args.rank, iters=args.iters)
    tag = f"r{args.rank}-t{args.iters}"

    weight_table = timed_profile(gguf, work / f"weight-{tag}.parquet", cache, f"time weight {tag}", **common)
    activation_path = work / f"activation-{tag}-c{args.calibration_tokens}.parquet"
    activation_table = timed_profile(
        gguf, activation_path, cache, f"time activation {tag} c{args.calibration_tokens}",
        calibration="default", calibration_tokens=args.calibration_tokens, **common,
    )  # fmt: skip
    column_weights = load_column_weights(activation_path)

    model, tokenizer = load_model(gguf)
    eval_ids = tokenize(tokenizer, evaluation_text(), args.eval_tokens)
    builder = Builder(model, args.rank, args.iters, column_weights)

    text_key = text_digest(evaluation_text())[:12]

    def measure(assignments: dict[str, str], weighted: bool, expected_error: float) -> float:
        key = f"ppl {tag} {text_key} {args.eval_tokens} {assignment_key(assignments, weighted)}"
        if cache.get(key) is None:
            start = time.perf_counter()
            rebuilt = builder.build(assignments, weighted)
            if abs(rebuilt - expected_error) > 1e-4 * expected_error:  # the profile measured this
                raise SystemExit(f"rebuilt error {rebuilt:.6g} != profiled {expected_error:.6g}")
            value = perplexity(model, None, eval_ids, context=args.context)
            builder.restore()
            cache.put(key, value)
            print(f"  evaluated in {time.perf_counter() - start:.0f}s: ppl {value:.3f}", flush=True)
        return cache.get(key)

    original_key = f"ppl original {text_key} {args.eval_tokens}"
    if cache.get(original_key) is None:
        cache.put(original_key, perplexity(model, None, eval_ids, context=args.context))
    rows = []
    for budget in budgets:
        print(f"budget {budget:g}", flush=True)
        uniform = uniform_baselines(weight_table, budget)[: args.uniform_candidates]
        measured = [(measure(b.assignments, False, b.error), b) for b in uniform]
        ppl, best = min(measured, key=lambda item: item[0])
        tried = ", ".join(f"{b.name} {p:.2f}" for p, b in measured)
        rows.append((budget, f"uniform {best.name}", best.achieved_bits, ppl, tried))
        first_k = first_k_layers_baseline(weight_table, budget)
        if first_k is not None:
            ppl = measure(first_k.assignments, False, first_k.error)
            rows.append((budget, first_k.name, first_k.achieved_bits, ppl, ""))
        for name, table, weighted in (
            ("weight", weight_table, False),
            ("activation", activation_table, True),
        ):
            result = plan(table, budget)
            counts: dict[str, int] = {}
            for config in result.assignments.values():
                counts[config] = counts.get(config, 0) + 1
            mix = ", ".join(f"{c.split('-s')[0]}x{n}" for c, n in sorted(counts.items()))
            ppl = measure(result.assignments, weighted, result.total_error)
            rows.append((budget, f"{name} plan", result.achieved_bits, ppl, mix))

    timings = {k: v for k, v in cache.data.items() if k.startswith("time")}
    print()
    print(f"SmolLM2-135M-Instruct ({GGUF_FILE}), {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), {time.strftime('%Y-%m-%d')}")  # fmt: skip
    print(f"configs {', '.join(CONFIGS)}; LoftQ r={args.rank}, T={args.iters}")
    print(f"evaluation: {len(eval_ids)} tokens of {text_name('evaluation')}, context {args.context}")
    print(f"calibration: {args.calibration_tokens} tokens of {text_name('calibration')}, context 512")
    for key, value in sorted(timings.items()):
        print(f"{key}: profile {value['profile_s']:.0f}s, calibration {value['calibration_s']:.0f}s")
    print(f"original (Q4_1 GGUF dequantized, fp32): ppl {cache.get(original_key):.3f}")
    print()
    print("| budget | allocation | bits/param | perplexity | notes |\n|---|---|---|---|---|")
    for budget, name, bits, ppl, notes in rows:
        print(f"| {budget:g} | {name} | {bits:.4f} | {ppl:.2f} | {notes} |")


if __name__ == "__main__":
    main()
