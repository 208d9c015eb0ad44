"""Does the data-aware plan win? Perplexity of SmolLM2-135M allocations per budget.

For each budget (average storage bits per parameter over the quantized matrices, exact
storage counted, LoRA not counted) several allocations, all with LoftQ init (r=16, the
profile's T), each built in memory by setting every planned W <- Q + B·A from `loftq`
with the allocation's config and the weighting its profile used (checked against the
profile's error to 1e-4):

- uniform: one config for every matrix, the fitting one with the lowest profiled error;
- weight: the ILP plan minimizing sum ||W - Q - BA||^2 (weight-only profile; --weight);
- activation: the ILP plan minimizing sum ||(W - Q - BA) diag(sqrt h)||^2 (the diagonal
  objective), re-measured in the same run;
- output: the ILP plan minimizing sum ||(W - Q - BA) L||^2, L L^T = H + λI (full input
  covariance), for calibration variants: tokens, damping λ;
- output + layer weights: the same with per-matrix coefficients (`--coefficients`).

Perplexity is measured on two held-out texts: the built-in evaluation text (disjoint from
the calibration text; see `bitalloc.texts`) and the standard library's docstrings
(`common.docstring_text`). Profiles, calibration and perplexities are cached in --work,
so a rerun only computes what is missing (delete the folder to time a fresh run).

    python benchmarks/bench_quality.py [--budgets 3,3.5,4] [--variants a8192,o8192,...] [--grids today,new]

Grids (`GRIDS`): ``today`` is the NF grid with absmax-searched 8-bit scales the results in
docs/data_aware.md were first measured with; ``new`` adds the formats near the bound: the
same NF configs with the per-block scale search (``-mse``) in place of absmax, and asymmetric
integer groups with fp16 scale and an integer zero (``uint...-mse``). The ILP picks among all of them, so a
format that does not pay is simply not chosen (the mix column shows what was). KL (mean
KL(original || allocation) per token) is measured on the evaluation text.

Variant names: a<tokens> (activation), o<tokens>[l<λ>] (output), o<tokens>[l<λ>]w (output
with layer weights). Results: docs/data_aware.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import platform
import re
import time
import warnings
from pathlib import Path

import torch
from common import GGUF_FILE, Cache, docstring_text, smollm2_path

CONFIGS = [f"nf{bits}-b{block}-s8b256" for bits in (2, 3, 4) for block in (64, 128)]
GRIDS = {
    "today": CONFIGS,
    # the scale search never costs storage and lowered the error of every one of 432 demo
    # matrix-configs (docs/export.md), so the plain NF configs are left out of this grid
    "new": [
        *(f"{config}-mse" for config in CONFIGS),
        *(f"uint{bits}-b{block}-sfp16-z{bits}-mse" for bits in (2, 3, 4) for block in (64, 128)),
    ],
}
GRIDS["gptq"] = [f"{config}-gptq" for config in GRIDS["new"]]  # the same, codes by GPTQ's error feedback
DEFAULT_VARIANTS = "a8192,o8192,o4096,o16384,o50000,o8192l0.001,o8192l0.1"


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


def parse_variant(name: str) -> dict:
    match = re.fullmatch(r"([ao])(\d+)(?:l([0-9.e-]+))?(w?)", name)
    if match is None:
        raise SystemExit(f"bad variant {name!r}: a<tokens>, o<tokens>[l<lambda>][w]")
    kind, tokens, lam, weights = match.groups()
    options = {"objective": "activation" if kind == "a" else "output", "calibration_tokens": int(tokens)}
    if lam is not None:
        options["damping"] = float(lam)
    if weights:
        options["layer_weights"] = True
    return {"options": options, "layer_weights": bool(weights)}


class Builder:
    """Puts Q + B·A of an allocation into the model's Linear layers (LoftQ seeded as the
    profiler seeds it, weighted as the profile was); reconstructions are cached."""

    def __init__(self, model, rank: int, iters: int):
        self.model, self.rank, self.iters = model, rank, iters
        self.original = {}
        self.cache: dict[tuple[str, str, str], tuple[torch.Tensor, float]] = {}

    def weight(self, module: str, config: str, statistics, tag: str) -> tuple[torch.Tensor, float]:
        from bitalloc.lora import loftq, module_seed
        from bitalloc.profiling.calibration import weighting

        if self.cache and next(iter(self.cache))[2] != tag:
            self.cache.clear()  # reconstructions are shared within one weighting only
        key = (module, config, tag)
        if key not in self.cache:
            if module not in self.original:
                self.original[module] = self.model.get_submodule(module).weight.detach().clone()
            result = loftq(
                self.original[module], config, self.rank, self.iters, seed=module_seed(module, config),
                weighting=weighting(statistics, module),
            )  # fmt: skip
            error = result.weighted_error if statistics is not None else result.error
            self.cache[key] = (result.q.dequantize() + result.lowrank(), error)
        return self.cache[key]

    def build(self, assignments: dict[str, str], statistics, tag: str) -> float:
        """Set every assigned weight; returns the summed error (check against the profile)."""
        total = 0.0
        for module, config in assignments.items():
            weight, error = self.weight(module, config, statistics, tag)
            self.model.get_submodule(module).weight.data.copy_(weight)
            total += error
        return total

    def restore(self) -> None:
        for module, weight in self.original.items():
            self.model.get_submodule(module).weight.data.copy_(weight)


def assignment_key(assignments: dict[str, str], tag: str) -> str:
    text = json.dumps([sorted(assignments.items()), tag])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def mix(assignments: dict[str, str]) -> str:
    counts: dict[str, int] = {}
    for config in assignments.values():
        counts[config] = counts.get(config, 0) + 1
    return ", ".join(f"{c.split('-s')[0]}x{n}" for c, n in sorted(counts.items()))


@torch.inference_mode()
def window_log_probs(model, ids: torch.Tensor, context: int) -> list[torch.Tensor]:
    """The model's next-token log-probabilities (float32) per ``context`` window of ``ids``."""
    from bitalloc.texts import windows

    return [
        torch.log_softmax(model(w.unsqueeze(0), use_cache=False).logits[0, :-1].float(), dim=-1)
        for w in windows(ids.reshape(-1), context)
    ]


@torch.inference_mode()
def mean_kl(model, ids: torch.Tensor, reference: list[torch.Tensor], context: int) -> float:
    """Mean per-token KL(original || model) over the windows ``reference`` was computed on."""
    total, count = 0.0, 0
    for ref, logp in zip(reference, window_log_probs(model, ids, context), strict=True):
        total += float((ref.exp() * (ref - logp)).sum(-1).double().sum())
        count += ref.shape[0]
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--budgets", default="3,3.5,4")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS)
    parser.add_argument("--grids", default="today", help=f"comma-separated, of {', '.join(GRIDS)}")
    parser.add_argument("--iters", type=int, default=2, help="LoftQ T (default 2)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--weight", action="store_true", help="also the weight-only plan")
    parser.add_argument("--no-uniform", action="store_true", help="skip the uniform baselines")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument(
        "--coefficients",
        help="w variants: layer coefficients from this JSON ({'coefficients': {module: c}, 'info': {...}}, "
        "as bench_sensitivity.py writes them) put on the base profile, instead of profiling with "
        "layer_weights=True (the same measurement, without running it again)",
    )
    parser.add_argument("--work", default="/tmp/bitalloc-bench-quality")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)

    from bitalloc.evaluation import perplexity
    from bitalloc.planning.planner import plan
    from bitalloc.planning.report import uniform_baselines
    from bitalloc.profiling.calibration import load_input_statistics
    from bitalloc.texts import evaluation_text, text_digest, text_name, tokenize

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = Cache(work / "results.json")
    gguf = smollm2_path()
    budgets = [float(b) for b in args.budgets.split(",")]
    common = dict(configs=CONFIGS, rank=args.rank, iters=args.iters)
    grids = args.grids.split(",")
    if any(grid not in GRIDS for grid in grids):
        raise SystemExit(f"--grids: of {', '.join(GRIDS)}")
    tag = f"r{args.rank}-t{args.iters}"

    model, tokenizer = load_model(gguf)
    texts = {"eval": evaluation_text(), "docstrings": docstring_text()}
    eval_ids = {name: tokenize(tokenizer, text, args.eval_tokens) for name, text in texts.items()}
    text_keys = {name: text_digest(text)[:12] for name, text in texts.items()}
    builder = Builder(model, args.rank, args.iters)

    reference: list[torch.Tensor] = []

    def measure(assignments: dict[str, str], statistics, label: str, expected_error: float) -> dict:
        keys = {
            n: f"ppl {tag} {text_keys[n]} {args.eval_tokens} {assignment_key(assignments, label)}"
            for n in texts
        }
        keys["kl"] = f"kl {tag} {text_keys['eval']} {args.eval_tokens} {assignment_key(assignments, label)}"
        if any(cache.get(k) is None for k in keys.values()):
            if not reference:
                reference.extend(window_log_probs(model, eval_ids["eval"], args.context))
            start = time.perf_counter()
            rebuilt = builder.build(assignments, statistics, label)
            if abs(rebuilt - expected_error) > 1e-4 * expected_error:  # the profile measured this
                raise SystemExit(f"rebuilt error {rebuilt:.6g} != profiled {expected_error:.6g}")
            for name in texts:
                cache.put(keys[name], perplexity(model, None, eval_ids[name], context=args.context))
            cache.put(keys["kl"], mean_kl(model, eval_ids["eval"], reference, args.context))
            builder.restore()
            shown = ", ".join(f"{n} {cache.get(k):.3f}" for n, k in keys.items())
            print(f"  {label}: evaluated in {time.perf_counter() - start:.0f}s: ppl {shown}", flush=True)
        return {name: cache.get(key) for name, key in keys.items()}

    originals = {}
    for name in texts:
        key = f"ppl original {text_keys[name]} {args.eval_tokens}"
        if cache.get(key) is None:
            cache.put(key, perplexity(model, None, eval_ids[name], context=args.context))
        originals[name] = cache.get(key)

    rows = []
    weight_table = None
    if not args.no_uniform or args.weight:
        weight_path = work / f"weight-{tag}.parquet"
        weight_table = timed_profile(gguf, weight_path, cache, f"time weight {tag}", **common)
    for budget in budgets if weight_table is not None else []:
        if not args.no_uniform:
            best = uniform_baselines(weight_table, budget)[0]
            rows.append((budget, f"uniform {best.name}", best.achieved_bits,
                         measure(best.assignments, None, "weight", best.error), ""))  # fmt: skip
        if args.weight:
            result = plan(weight_table, budget)
            ppl = measure(result.assignments, None, "weight", result.total_error)
            rows.append((budget, "weight plan", result.achieved_bits, ppl, mix(result.assignments)))
    for grid, variant in [(g, v) for g in grids for v in args.variants.split(",")]:
        spec = parse_variant(variant)
        options = spec["options"]
        base = variant.rstrip("w")  # the same H: the same reconstructions
        stem = variant if grid == "today" else f"{variant}-{grid}"  # today's names: earlier caches
        path = work / f"{stem}-{tag}.parquet"
        print(f"variant {variant}, grid {grid}", flush=True)
        if spec["layer_weights"] and args.coefficients:
            path = work / f"{base}-{tag}.parquet"
            options.pop("layer_weights")
        table = timed_profile(
            gguf, path, cache, f"time {stem} {tag}", calibration="default", **options,
            **{**common, "configs": GRIDS[grid]},
        )  # fmt: skip
        if spec["layer_weights"] and args.coefficients:
            measured = json.loads(Path(args.coefficients).read_text())
            table.attrs["layer_weights"] = {**measured["info"], "coefficients": measured["coefficients"]}
        statistics = load_input_statistics(path, gguf)
        for budget in budgets:
            result = plan(table, budget)
            summed = math.fsum(
                entry["weighted_error"] for entry in result.modules.values()
            )  # before coefficients
            ppl = measure(result.assignments, statistics, base, summed)
            label = variant if len(grids) == 1 else f"{variant}, {grid} grid"
            rows.append((budget, label, result.achieved_bits, ppl, mix(result.assignments)))

    timings = {k: v for k, v in cache.data.items() if k.startswith("time")}
    print()
    print(f"SmolLM2-135M-Instruct ({GGUF_FILE}), {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), {time.strftime('%Y-%m-%d')}")  # fmt: skip
    for grid in grids:
        print(f"{grid} grid: {', '.join(GRIDS[grid])}; LoftQ r={args.rank}, T={args.iters}")
    for name in texts:
        described = text_name("evaluation") if name == "eval" else "stdlib docstrings (benchmarks/common.py)"
        print(f"held-out {name}: {len(eval_ids[name])} tokens of {described}, context {args.context}; "
              f"original ppl {originals[name]:.3f}")  # fmt: skip
    print(f"calibration: {text_name('calibration')}, context 512")
    for key, value in sorted(timings.items()):
        print(f"{key}: profile {value['profile_s']:.0f}s, calibration {value['calibration_s']:.0f}s")
    print()
    print("| budget | allocation | bits/param | ppl eval | KL eval | ppl docstrings | mix |")
    print("|---|---|---|---|---|---|---|")
    for budget, name, bits, ppl, notes in sorted(rows, key=lambda row: row[0]):
        print(f"| {budget:g} | {name} | {bits:.4f} | {ppl['eval']:.2f} | {ppl['kl']:.4f} | "
              f"{ppl['docstrings']:.2f} | {notes} |")  # fmt: skip


if __name__ == "__main__":
    main()
