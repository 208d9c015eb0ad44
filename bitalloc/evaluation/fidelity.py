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
import math
import os
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..artifacts.nn import PACKED_NAMES, packed_files, read_quant_info
from ..artifacts.writer import PLAN_FILE, check_plan, check_plan_iters
from ..checkpoints import DEMO_NAME, model_input_files, open_source
from ..checkpoints.runnable import BATCH_TOKENS, can_run, find_blocks, load_tokenizer, run_model, runnable
from ..devices import resolve_device
from ..errors import BitallocError
from ..fileio import check_name, check_output, write_text_atomic
from ..lora import loftq, module_seed
from ..planning.plan_file import Plan
from ..profiling.calibration import Calibrator, weighting
from ..quant import QuantConfig, QuantizedTensor
from ..texts import describe_text, read_text, text_sha256, tokenize, windows

EVAL_FORMAT = "bitalloc.eval/v1"
DEFAULT_OUTPUT = "eval.json"  # where `bitalloc eval` writes its result
DEFAULT_TOKENS = 8192  # tokens of the evaluation text
DEFAULT_CONTEXT = 512  # window length (causal LMs); longest sentence (encoders)
VARIANTS = ("original", "loftq", "qlora")
# Elements per float64 chunk of positions x vocabulary: bounds the temporaries, and at 40 MB
# is above glibc's largest mmap threshold (32 MB), so each chunk's memory goes back to the
# system when freed instead of fragmenting the heap (smaller chunks grew the RSS by ~100 MB
# per window on SmolLM2).
KL_CHUNK_ELEMENTS = 5 << 20
MIN_SENTENCE_WORDS = 5
MAX_SENTENCE_CHARS = 300
ADAPTER_FILE = "adapter_model.safetensors"

StartWeights = Callable[[str, torch.Tensor], dict[str, torch.Tensor]]


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
        starts = _applied_starts(out, plan)
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
        starts = _PlanStarts(plan, statistics, torch_device)
    result = _evaluate(model, plan, starts, text, tokens, context, input_ids, torch_device, quiet)
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


def _evaluate(model, plan, starts, text, tokens, context, input_ids, device, quiet) -> dict:
    from tqdm.auto import tqdm

    modules = list(plan.modules)
    with runnable(model) as (net, load, tokenizer_dir):
        causal = getattr(net, "get_output_embeddings", lambda: None)() is not None
        if input_ids is None:
            tokenizer = load_tokenizer(tokenizer_dir, model)
            digest = text_sha256(text, "evaluation")  # refuses an empty text before any work
            corpus = read_text(text, "evaluation")
            name = describe_text(text, "evaluation")
        else:
            tokenizer, corpus = None, None
            ids = input_ids.to(torch.long).contiguous()
            name, digest = "input_ids", hashlib.sha256(ids.cpu().numpy().tobytes()).hexdigest()
        if causal:
            batches, data = _causal_batches(tokenizer, corpus, input_ids, tokens, context)
            metric = _CausalMetric(batches)
        else:
            batches, data, order = _sentence_batches(tokenizer, corpus, input_ids, tokens, context)
            metric = _EmbeddingMetric(order)
        data = {"text": name, "text_sha256": digest, **data}
        try:
            blocks = len(find_blocks(net, modules)[1])
        except BitallocError:
            outside = next(m for m in modules if not re.search(r"\.\d+\.", m))
            raise BitallocError(
                f"evaluation runs the transformer blocks; {outside} is not inside one"
            ) from None
        rows = sum(int(b.shape[0]) for b in batches)
        bar = tqdm(total=(blocks + rows) * len(VARIANTS), disable=quiet, dynamic_ncols=True, desc="eval")
        if isinstance(starts, _PlanStarts):
            starts.attach(net, load, modules)
        prepare = _Swapper(net, modules, starts, bar)
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


def _step(bar) -> None:
    """After each block and window: the bar, and freed heap pages back to the OS (without it
    the RSS grows by the fragments of every block's temporaries)."""
    from ..profiling.profiler import release_freed_memory

    bar.update(1)
    release_freed_memory()


class _Swapper:
    """``prepare`` for `run_model`: puts each start's weights into the block's planned Linears
    (computed from the block's W once, when the block is read) and undoes it afterwards."""

    def __init__(self, net: nn.Module, modules: list[str], starts: StartWeights, bar) -> None:
        self.net, self.modules, self.starts, self.bar = net, modules, starts, bar
        self.prefix: str | None = None
        self.entered: str | None = None
        self.weights: dict[str, dict[str, torch.Tensor]] = {}

    def __call__(self, variant: str, prefix: str, block: nn.Module):
        if prefix != self.entered:  # the block is read, its weights are the original ones
            self.entered = prefix
            if isinstance(self.starts, _PlanStarts):
                self.starts.enter_block(int(prefix.rstrip(".").rsplit(".", 1)[1]))
        if variant == "original":
            return None
        names = [m for m in self.modules if m.startswith(prefix)]
        if self.prefix != prefix:
            self.prefix, self.weights = prefix, {}
            for name in names:
                linear = self._linear(name)
                self.weights[name] = self.starts(name, linear.weight.detach())
                self.bar.set_postfix_str(name, refresh=False)
        swaps = []
        for name in names:
            linear = self._linear(name)
            old = linear._parameters["weight"]
            new = self.weights[name][variant].to(device=old.device, dtype=old.dtype)
            linear._parameters["weight"] = nn.Parameter(new, requires_grad=False)
            swaps.append((linear, old))
        if variant == VARIANTS[-1]:
            self.weights = {}

        def undo() -> None:
            for linear, old in swaps:
                linear._parameters["weight"] = old

        return undo

    def _linear(self, name: str) -> nn.Linear:
        linear = self.net.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise BitallocError(f"{name} is a {type(linear).__name__}, not an nn.Linear: cannot evaluate it")
        return linear


class _PlanStarts:
    """LoftQ's Q + B·A (as `bitalloc.apply` computes it: same rank, iterations, seed and
    statistics) and QLoRA's Q for a planned matrix, from its W. A data-aware plan's
    statistics are computed block by block in step with the evaluation's own run
    (`enter_block`, called when each block is read), from the calibration tokens."""

    def __init__(self, plan: Plan, statistics, device: torch.device) -> None:
        self.plan, self.statistics, self.device = plan, statistics, device
        self.stepper = None
        self.block: dict[str, torch.Tensor] = {}

    def attach(self, net: nn.Module, load, modules: list[str]) -> None:
        if isinstance(self.statistics, Calibrator):
            self.stepper = self.statistics.stepper(net, load, modules)

    def enter_block(self, index: int) -> None:
        if self.stepper is not None:
            self.block = {}
            self.block = self.stepper.statistics(index)

    def __call__(self, name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        plan = self.plan
        if self.stepper is not None:
            statistic = self.block[name]
        else:
            statistic = None if self.statistics is None else self.statistics[name]
        entry = plan.modules[name]
        config = QuantConfig.parse(entry["config"])
        result = loftq(
            weight, config, rank=int(entry.get("rank", plan.defaults["rank"])), iters=plan.defaults["iters"],
            seed=module_seed(name, config), device=self.device,
            **weighting(statistic, name, plan.damping),
        )  # fmt: skip
        return {
            "loftq": result.q.dequantize() + result.lowrank(),
            "qlora": _nearest(weight.to(self.device), config),
        }


def _nearest(weight: torch.Tensor, config: QuantConfig) -> torch.Tensor:
    """Q = nearest rounding of W in ``config`` (QLoRA's start: no LoRA)."""
    return QuantizedTensor.from_weight(weight.float(), config).dequantize()


def _applied_starts(out: Path, plan: Plan) -> StartWeights:
    """Q read from ``OUT/quantized`` plus B·A (PEFT's scaling) from ``OUT/adapter``; QLoRA's Q
    from the original W."""
    from safetensors import safe_open

    quantized = out / "quantized"
    info = read_quant_info(quantized)
    if sorted(info["modules"]) != sorted(plan.modules):
        raise BitallocError(f"{quantized}: its packed matrices are not the ones its plan lists")
    where = {}
    for file in packed_files(quantized):
        with safe_open(str(file), framework="pt") as handle:
            where.update(dict.fromkeys(handle.keys(), file))
    adapter = _read_adapter(out / "adapter")

    def weights(name: str, weight: torch.Tensor) -> dict[str, torch.Tensor]:
        entry = info["modules"][name]
        config = QuantConfig.parse(entry["config"])
        parts = {}
        for part in PACKED_NAMES:
            key = f"{name}.weight.{part}"
            if key in where:
                with safe_open(str(where[key]), framework="pt") as handle:
                    parts[part] = handle.get_tensor(key)
        try:
            q = QuantizedTensor.from_tensors(parts, config, tuple(entry["shape"])).dequantize()
        except (ValueError, KeyError) as exc:
            raise BitallocError(f"{quantized}: {name}: {exc}") from None
        q = q.to(weight.device)
        if name in adapter:
            scaling, lora_a, lora_b = adapter[name]
            q = q + scaling * (lora_b.to(q.device) @ lora_a.to(q.device))
        return {"loftq": q, "qlora": _nearest(weight, config)}

    return weights


def _read_adapter(folder: Path) -> dict[str, tuple[float, torch.Tensor, torch.Tensor]]:
    """{module: (scaling, A, B)} of a PEFT LoRA adapter written by `bitalloc.apply`."""
    from safetensors.torch import load_file

    config_file, weights_file = folder / "adapter_config.json", folder / ADAPTER_FILE
    if not config_file.is_file():
        return {}  # every rank was 0: apply wrote no adapter
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        tensors = load_file(str(weights_file))
    except (OSError, ValueError) as exc:
        raise BitallocError(f"cannot read the adapter in {folder}: {exc}") from None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = re.fullmatch(r"base_model\.model\.(.+)\.(lora_A|lora_B)(?:\.default)?\.weight", key)
        if match:
            factors.setdefault(match.group(1), {})[match.group(2)] = tensor.float()
    adapter = {}
    for name, pair in factors.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise BitallocError(f"{weights_file}: {name} lacks lora_A or lora_B")
        rank = _pattern(config.get("rank_pattern") or {}, name, config["r"])
        alpha = _pattern(config.get("alpha_pattern") or {}, name, config.get("lora_alpha", rank))
        scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
        adapter[name] = (float(scaling), pair["lora_A"], pair["lora_B"])
    return adapter


def _pattern(patterns: dict, name: str, default):
    """PEFT's rank/alpha pattern lookup: a key matching the end of the module name."""
    if name in patterns:
        return patterns[name]
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# ---- data ---------------------------------------------------------------------------------


def _causal_batches(tokenizer, corpus, input_ids, tokens, context):
    if input_ids is None:
        ids = tokenize(tokenizer, corpus, tokens)
    else:
        ids = input_ids.to(torch.long)
        ids = ids.reshape(-1)[:tokens] if ids.dim() == 1 else ids
    rows = windows(ids, context) if ids.dim() == 1 else ids
    if rows.shape[1] < 2:
        raise BitallocError("the evaluation text has fewer than 2 tokens")
    per_batch = max(1, BATCH_TOKENS // rows.shape[1])
    batches = [rows[i : i + per_batch] for i in range(0, rows.shape[0], per_batch)]
    data = {
        "tokens": int(rows.shape[0] * (rows.shape[1] - 1)),
        "windows": int(rows.shape[0]),
        "context": int(rows.shape[1]),
    }
    return batches, data


def evaluation_sentences(text: str) -> list[str]:
    """Prose sentences of a text (paragraphs cut at ., ! or ?; code and short lines dropped),
    each once, in order: what an encoder is evaluated on."""
    seen, sentences = set(), []
    for paragraph in text.split("\n\n"):
        if not paragraph.strip() or paragraph.startswith((" ", "\t")):  # code examples are indented
            continue
        flat = " ".join(paragraph.split())
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", flat):
            words = sentence.split()
            if len(words) < MIN_SENTENCE_WORDS or len(sentence) > MAX_SENTENCE_CHARS:
                continue
            if not sentence[0].isalpha() or sentence in seen:
                continue
            seen.add(sentence)
            sentences.append(sentence)
    return sentences


def _sentence_batches(tokenizer, corpus, input_ids, tokens, context):
    """Sentences as id rows grouped by length (no padding), up to ``tokens`` tokens."""
    if input_ids is not None:
        rows = input_ids.to(torch.long)
        rows = rows.reshape(1, -1) if rows.dim() == 1 else rows
        encoded = [row[:context] for row in rows]
    else:
        encoded, total = [], 0
        for sentence in evaluation_sentences(corpus):
            ids = tokenizer(sentence, add_special_tokens=True, truncation=True, max_length=context)[
                "input_ids"
            ]
            encoded.append(torch.tensor(ids, dtype=torch.long))
            total += len(ids)
            if total >= tokens:
                break
    if not encoded:
        raise BitallocError("the evaluation text has no sentences to embed")
    by_length: dict[int, list[int]] = {}
    for index, ids in enumerate(encoded):
        by_length.setdefault(int(ids.numel()), []).append(index)
    batches, order = [], []
    for length in sorted(by_length):
        indices = by_length[length]
        per_batch = max(1, BATCH_TOKENS // length)
        for i in range(0, len(indices), per_batch):
            chunk = indices[i : i + per_batch]
            batches.append(torch.stack([encoded[j] for j in chunk]))
            order.append(chunk)
    data = {"sentences": len(encoded), "tokens": int(sum(ids.numel() for ids in encoded)), "context": context}
    return batches, data, order


# ---- metrics ------------------------------------------------------------------------------


class _CausalMetric:
    """Per window: NLL of each start; KL(original || start) and top-1 agreement per token."""

    def __init__(self, batches: list[torch.Tensor]) -> None:
        self.batches = batches
        self.nll = dict.fromkeys(VARIANTS, 0.0)
        self.count = dict.fromkeys(VARIANTS, 0)
        self.kl: dict[str, list[np.ndarray]] = {v: [] for v in VARIANTS[1:]}
        self.agree = dict.fromkeys(VARIANTS[1:], 0)
        self.reference: torch.Tensor | None = None

    def add(self, batch: int, row: int, variant: str, output) -> None:
        logits = output.logits[0, :-1]
        targets = self.batches[batch][row, 1:].to(logits.device)
        if variant == VARIANTS[0]:
            self.reference = logits
        nll, kl, agree = 0.0, [], 0
        step = max(1, KL_CHUNK_ELEMENTS // logits.shape[-1])
        for start in range(0, logits.shape[0], step):
            part = logits[start : start + step]
            logp = torch.log_softmax(part.double(), dim=-1)
            nll -= float(logp.gather(-1, targets[start : start + step].unsqueeze(-1)).sum())
            if variant != VARIANTS[0]:
                ref = self.reference[start : start + step]
                ref_logp = torch.log_softmax(ref.double(), dim=-1)
                logp.neg_().add_(ref_logp)  # log p_original - log p_start
                kl.append(ref_logp.exp_().mul_(logp).sum(-1).cpu().numpy())
                agree += int((part.argmax(-1) == ref.argmax(-1)).sum())
            del logp
        self.nll[variant] += nll
        self.count[variant] += int(logits.shape[0])
        if variant != VARIANTS[0]:
            self.kl[variant].extend(kl)
            self.agree[variant] += agree
        if variant == VARIANTS[-1]:
            self.reference = None

    def results(self) -> dict:
        out = {}
        base = self.nll[VARIANTS[0]] / self.count[VARIANTS[0]]
        for variant in VARIANTS:
            nll = self.nll[variant] / self.count[variant]
            row = {"perplexity": _finite(math.exp(min(nll, 700.0))), "nll": nll}
            if variant != VARIANTS[0]:
                kl = np.concatenate(self.kl[variant])
                row.update(
                    ppl_ratio=_finite(math.exp(min(nll - base, 700.0))),
                    kl_mean=float(kl.mean()),
                    kl_stderr=float(kl.std(ddof=1) / math.sqrt(kl.size)) if kl.size > 1 else 0.0,
                    kl_median=float(np.percentile(kl, 50)),
                    kl_p90=float(np.percentile(kl, 90)),
                    kl_p99=float(np.percentile(kl, 99)),
                    kl_max=float(kl.max()),
                    top1_agreement=self.agree[variant] / kl.size,
                )
            out[variant] = row
        return out


class _EmbeddingMetric:
    """Per sentence: the mean-pooled last hidden state; cosine similarity to the original's."""

    def __init__(self, order: list[list[int]]) -> None:
        self.order = order
        self.reference: dict[int, torch.Tensor] = {}
        self.cosines: dict[str, dict[int, float]] = {v: {} for v in VARIANTS[1:]}

    def add(self, batch: int, row: int, variant: str, output) -> None:
        index = self.order[batch][row]
        embedding = output.last_hidden_state[0].double().mean(dim=0)
        if variant == VARIANTS[0]:
            self.reference[index] = embedding
            return
        reference = self.reference[index]
        cosine = torch.nn.functional.cosine_similarity(embedding, reference, dim=0)
        self.cosines[variant][index] = float(cosine)
        if variant == VARIANTS[-1]:
            del self.reference[index]

    def results(self) -> dict:
        out = {VARIANTS[0]: {"cosine_mean": 1.0}}
        for variant, by_index in self.cosines.items():
            values = np.array([by_index[i] for i in sorted(by_index)])
            out[variant] = {
                "cosine_mean": float(values.mean()),
                "cosine_median": float(np.percentile(values, 50)),
                "cosine_p01": float(np.percentile(values, 1)),
                "cosine_min": float(values.min()),
            }
        return out


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


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _short(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"
