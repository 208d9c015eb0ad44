"""How close the quantized starts are to the original model: perplexity, KL, top-1, embeddings.

`evaluate` runs three versions of a model over the installed evaluation text (or a text
file, or token ids): the original, the plan with LoftQ's start (every planned W replaced
by Q + B·A) and with QLoRA's start (W replaced by Q = nearest rounding of W, no LoRA). For
a causal LM it reports each one's perplexity and, for the two starts, the KL divergence
of their next-token distributions from the original's (mean and percentiles per token)
and how often their top-1 token agrees, as llama.cpp's ``perplexity --kl-divergence``
does. For an encoder (the demo model) it reports the cosine similarity of mean-pooled
sentence embeddings to the original's.

The run streams: the model's transformer blocks are read one at a time (as calibration
does, `bitalloc.checkpoints.runnable.run_model`), each planned matrix is decomposed with
LoftQ (seeded as the profiler and `bitalloc.apply` seed it, with the plan's h for a
data-aware plan) when its block is read, and logits are computed one window at a time.
Memory: one block, the hidden states of the three versions, one window's logits.

``evaluate(OUT)`` on a folder that `bitalloc.apply` wrote reads Q from ``OUT/quantized``
and B·A from ``OUT/adapter`` instead of decomposing again; the original is the model the
plan was made from (or ``reference``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..artifacts.writer import PLAN_FILE, check_plan, check_plan_iters
from ..checkpoints import DEMO_NAME, model_input_files, open_source
from ..checkpoints.runnable import can_run, find_blocks, load_tokenizer, run_model, runnable
from ..devices import resolve_device
from ..errors import BitallocError
from ..fileio import check_name, check_output, write_text_atomic
from ..planning.plan_file import Plan
from ..profiling.memory import release_freed_memory
from ..texts import describe_text, read_text, text_sha256
from .batches import causal_batches, evaluation_sentences, sentence_batches
from .metrics import VARIANTS, CausalMetric, EmbeddingMetric
from .starts import PlanStarts, Swapper, applied_starts

__all__ = ["DEFAULT_CONTEXT", "DEFAULT_OUTPUT", "DEFAULT_TOKENS", "EVAL_FORMAT", "VARIANTS", "evaluate",
           "evaluation_sentences", "format_evaluation"]  # fmt: skip

EVAL_FORMAT = "bitalloc.eval/v1"
DEFAULT_OUTPUT = "eval.json"  # where `bitalloc eval` writes its result
DEFAULT_TOKENS = 8192  # tokens of the evaluation text
DEFAULT_CONTEXT = 512  # window length (causal LMs); longest sentence (encoders)


# shape: the public function's documented options (the eval CLI's twin)
def evaluate(
    model: str | os.PathLike | nn.Module | None = None,
    plan: Plan | str | os.PathLike | None = None,
    *,
    reference: str | os.PathLike | None = None,
    text: str | os.PathLike | None = None,
    tokens: int | None = None,
    context: int | None = None,
    input_ids: torch.Tensor | None = None,
    device: str | torch.device = "auto",
    calibration: str | os.PathLike | None = None,
    calibration_ids: torch.Tensor | None = None,
    column_weights: dict | None = None,
    output: str | os.PathLike | None = None,
    save: bool = False,
    quiet: bool = True,
) -> dict:
    """Compare the original ``model`` with ``plan``'s LoftQ start (Q + B·A) and QLoRA start (Q).

    ``evaluate(MODEL, plan)`` decomposes the plan's matrices on the fly (the same seeds, and
    for a data-aware plan the same statistics, computed again block by block from the plan's
    calibration text — ``calibration``, when the file is not at its recorded path — or the same
    ``calibration_ids`` or ``column_weights`` given again, so the weights equal what
    `bitalloc.apply` writes). ``evaluate(OUT)`` (no plan) reads what
    `bitalloc.apply` wrote to ``OUT/quantized`` and ``OUT/adapter``; the original is
    ``reference``, by default the model recorded in the plan. ``model`` None is the demo model.

    Text: the first ``tokens`` (default 8192) tokens of ``text`` (a file; default the
    installed evaluation text, which calibration never sees), in windows of ``context``
    (default 512) for a causal LM, or its sentences (cut at ``context`` tokens) for an
    encoder; or ``input_ids`` ((windows, context) or 1-D) without a tokenizer.

    Returns the result as a dict (the ``bitalloc.eval/v1`` JSON, see docs/evaluation.md);
    with ``output`` (or ``save``: the default ``eval.json``) also writes it, atomically.
    Deterministic: the same inputs give the same numbers.
    """
    if plan is None:
        if not _is_applied(model):
            raise BitallocError(
                f"give a plan to evaluate {_name(model)} with (--plan plan.json), or a folder "
                "written by `bitalloc apply` (with quantized/ and adapter/)"
            )
        out = Path(model)
        plan = Plan.from_json(out / "quantized" / PLAN_FILE)
        model = _recorded_source(plan) if reference is None else reference
        starts = applied_starts(out, plan)
        plan_info = {"path": str(out), "applied": True}
    else:
        if reference is not None:
            raise BitallocError(
                "reference names the original of an applied folder; with a plan, give the model"
            )
        plan_path = None if isinstance(plan, Plan) else Path(plan)
        plan = plan if isinstance(plan, Plan) else Plan.load(plan)
        check_plan_iters(plan)  # eval runs LoftQ with them
        starts = None
        plan_info = {"path": None if plan_path is None else str(plan_path), "applied": False}
    wanted = output if output is not None else (DEFAULT_OUTPUT if save else None)
    path = None if wanted is None else check_name(wanted)
    if path is not None and plan_info["path"] is not None and _same_file(path, plan_info["path"]):
        raise BitallocError(f"output {path} would overwrite the plan: choose another -o")
    if path is not None:  # nothing the run reads may be written over
        check_output(path, _input_files(model, plan, plan_info, text, calibration))
    tokens = DEFAULT_TOKENS if tokens is None else int(tokens)
    context = DEFAULT_CONTEXT if context is None else int(context)
    if tokens <= 0 or context <= 1:
        raise BitallocError(f"tokens must be positive and context at least 2, got {tokens} and {context}")
    torch_device = resolve_device(device)
    with open_source(model, modules=[]) as source:
        check_plan(plan, source)
        source_name = source.name
    if input_ids is None and model is not None and not isinstance(model, nn.Module) and not can_run(model):
        raise BitallocError(
            f"cannot run {source_name} on text: it needs config.json and a tokenizer (or give input_ids)"
        )
    if starts is None:
        statistics = plan.statistics(model, calibration=calibration, calibration_ids=calibration_ids,
                                     column_weights=column_weights)  # fmt: skip
        starts = PlanStarts(plan, statistics, torch_device)
    result = _evaluate(model, plan, starts, _Text(text, tokens, context, input_ids), torch_device, quiet)
    result["model"]["source"] = source_name
    result["plan"] = {**plan_info, **_plan_summary(plan)}
    result = _ordered(result)
    if path is not None:
        write_text_atomic(path, json.dumps(result, indent=2, allow_nan=False) + "\n")
        result["path"] = str(path)
    return result


def format_evaluation(result: dict) -> str:
    """The result as a small table (what `bitalloc eval` prints)."""
    info, rows = result["data"], result["results"]
    plan = result["plan"]
    head = (
        f"{result['model']['source']}: plan {plan['target_bits']:g} bits/param "
        f"(achieved {plan['achieved_bits']:.4g}, {plan['matrices']} matrices); {info['text']}"
    )
    if result["model"]["kind"] == "causal-lm":
        head += f"\n{info['tokens']} tokens scored ({info['windows']} windows of {info['context']})"
        columns = ["perplexity", "kl_mean", "kl_p99", "top1_agreement"]
        titles = ["perplexity", "KL mean", "KL p99", "top-1 agree"]
    else:
        head += f"\n{info['sentences']} sentences, {info['tokens']} tokens"
        columns = ["cosine_mean", "cosine_p01", "cosine_min"]
        titles = ["cosine mean", "cosine p1", "cosine min"]
    lines = [head, f"{'start':<10}" + "".join(f"{t:>14}" for t in titles)]
    for variant in VARIANTS:
        cells = []
        for column in columns:
            value = rows[variant].get(column)
            cells.append(f"{'-':>14}" if value is None else f"{_short(value):>14}")
        lines.append(f"{variant:<10}" + "".join(cells))
    return "\n".join(lines)


# ---- the run ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Text:
    """What `evaluate` runs the model over: the first ``tokens`` of ``text`` in windows (or
    sentences) of ``context``, or ``input_ids`` given directly."""

    text: str | os.PathLike | None
    tokens: int
    context: int
    input_ids: torch.Tensor | None


def _evaluate(model, plan: Plan, starts, text: _Text, device: torch.device, quiet: bool) -> dict:
    from tqdm.auto import tqdm

    modules = list(plan.modules)
    with runnable(model) as (net, load, tokenizer_dir):
        causal = getattr(net, "get_output_embeddings", lambda: None)() is not None
        batches, data, metric = _batches(model, tokenizer_dir, causal, text)
        try:
            blocks = len(find_blocks(net, modules)[1])
        except BitallocError:
            outside = next(m for m in modules if not re.search(r"\.\d+\.", m))
            raise BitallocError(
                f"evaluation runs the transformer blocks; {outside} is not inside one"
            ) from None
        rows = sum(int(b.shape[0]) for b in batches)
        bar = tqdm(total=(blocks + rows) * len(VARIANTS), disable=quiet, dynamic_ncols=True, desc="eval")
        if isinstance(starts, PlanStarts):
            starts.attach(net, load, modules)
        prepare = Swapper(net, modules, starts, bar)
        try:
            run_model(
                net, batches, modules, metric.add, variants=VARIANTS, prepare=prepare, load=load,
                device=device, progress=lambda: _step(bar),
            )  # fmt: skip
        finally:
            bar.close()
    device_name = str(device) if load is not None else str(next(net.parameters()).device)
    return {
        "format": EVAL_FORMAT,
        "model": {"source": None, "kind": "causal-lm" if causal else "encoder"},
        "data": data,
        "device": device_name,
        "results": metric.results(),
    }


def _batches(model, tokenizer_dir, causal: bool, text: _Text):
    """(batches, the data's record, the metric) for a causal LM's windows or an encoder's sentences."""
    input_ids, tokens, context = text.input_ids, text.tokens, text.context
    if input_ids is None:
        tokenizer = load_tokenizer(tokenizer_dir, model)
        digest = text_sha256(text.text, "evaluation")  # refuses an empty text before any work
        corpus = read_text(text.text, "evaluation")
        name = describe_text(text.text, "evaluation")
    else:
        tokenizer, corpus = None, None
        ids = input_ids.to(torch.long).contiguous()
        name, digest = "input_ids", hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()
    if causal:
        batches, data = causal_batches(tokenizer, corpus, input_ids, tokens, context)
        metric = CausalMetric(batches)
    else:
        batches, data, order = sentence_batches(tokenizer, corpus, input_ids, tokens, context)
        metric = EmbeddingMetric(order)
    return batches, {"text": name, "text_sha256": digest, **data}, metric


def _step(bar) -> None:
    """After each block and window: the bar, and freed heap pages back to the OS (without it
    the RSS grows by the fragments of every block's temporaries)."""
    bar.update(1)
    release_freed_memory()


# ---- helpers ------------------------------------------------------------------------------


def _input_files(model, plan: Plan, plan_info: dict, text, calibration) -> list:
    """Every file `evaluate` reads: the model's files (weights, config, tokenizer), the plan,
    an applied folder's quantized backbone and adapter, the text and the calibration text
    (given, or the one the plan records)."""
    recorded = (plan.calibration or {}).get("text_path")
    inputs = [*model_input_files(model), plan_info["path"], text, calibration, recorded]
    if plan_info["applied"]:
        inputs += [Path(plan_info["path"]) / "quantized", Path(plan_info["path"]) / "adapter"]
    return inputs


def _is_applied(model) -> bool:
    return isinstance(model, (str, os.PathLike)) and (Path(model) / "quantized" / PLAN_FILE).is_file()


def _name(model) -> str:
    if model is None:
        return DEMO_NAME
    return type(model).__name__ if isinstance(model, nn.Module) else str(model)


def _recorded_source(plan: Plan):
    """The model a plan was made from, as recorded in it (the demo model's name is None)."""
    source = plan.model.get("source")
    if source == DEMO_NAME:
        return None
    if not source or source.startswith("<") or not Path(source).exists():
        raise BitallocError(
            f"the plan records its model as {source!r}, which is not a file here: give the original "
            "with --reference MODEL"
        )
    return source


def _plan_summary(plan: Plan) -> dict:
    return {
        "target_bits": plan.target_bits,
        "achieved_bits": plan.achieved_bits,
        "objective": plan.objective,
        "matrices": len(plan.modules),
        "kept": len(plan.kept),
        "configs": dict(sorted(Counter(plan.assignments.values()).items())),
        "source": plan.model.get("source"),
    }


def _ordered(result: dict) -> dict:
    keys = ("format", "model", "plan", "data", "device", "results")
    return {key: result[key] for key in keys}


def _same_file(a, b) -> bool:
    return Path(a).resolve() == Path(b).resolve()


def _short(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
