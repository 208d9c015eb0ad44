"""Per-matrix loss coefficients by noise injection (HIGGS, arXiv 2411.17525).

A planner that minimizes the sum of per-matrix output errors e_m = mean over tokens of
‖(W − Ŵ)x‖² treats every matrix alike, but the same output error costs the model's loss
more in some layers than in others. `layer_coefficients` measures a coefficient c_m per
matrix such that the KL divergence of the quantized model from the original is about
Σ c_m · e_m: for every matrix m and every size α it runs a variant of the model in which
only m's weight is W + α·E_m (E_m shaped like m's real quantization residual, from the
caller), measures the output error it injects, e = mean over the calibration tokens of
‖α·E_m x‖² (x: m's inputs in that run), and the mean per-token KL(p_original ‖ p_variant)
of the next-token distributions at every position. c_m is the least-squares slope through
the origin of KL on e over the sizes, Σ e·KL / Σ e², clamped at 0 (0 when E_m is 0).

Cost: the model streams block by block (`bitalloc.checkpoints.runnable.run_model`), each
block read once per pass. A variant's hidden states equal the original's up to the block
that holds its matrix, so it runs only from that block on (on average half the model).
The output layer runs in vocabulary chunks fused with the KL sums (the row's logits are
never whole in memory for a variant): per token, with p the original's distribution and
z the variant's logits, KL = (lse(z) − lse(z_original)) − (Σ p·z − Σ p·z_original), in
float64, so an unchanged model gives exactly 0. Memory: one block, one row's p, and the
hidden states of every variant of a pass (variants x tokens x hidden); when those would
exceed `MEMORY_BUDGET`, the matrices are split into passes of consecutive blocks.
Measured cost: `benchmarks/bench_sensitivity.py` (figures in docs/data_aware.md).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoints.runnable import BATCH_TOKENS, find_blocks, run_model, runnable
from ..errors import BitallocError
from .memory import release_freed_memory

METHOD = "noise-injection-kl"
MEMORY_BUDGET = 2 << 30  # bytes of hidden states (all variants of one pass)
CHUNK_ELEMENTS = 1 << 20  # logits per vocabulary chunk (float64: 8 MB, stays in cache)
ORIGINAL = "original"  # the unperturbed variant (module variants are "name@k", k the size index)

Residual = Callable[[str, torch.Tensor], torch.Tensor]


@dataclass
class Sensitivity:
    """KL per unit output error of each matrix, and what produced it."""

    coefficients: dict[str, float]  # module -> c_m (KL per unit output error), >= 0
    info: dict  # method, tokens, context, windows, sizes, text, text_sha256, passes, seconds
    points: dict[str, list[tuple[float, float]]]  # module -> [(injected e, mean KL)] per size
    seconds: float = field(default=0.0, compare=False)


def layer_coefficients(
    model,
    modules: Sequence[str],
    residual: Residual,
    *,
    input_ids: torch.Tensor,
    sizes: Sequence[float] = (0.5, 1.0),
    quiet: bool = True,
) -> Sensitivity:
    """c_m for every Linear in ``modules`` (inside the transformer blocks) of ``model``.

    ``model``: an HF folder or GGUF file (streamed: built on the meta device, blocks read one
    at a time) or an in-memory transformers causal LM. ``residual(name, W)`` gives, from
    the matrix's original weight (float32), the perturbation E (W's shape) whose multiples
    α·E (α in ``sizes``) are injected. ``input_ids``: (n, context) token ids.
    """
    from tqdm.auto import tqdm

    began = time.perf_counter()
    modules, sizes, input_ids = _checked_arguments(modules, sizes, input_ids)
    with torch.inference_mode(), runnable(model) as (net, load, _):
        blocks_name, blocks = _check_model(net, modules, input_ids)
        block_of = {m: int(m[len(blocks_name) + 1 :].split(".", 1)[0]) for m in modules}
        position = {m: i for i, m in enumerate(modules)}
        order = sorted(modules, key=lambda m: (block_of[m], position[m]))
        groups = _groups(net, order, len(sizes), input_ids.numel())
        rows, width = input_ids.shape
        batch = max(1, BATCH_TOKENS // width)  # rows per forward pass through a block
        batches = [input_ids[i : i + batch] for i in range(0, rows, batch)]
        total = sum(
            sum(len(blocks) - block_of[m] for m in group) * len(sizes) + len(blocks)
            + rows * (1 + len(group) * len(sizes))
            for group in groups
        )  # fmt: skip
        bar = tqdm(total=total, disable=quiet, dynamic_ncols=True, desc="sensitivity")
        errors: dict[str, float] = {}
        divergences: dict[str, float] = {}
        try:
            for group in groups:
                variants = [ORIGINAL] + [f"{m}@{k}" for m in group for k in range(len(sizes))]
                injector = _Injector(net, group, sizes, residual, errors)
                metric = _Divergence(net, variants, divergences)
                with metric.head:
                    run_model(
                        net, batches, group, metric, variants=variants, prepare=injector, load=load,
                        progress=lambda: _step(bar),
                        start=lambda v: 0 if v == ORIGINAL else block_of[v.rsplit("@", 1)[0]],
                    )  # fmt: skip
        finally:
            bar.close()
    return _sensitivity(modules, sizes, errors, divergences, input_ids, began, len(groups))


def _sensitivity(modules, sizes, errors, divergences, input_ids, began: float, passes: int) -> Sensitivity:
    """The coefficients (slope of KL on injected error) and the run's record."""
    points, coefficients = {}, {}
    for m in modules:
        pairs = [(errors[f"{m}@{k}"], divergences[f"{m}@{k}"]) for k in range(len(sizes))]
        points[m] = pairs
        coefficients[m] = _slope(pairs)
    seconds = time.perf_counter() - began
    ids = input_ids.to(torch.long).contiguous().cpu()
    info = {
        "method": METHOD,
        "tokens": int(ids.numel()),
        "context": int(ids.shape[1]),
        "windows": int(ids.shape[0]),
        "sizes": [float(a) for a in sizes],
        "text": "input_ids",
        "text_sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest(),
        "modules": len(modules),
        "passes": passes,
        "seconds": seconds,
    }
    return Sensitivity(coefficients, info, points, seconds)


def _slope(pairs: list[tuple[float, float]]) -> float:
    """Least-squares slope through the origin of KL on e, clamped at 0 (0 for e = 0)."""
    den = sum(e * e for e, _ in pairs)
    if den <= 0.0:
        return 0.0
    return max(0.0, sum(e * kl for e, kl in pairs) / den)


def _step(bar) -> None:
    bar.update(1)
    release_freed_memory()


# ---- checks -------------------------------------------------------------------------------


def _checked_arguments(modules, sizes, input_ids):
    modules = list(modules)
    if not modules:
        raise BitallocError("no modules to measure the sensitivity of")
    repeated = sorted({m for m in modules if modules.count(m) > 1})
    if repeated:
        raise BitallocError(f"module {repeated[0]} is listed more than once")
    try:
        sizes = [float(a) for a in sizes]
    except (TypeError, ValueError):
        raise BitallocError(f"sizes must be numbers, got {sizes!r}") from None
    if not sizes or not all(math.isfinite(a) and a > 0 for a in sizes):
        raise BitallocError(f"sizes must be one or more positive numbers, got {sizes}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise BitallocError(f"input_ids must be a non-empty (n, context) tensor of token ids, got {shape}")
    if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
        raise BitallocError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    return modules, sizes, input_ids.to(torch.long)


def _check_model(net: nn.Module, modules: list[str], input_ids: torch.Tensor):
    for name in modules:
        try:
            module = net.get_submodule(name)
        except AttributeError:
            raise BitallocError(f"the model has no module {name}") from None
        if not isinstance(module, nn.Linear):
            raise BitallocError(f"{name} is a {type(module).__name__}, not an nn.Linear layer")
    if not isinstance(getattr(net, "get_output_embeddings", lambda: None)(), nn.Module):
        raise BitallocError(f"{type(net).__name__} has no output layer: sensitivity needs a causal LM")
    for name in modules:
        try:
            find_blocks(net, [name])
        except BitallocError:
            raise BitallocError(
                f"{name} is not inside a transformer block (sensitivity runs those)"
            ) from None
    try:
        blocks_name, blocks = find_blocks(net, modules)
    except BitallocError:
        raise BitallocError("the modules are not all in one list of transformer blocks") from None
    embeddings = net.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None)
    low, high = int(input_ids.min()), int(input_ids.max())
    if vocab is not None and (low < 0 or high >= vocab):
        raise BitallocError(f"input_ids must lie in [0, {vocab}), got {low}..{high}")
    return blocks_name, blocks


def _groups(net: nn.Module, order: list[str], sizes: int, tokens: int) -> list[list[str]]:
    """Modules (in block order) in passes whose variants' hidden states fit `MEMORY_BUDGET`."""
    config = getattr(net, "config", None)
    hidden = getattr(config, "hidden_size", None) or net.get_input_embeddings().embedding_dim
    itemsize = max(4, next(net.parameters()).element_size())
    per_variant = tokens * int(hidden) * itemsize
    per_pass = max(1, (MEMORY_BUDGET // per_variant - 1) // sizes)  # modules per pass
    return [order[i : i + per_pass] for i in range(0, len(order), per_pass)]


# ---- the variants -------------------------------------------------------------------------


class _Injector:
    """``prepare`` for `run_model`: in the block of a variant's matrix, its weight becomes
    W + α·E, with a hook adding up ‖α·E x‖² over the tokens that run through it."""

    def __init__(self, net, modules, sizes, residual, errors) -> None:
        self.net, self.modules, self.sizes, self.residual = net, modules, sizes, residual
        self.errors = errors  # variant -> mean injected output error (filled in)
        self.prefix: str | None = None
        self.perturbations: dict[str, torch.Tensor] = {}

    def __call__(self, variant: str, prefix: str, block: nn.Module):
        if variant == ORIGINAL:
            return None
        name, k = variant.rsplit("@", 1)
        if not name.startswith(prefix):
            return None  # a later block: the variant runs it unchanged
        if self.prefix != prefix:
            self.prefix, self.perturbations = prefix, {}
        linear = self.net.get_submodule(name)
        if name not in self.perturbations:
            self.perturbations[name] = self._perturbation(name, linear.weight)
        delta = self.perturbations[name] * self.sizes[int(k)]
        old = linear._parameters["weight"]
        linear._parameters["weight"] = nn.Parameter((old.float() + delta).to(old.dtype), requires_grad=False)
        sums = [0.0, 0]

        def measure(module, args) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            sums[0] += float((x.float() @ delta.T).square().sum(dtype=torch.float64))
            sums[1] += x.shape[0]

        handle = linear.register_forward_pre_hook(measure)

        def undo() -> None:
            handle.remove()
            linear._parameters["weight"] = old
            self.errors[variant] = sums[0] / max(sums[1], 1)

        return undo

    def _perturbation(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        w = weight.detach().to(torch.float32, copy=True)
        e = self.residual(name, w)
        if not isinstance(e, torch.Tensor):
            raise BitallocError(f"residual({name!r}) returned a {type(e).__name__}, not a tensor")
        if tuple(e.shape) != tuple(weight.shape):
            raise BitallocError(
                f"residual({name!r}) has shape {tuple(e.shape)}, the weight {tuple(weight.shape)}"
            )
        e = e.detach().to(device=weight.device, dtype=torch.float32)
        if not bool(torch.isfinite(e).all()):
            raise BitallocError(f"residual({name!r}) has non-finite values")
        return e


# ---- the output layer and KL --------------------------------------------------------------


class _Head:
    """The model's output Linear, computed in vocabulary chunks from its input.

    While installed (``with``), the Linear's forward records its input (the final hidden
    states) and weight. The first call (the original's first row) runs it as usual and
    checks that the model's logits are that Linear's output; after that, calls skip it (the
    model's whole logits are never computed) and `chunks` computes them chunk by chunk. A
    model that transforms its logits further (soft-capping, scaling) keeps its own logits.
    """

    def __init__(self, net: nn.Module) -> None:
        self.linear = net.get_output_embeddings()
        self.fast: bool | None = None if isinstance(self.linear, nn.Linear) else False
        self.hidden = self.source = self.weight = self.bias = None

    def __enter__(self):
        if self.fast is None:
            self.linear.forward = self._forward  # an instance attribute: the class's is untouched
        return self

    def __exit__(self, *exc) -> None:
        self.linear.__dict__.pop("forward", None)
        self.hidden = self.source = self.weight = self.bias = None

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.linear.weight, self.linear.bias  # loaded by now (a pre-hook)
        if weight is not self.source:
            self.source, self.weight = weight, weight.float()
            self.bias = None if bias is None else bias.float()
        self.hidden = x
        if self.fast:
            return x  # stands in for the logits, which `chunks` computes
        return nn.functional.linear(x, weight, bias)

    def chunks(self, output) -> Iterator[torch.Tensor]:
        """The row's float32 logits (positions x vocabulary) in vocabulary chunks."""
        if self.fast is None:
            computed = list(self._computed()) if self.hidden is not None else []
            self.fast = _same(computed, output.logits[0])
            if self.fast:
                return iter(computed)
            del computed
            self.linear.__dict__.pop("forward", None)
        if self.fast:
            return self._computed()
        logits = output.logits[0].float()
        step = _chunk(*logits.shape)
        return (logits[:, i : i + step] for i in range(0, logits.shape[1], step))

    def _computed(self) -> Iterator[torch.Tensor]:
        x = self.hidden.reshape(-1, self.hidden.shape[-1]).float()
        vocab = self.weight.shape[0]
        step = _chunk(x.shape[0], vocab)
        for i in range(0, vocab, step):
            bias = None if self.bias is None else self.bias[i : i + step]
            yield nn.functional.linear(x, self.weight[i : i + step], bias)


def _same(chunks: list[torch.Tensor], logits: torch.Tensor) -> bool:
    """Whether ``chunks`` are ``logits`` (positions x vocabulary) cut by columns, up to the
    rounding of a float32 matrix product."""
    if not chunks or sum(c.shape[1] for c in chunks) != logits.shape[-1] or logits.dim() != 2:
        return False
    if chunks[0].shape[0] != logits.shape[0]:
        return False
    tolerance = 1e-5 * (float(logits.abs().max()) + 1.0)
    start = 0
    for chunk in chunks:
        part = logits[:, start : start + chunk.shape[1]].float()
        if float((chunk - part).abs().max()) > tolerance:
            return False
        start += chunk.shape[1]
    return True


def _chunk(positions: int, vocab: int) -> int:
    return max(64, min(vocab, CHUNK_ELEMENTS // max(positions, 1)))


class _Divergence:
    """``on_output`` for `run_model`: the mean over positions of KL(original ‖ variant).

    For each row the original comes first: its p (float32, in chunks), logsumexp and Σ p·z
    are kept while the row's variants follow, each streamed chunk by chunk."""

    def __init__(self, net: nn.Module, variants: list[str], results: dict[str, float]) -> None:
        self.head = _Head(net)
        self.last = variants[-1]
        self.sums = dict.fromkeys(variants[1:], 0.0)
        self.positions = 0
        self.results = results  # variant -> mean KL (written after each row's last variant)
        self.reference = None

    def __call__(self, batch: int, row: int, variant: str, output) -> None:
        if variant == ORIGINAL:
            chunks = list(self.head.chunks(output))
            lse, _ = _statistics(chunks)
            probabilities = [torch.exp(z.double() - lse[:, None]).float() for z in chunks]
            _, dot = _statistics(chunks, probabilities, lse_too=False)
            self.reference = (probabilities, lse, dot)
            self.positions += chunks[0].shape[0]
            return
        probabilities, lse_ref, dot_ref = self.reference
        lse, dot = _statistics(self.head.chunks(output), probabilities)
        kl = (lse - lse_ref) - (dot - dot_ref)
        self.sums[variant] += float(kl.sum())
        if variant == self.last:
            self.reference = None
            for name, total in self.sums.items():
                self.results[name] = total / self.positions


def _statistics(chunks, probabilities=None, lse_too: bool = True):
    """Per position, in float64: the logsumexp of the logits (``lse_too``) and Σ p·z
    (with ``probabilities`` p in the same chunks), accumulated chunk by chunk. Equal chunks
    give bitwise equal results."""
    top = total = dot = None
    for j, chunk in enumerate(chunks):
        z = chunk.to(torch.float64, copy=True)
        if probabilities is not None:
            part = torch.bmm(probabilities[j].double().unsqueeze(1), z.unsqueeze(2))[:, 0, 0]
            dot = part if dot is None else dot + part
        if lse_too:
            high = z.amax(dim=1) if top is None else torch.maximum(top, z.amax(dim=1))
            if total is not None:
                total *= torch.exp(top - high)
            top = high
            part = z.sub_(high[:, None]).exp_().sum(dim=1)
            total = part if total is None else total + part
    return (top + total.log() if lse_too else None), dot
