"""Input statistics of the data-aware objectives, computed block by block and never stored.

What matters for a quantized layer is its output error ‖(W − Ŵ)Xᵀ‖ over calibration inputs
X. The output objective weights each decomposition by the full second moment
H = XᵀX/n (in × in) of the Linear's input; the activation objective by its diagonal
h = diag(H) + 0.01·mean (damped so that dead channels cannot blow the weights up).
Linears that read the same tensor (q/k/v, gate/up) share one H.

The statistics are computed one transformer block at a time (`Calibrator.stream`): the
calibration tokens' hidden states (of the original model) run through block l with hooks on
its Linears, the block's H (float64 sums, handed over as float32) go to the caller, which
uses them (the profile measures that block's matrices; `apply` and `eval` decompose them)
and drops them before the next block. Memory holds one block's statistics; nothing is
written to disk. What is needed to compute them again goes in the profile and the plan
(`Calibrator.record`): the text's name, sha256 and (for a user file) path, the token count,
the context, the damping and the sha256 of the token ids; for token ids given directly only
their sha256, so `apply` needs the same ids given again (checked). Same ids, same code: the
recomputed statistics equal the profile's to float rounding (bit for bit on one machine and
thread count).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import open_source
from ..checkpoints.runnable import BATCH_TOKENS, BlockRunner, can_run, load_tokenizer, runnable
from ..errors import BitallocError
from ..texts import DEFAULT_TEXT, describe_text, is_default, text_sha256, tokenize_prefix, windows
from .settings import DEFAULT_CONTEXT, DEFAULT_TOKENS, OBJECTIVES, CalibrationSettings

DAMPING = 0.01
CALIBRATION_FORMAT = "bitalloc.calibration/v1"
CALIBRATION_SUFFIX = ".calibration.safetensors"  # earlier versions' side file (no longer written)


def calibration_path(path: str | os.PathLike) -> Path:
    """The side file earlier versions kept beside a profile or plan (``profile.parquet`` ->
    ``profile.calibration.safetensors``); nothing writes or reads it any more."""
    path = Path(path)
    return path.with_name(path.stem + CALIBRATION_SUFFIX)


def ids_digest(ids: torch.Tensor) -> str:
    """sha256 of token ids (as int64): identifies given ids, and the windows a text gave."""
    return hashlib.sha256(ids.to(torch.long).contiguous().cpu().numpy().tobytes()).hexdigest()


@dataclass
class Calibration:
    """The statistics of a calibration run held in memory (`calibrate`): h by module
    (``column_weights``) or H by module (``covariances``; modules reading one input share
    one tensor), and the run's record."""

    column_weights: dict[str, torch.Tensor] | None
    info: dict
    seconds: float = field(default=0.0, compare=False)
    covariances: dict[str, torch.Tensor] | None = field(default=None, compare=False, repr=False)

    @property
    def statistics(self) -> dict[str, torch.Tensor]:
        return self.covariances if self.covariances is not None else self.column_weights


class InputStatistics(dict):
    """h or H by module, all in memory, with the λ (``damping``) of the profile they are from
    (`load_input_statistics`)."""

    damping: float = DAMPING


def weighting(statistics, module: str, damping: float | None = None) -> dict:
    """The keyword arguments that weight `loftq`'s decomposition of ``module``: by h
    (1-D: ``column_weights``) or by H (2-D: ``input_covariance`` with ``damping`` λ, by
    default the statistics' own or 0.01); nothing when ``statistics`` is None.
    ``statistics`` maps modules to h or H, or is the statistic itself."""
    if statistics is None:
        return {}
    statistic = statistics if isinstance(statistics, torch.Tensor) else statistics[module]
    if statistic.dim() == 2:
        lam = getattr(statistics, "damping", DAMPING) if damping is None else damping
        return {"input_covariance": statistic, "damping": lam}
    return {"column_weights": statistic}


def load_input_statistics(
    profile_table_or_path,
    model=None,
    *,
    text: str | os.PathLike | None = None,
    input_ids: torch.Tensor | None = None,
    column_weights: dict | None = None,
    quiet: bool = True,
) -> InputStatistics:
    """Every statistic a data-aware profile's decompositions were weighted with, computed
    again in memory (for small models: SmolLM2's H take 400 MB) from the profile's record:
    ``model`` (default: the profile's recorded source), its calibration ``text`` if moved,
    or the same ``input_ids``/``column_weights`` given again (checked by sha256)."""
    import pandas as pd

    from .table import read_profile

    table = profile_table_or_path
    if not isinstance(table, pd.DataFrame):
        table = read_profile(table)
    attrs = table.attrs
    objective = attrs.get("objective")
    if objective not in ("activation", "output"):
        raise BitallocError("the profile is not data-aware: it has no calibration")
    model = attrs.get("source") if model is None else model
    modules = list(dict.fromkeys(table["module"]))
    shapes = {
        m: tuple(int(x) for x in str(shape).split("x")) for m, shape in zip(table["module"], table["shape"])
    }
    found = statistics_for_plan(model, objective, attrs.get("calibration"), shapes, text=text,
                                input_ids=input_ids, column_weights=column_weights)  # fmt: skip
    result = InputStatistics(
        found if isinstance(found, dict) else found.statistics(model, modules, quiet=quiet)
    )
    result.damping = float((attrs.get("calibration") or {}).get("lambda", DAMPING))
    return result


def calibration_spec(
    text: str | os.PathLike | None = DEFAULT_TEXT,
    tokens: int = DEFAULT_TOKENS,
    context: int = DEFAULT_CONTEXT,
    input_ids: torch.Tensor | None = None,
    covariance: bool = False,
) -> dict:
    """What identifies a calibration run (it goes in the profile settings: its resume
    identity): the text's name and sha256, the tokens asked for, the context and the
    damping (and, for full input covariances, ``statistic``). ``text`` None or "default"
    is the built-in text; ``input_ids`` (token ids given directly) replace it."""
    if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
        raise BitallocError(f"calibration tokens must be a positive whole number, got {tokens!r}")
    if isinstance(context, bool) or not isinstance(context, int) or context <= 0:
        raise BitallocError(f"calibration context must be a positive whole number, got {context!r}")
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() not in (1, 2) or input_ids.numel() == 0:
            raise BitallocError("calibration ids must be a non-empty 1-D or 2-D tensor of token ids")
        name, digest = "input_ids", ids_digest(input_ids)
        context = input_ids.shape[-1] if input_ids.dim() == 2 else context
    else:
        name, digest = describe_text(text), text_sha256(text)
    spec = {"text": name, "text_sha256": digest, "tokens": int(tokens), "context": int(context)}
    spec["damping"] = DAMPING
    if covariance:  # H itself is undamped: λ is the profile's setting (`lambda`)
        spec.update(statistic="covariance", damping=0.0)
    return spec


def token_windows(model, tokenizer_dir, text, tokens: int, context: int, input_ids=None) -> torch.Tensor:
    """The calibration tokens as (n, context) windows: the first ``tokens`` of ``text``
    (tokenized with the model's tokenizer), or ``input_ids`` (1-D: cut and windowed; 2-D:
    as given)."""
    if input_ids is None:
        ids = tokenize_prefix(load_tokenizer(tokenizer_dir, model), text, tokens)
    elif input_ids.dim() == 1:
        ids = input_ids.to(torch.long).reshape(-1)[:tokens]
    else:
        return input_ids.to(torch.long)
    return windows(ids, context)


class Calibrator:
    """Computes the statistics of one calibration (text or token ids, objective) block by
    block, for a profile or again for `apply`/`eval`: ``ids`` are the (n, context) windows,
    ``record`` what the profile and plan keep of it (`calibration_record`)."""

    def __init__(self, ids: torch.Tensor, record: dict, covariance: bool,
                 batch_tokens: int = BATCH_TOKENS) -> None:  # fmt: skip
        self.ids, self.record, self.covariance, self.batch_tokens = ids, record, covariance, batch_tokens

    def stream(
        self,
        model,
        modules: Sequence[str],
        consume: Callable[[list[str], dict[str, torch.Tensor]], None],
        *,
        quiet: bool = True,
        timings: dict | None = None,
    ) -> None:
        """Run ``model`` over the tokens one block at a time, up to the last block holding
        one of ``modules``; after each block that holds some, ``consume(names, statistics)``
        gets them (in ``modules`` order) and their h or H (float32; shared inputs share a
        tensor), which are dropped when it returns. ``timings["calibration"]`` (if given)
        adds the seconds spent outside ``consume``."""
        modules = list(modules)
        if not modules:
            return
        start, spent = time.perf_counter(), 0.0

        def timed(names: list[str], statistics: dict[str, torch.Tensor]) -> None:
            nonlocal spent
            begin = time.perf_counter()
            consume(names, statistics)
            spent += time.perf_counter() - begin

        with runnable(model) as (net, load, _):
            collect_statistics(net, self.ids, modules, timed, covariance=self.covariance, load=load,
                               batch_tokens=self.batch_tokens, quiet=quiet)  # fmt: skip
        if timings is not None:
            timings["calibration"] = timings.get("calibration", 0.0) + time.perf_counter() - start - spent

    def stepper(self, net: nn.Module, load, modules: Sequence[str]) -> BlockStepper:
        """Statistics in step with a caller that runs the blocks itself (`eval`)."""
        return BlockStepper(self, net, load, modules)

    def statistics(self, model, modules: Sequence[str], *, quiet: bool = True) -> dict[str, torch.Tensor]:
        """Every module's statistic in memory at once (small models, tests, benchmarks)."""
        found: dict[str, torch.Tensor] = {}
        self.stream(model, modules, lambda names, stats: found.update({n: stats[n] for n in names}),
                    quiet=quiet)  # fmt: skip
        return found


def collect_statistics(
    net: nn.Module,
    input_ids: torch.Tensor,
    modules: Sequence[str],
    consume: Callable[[list[str], dict[str, torch.Tensor]], None],
    *,
    covariance: bool = False,
    load: Callable[[str], torch.Tensor] | None = None,
    batch_tokens: int = BATCH_TOKENS,
    quiet: bool = True,
) -> None:
    """Run ``net`` over ``input_ids`` (n, context) one block at a time (parameters on the meta
    device read with ``load`` when their block runs, released after it) up to the last block
    holding one of ``modules``; after each block that holds some, ``consume(names,
    statistics)`` gets their damped h, or with ``covariance`` their H (float32)."""
    runner = BlockRunner(net, input_ids, modules, load=load, batch_tokens=batch_tokens)
    by_block: dict[int, list[str]] = {}
    for name in modules:
        by_block.setdefault(runner.block_of(name), []).append(name)
    last = max(by_block)
    for index in range(last + 1):
        names = by_block.get(index, [])
        collector = _Collector(net, names, covariance, windows=len(input_ids))
        runner.step(index, collector.hooks if names else None)
        if not quiet:
            print(f"calibrated block {index + 1}/{last + 1}", flush=True)
        if names:
            statistics = collector.result()
            del collector
            consume(names, statistics)
            del statistics


def collect_column_weights(
    net: nn.Module,
    input_ids: torch.Tensor,
    modules: Sequence[str],
    *,
    load=None,
    batch_tokens: int = BATCH_TOKENS,
) -> dict[str, torch.Tensor]:
    """Damped diag(XᵀX)/n of each named Linear's input, all in memory (`collect_statistics`)."""
    found: dict[str, torch.Tensor] = {}
    collect_statistics(net, input_ids, modules, lambda names, stats: found.update(stats), load=load,
                       batch_tokens=batch_tokens)  # fmt: skip
    return found


class BlockStepper:
    """A calibration run advanced block by block by a caller that reads and runs the blocks
    itself (`bitalloc.evaluation` runs the model over its own text): `statistics(index,
    block)` runs the calibration states through the caller's materialized block (original
    weights) and returns the statistics of the planned modules in it."""

    def __init__(self, calibrator: Calibrator, net: nn.Module, load, modules: Sequence[str]) -> None:
        self.calibrator, self.net, self.modules = calibrator, net, list(modules)
        self.runner = BlockRunner(net, calibrator.ids, self.modules, load=load,
                                  batch_tokens=calibrator.batch_tokens)  # fmt: skip
        self.last = self.runner.last_block(self.modules)

    def statistics(self, index: int) -> dict[str, torch.Tensor]:
        """Run block ``index`` (materialized by the caller) and return its statistics; blocks
        must come in order (each once), and nothing is run past the last planned one."""
        if index > self.last or index < self.runner.next:
            return {}
        while self.runner.next < index:  # blocks without planned matrices: only advance the states
            self.runner.step(self.runner.next)
        names = [m for m in self.modules if self.runner.block_of(m) == index]
        collector = _Collector(self.net, names, self.calibrator.covariance, windows=len(self.calibrator.ids))
        self.runner.step(index, collector.hooks if names else None, materialized=True)
        return collector.result() if names else {}


class _Collector:
    """Forward pre-hooks on a block's named Linears accumulating Σx² (h) or XᵀX (H) in
    float64; `result` gives them divided by the token count, as float32."""

    def __init__(self, net: nn.Module, names: Sequence[str], covariance: bool, windows: int = 0) -> None:
        self.net, self.names, self.covariance, self.windows = net, list(names), covariance, windows
        self.state: dict = {"sums": {}, "counts": {}, "groups": {}, "seen": []}

    def hooks(self, block: nn.Module) -> list:
        state = self.state
        hooks = [block.register_forward_pre_hook(lambda *_: state["seen"].clear())]
        for name in self.names:
            linear = self.net.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise BitallocError(
                    f"{name} is a {type(linear).__name__}, not an nn.Linear: cannot calibrate it"
                )
            if self.covariance:
                hooks.append(linear.register_forward_pre_hook(_covariance_accumulator(name, state)))
            else:
                accumulate = _accumulator(name, state["sums"], state["counts"])
                hooks.append(linear.register_forward_pre_hook(accumulate))
        return hooks

    def result(self) -> dict[str, torch.Tensor]:
        state, found = self.state, {}
        seen = state["groups"] if self.covariance else state["sums"]
        missing = [m for m in self.names if m not in seen]
        unrouted = [m for m in missing if is_expert(m)]  # a router sent it no calibration token
        if len(unrouted) < len(missing):
            first = next(m for m in missing if m not in unrouted)
            raise BitallocError(f"{first} never ran on the calibration tokens: no input statistics")
        if unrouted:  # planned on its weights: statistics flat, at its peers' level
            means = {}
            for name in [m for m in self.names if m in seen]:
                key = state["groups"][name] if self.covariance else name
                total = state["sums"][key].diagonal() if self.covariance else state["sums"][key]
                means[name] = float(total.mean() / state["counts"][key])
            for name in unrouted:
                size, level = self.net.get_submodule(name).in_features, unrouted_level(name, means)
                if self.covariance:
                    state["sums"][name] = torch.eye(size, dtype=torch.float64) * level
                    state["groups"][name] = name
                else:
                    state["sums"][name] = torch.full((size,), level, dtype=torch.float64)
                state["counts"][name] = 1
            warn_unrouted(unrouted, self.windows)
        if self.covariance:
            shared: dict[str, torch.Tensor] = {}
            for name in self.names:
                key = state["groups"][name]
                if key not in shared:
                    shared[key] = (state["sums"].pop(key) / state["counts"][key]).float().cpu().contiguous()
                found[name] = shared[key]
        else:
            for name in self.names:
                h = (state["sums"].pop(name) / state["counts"][name]).float().cpu()
                found[name] = (h + DAMPING * h.mean()).contiguous()
        return found


_EXPERT = re.compile(r"\.experts\.\d+\.")


def is_expert(module: str) -> bool:
    """True for one expert's matrix of a mixture-of-experts layer ("...mlp.experts.3.down_proj")."""
    return bool(_EXPERT.search(module))


def unrouted_level(module: str, means: dict[str, float]) -> float:
    """The input power per channel that stands in for an expert matrix no calibration token
    was routed to: the mean over the same matrix of the block's other experts (``means``:
    module -> mean of its input's diagonal second moment), else 1. With a flat H (or h) at
    that level, the matrix is decomposed and planned on its weights alone (the weight
    objective), at the scale of its peers' errors."""
    pattern = _EXPERT.sub(".experts.*.", module)
    peers = [v for m, v in means.items() if m != module and _EXPERT.sub(".experts.*.", m) == pattern]
    return sum(peers) / len(peers) if peers else 1.0


def warn_unrouted(modules: Sequence[str], windows: int) -> None:
    if modules:
        warnings.warn(
            f"{len(modules)} expert matrices received no calibration token in {windows} windows "
            f"(first: {modules[0]}): planned on their weights; give more or more varied calibration text",
            stacklevel=3,
        )


def calibrator_for(model, calibration: CalibrationSettings, objective: str) -> Calibrator | None:
    """The profile's calibrator: the tokens of ``calibration`` (tokenized with the model's
    tokenizer, or the given ids) for ``objective``; None for given ``column_weights``."""
    if calibration.column_weights is not None:
        return None
    covariance = objective == "output"
    spec = calibration_spec(calibration.text, calibration.tokens, calibration.context,
                            calibration.input_ids, covariance)  # fmt: skip
    ids = _windows_of(model, calibration.text, calibration.tokens, calibration.context, calibration.input_ids)
    record = dict(spec, tokens=int(ids.numel()), context=int(ids.shape[1]), ids_sha256=ids_digest(ids))
    if calibration.input_ids is None and not is_default(calibration.text):
        record["text_path"] = str(Path(calibration.text).resolve())
    return Calibrator(ids, dict(sorted(record.items())), covariance)


def recalibrator(
    model,
    objective: str,
    record: dict | None,
    *,
    text: str | os.PathLike | None = None,
    input_ids: torch.Tensor | None = None,
) -> Calibrator:
    """The calibrator that computes a data-aware plan's (or profile's) statistics again from
    its ``record``: the same text (``text`` if given, else the recorded path or the built-in
    text; checked by sha256) or the same token ids (``input_ids``, given again: checked by
    sha256), tokenized to the same windows (checked by sha256 when recorded)."""
    if not isinstance(record, dict) or not isinstance(record.get("text_sha256"), str):
        raise BitallocError(f"this {objective} plan does not record its calibration data (text_sha256)")
    covariance = objective == "output"
    tokens, context = record.get("tokens"), record.get("context")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (tokens, context)):
        raise BitallocError("this plan's calibration record has no valid tokens and context")
    if record.get("text") == "input_ids":
        if input_ids is None:
            raise BitallocError(
                "this plan was calibrated on token ids given directly: give the same ids again "
                "(calibration_ids=...) to rebuild its decomposition"
            )
        if ids_digest(input_ids) != record["text_sha256"]:
            raise BitallocError(
                f"the calibration ids given are not the plan's (sha256 {ids_digest(input_ids)[:12]}, "
                f"expected {record['text_sha256'][:12]})"
            )
        ids = input_ids.to(torch.long)
        ids = windows(ids.reshape(-1)[:tokens], context) if ids.dim() == 1 else ids
    else:
        if input_ids is not None:
            raise BitallocError("this plan was calibrated on a text, not on token ids: drop the ids")
        ids = _windows_of(model, _recorded_text(record, text), tokens, context)
    if record.get("ids_sha256") is not None and ids_digest(ids) != record["ids_sha256"]:
        raise BitallocError(
            "the calibration text gives other tokens than when the plan was profiled (another "
            "tokenizer or tokenizer version?): its statistics cannot be rebuilt"
        )
    return Calibrator(ids, record, covariance)


def _windows_of(model, text, tokens: int, context: int, input_ids=None) -> torch.Tensor:
    if input_ids is not None:
        return token_windows(model, None, text, tokens, context, input_ids)
    with runnable(model) as (_, _, tokenizer_dir):
        return token_windows(model, tokenizer_dir, text, tokens, context)


def statistics_for_plan(
    model,
    objective: str,
    record: dict | None,
    shapes: dict[str, tuple[int, int]],
    *,
    text: str | os.PathLike | None = None,
    input_ids: torch.Tensor | None = None,
    column_weights: dict | None = None,
) -> Calibrator | dict | None:
    """How `apply` and `eval` get a plan's statistics again: None (weight plan), the given
    h checked against the plan (a plan made from given ``column_weights``), or the
    `recalibrator` that computes them block by block. ``shapes``: the planned matrices."""
    if objective == "weight":
        if text is not None or input_ids is not None or column_weights is not None:
            raise BitallocError("this plan is weight-only: it takes no calibration data")
        return None
    if isinstance(record, dict) and record.get("text") == "column_weights":
        if column_weights is None:
            raise BitallocError(
                "this plan was made from given column_weights (h): give the same ones again "
                "(column_weights=...) to rebuild its decomposition"
            )
        checked = check_given(column_weights, shapes, record.get("digest"))
        return {name: checked[name] for name in shapes if shapes[name] is not None}
    if column_weights is not None:
        raise BitallocError("this plan was calibrated on data, not on given column_weights: drop them")
    return recalibrator(model, objective, record, text=text, input_ids=input_ids)


def _recorded_text(record: dict, text) -> str | os.PathLike:
    """The calibration text of ``record``: ``text`` if given, else its recorded path, else
    the built-in text; BitallocError unless its sha256 is the recorded one."""
    wanted = record["text_sha256"]
    if text is not None:
        candidates = [text]
    else:
        candidates = [record["text_path"]] if isinstance(record.get("text_path"), str) else []
        candidates.append(DEFAULT_TEXT)
    for candidate in candidates:
        if not is_default(candidate) and not Path(candidate).is_file():
            continue
        found = text_sha256(candidate)
        if found == wanted:
            return candidate
        if not is_default(candidate):
            raise BitallocError(
                f"{candidate} is not the plan's calibration text {record.get('text')!r} (sha256 "
                f"{found[:12]}, expected {wanted[:12]}): give the text it was profiled on (--calibration)"
            )
    where = record.get("text_path") or record.get("text")
    raise BitallocError(
        f"the plan's calibration text {where} (sha256 {wanted[:12]}) was not found: "
        "give it (--calibration FILE, or calibration=FILE)"
    )


def calibrate(
    model: str | os.PathLike | nn.Module,
    modules: Sequence[str] | None = None,
    *,
    text: str | os.PathLike | None = DEFAULT_TEXT,
    tokens: int = DEFAULT_TOKENS,
    context: int = DEFAULT_CONTEXT,
    input_ids: torch.Tensor | None = None,
    quiet: bool = True,
    covariance: bool = False,
) -> Calibration:
    """h for every Linear in ``modules`` (default: what `profile` selects) of ``model``, or
    with ``covariance`` the full input covariances H, all in memory (for small models: a
    7B's H take 22 GB; `profile` and `apply` use `Calibrator.stream`, one block at a time).

    ``model``: an HF folder (built on the meta device, blocks read from the safetensors one
    at a time), a GGUF file (the same, tensors dequantized one at a time), or an in-memory
    transformers model (run as it is). The tokens are the first ``tokens`` of ``text`` (a
    file, or "default": the built-in text, see `bitalloc.texts`) in windows of
    ``context``, or ``input_ids`` given directly ((n, context) or 1-D; no tokenizer needed).
    """
    start = time.perf_counter()
    if modules is None:
        with open_source(model) as source:
            modules = source.modules()
    settings = CalibrationSettings(text=text, tokens=tokens, context=context, input_ids=input_ids)
    calibrator = calibrator_for(model, settings, "output" if covariance else "activation")
    found = calibrator.statistics(model, modules, quiet=quiet)
    seconds = time.perf_counter() - start
    if covariance:
        return Calibration(None, calibrator.record, seconds, found)
    return Calibration(found, calibrator.record, seconds)


def given_digest(column_weights: dict[str, torch.Tensor]) -> str:
    """sha256 of given h (checked vectors, by module): what a plan made from them records."""
    return hashlib.sha256(_serialize(column_weights, {"text": "column_weights"})).hexdigest()


def check_given(column_weights: dict, shapes: dict[str, tuple[int, int]], digest: str | None = None) -> dict:
    """Given h checked against the matrices (``shapes``: name -> (out, in)) and, for a plan,
    against its record's ``digest``."""
    result = _given(column_weights, shapes)
    if digest is not None and result.info["digest"] != digest:
        raise BitallocError(
            f"the column_weights given are not the plan's (sha256 {result.info['digest'][:12]}, "
            f"expected {digest[:12]})"
        )
    return result.column_weights


def calibration_settings(calibration: CalibrationSettings, objective: str = "activation") -> dict:
    """The calibration part of a profile's settings (its resume identity)."""
    if calibration.column_weights is not None:
        return {"column_weights": hashlib.sha256(_serialize(calibration.column_weights, {})).hexdigest()}
    return calibration_spec(
        calibration.text,
        calibration.tokens,
        calibration.context,
        calibration.input_ids,
        objective == "output",
    )


def resolve_objective(model, calibration: CalibrationSettings) -> str:
    """ "weight", "activation" (diagonal h) or "output" (full input covariance H) for a
    profile. Objective None: output when calibration text or ids are given, activation when
    h itself is; "auto": also output whenever the model can be run on text."""
    objective, given = calibration.objective, calibration.given
    if objective not in (None, *OBJECTIVES):
        raise BitallocError(f"unknown objective {objective!r}: expected weight, activation, output or auto")
    if objective == "weight":
        if given:
            raise BitallocError("calibration data was given with objective 'weight': drop one of them")
        return "weight"
    if calibration.column_weights is not None:
        if objective == "output":
            raise BitallocError("column_weights are a diagonal: the output objective needs text or token ids")
        return "activation"
    data_aware = "output" if objective in (None, "auto") else objective
    if not given and objective not in ("activation", "output"):
        return data_aware if objective == "auto" and can_run(model) else "weight"
    # checked before the profile writes anything, so a failed start leaves nothing behind
    needs_model = calibration.input_ids is None and calibration.column_weights is None
    if needs_model and model is not None and not can_run(model):
        what = type(model).__name__ if isinstance(model, nn.Module) else getattr(model, "name", model)
        raise BitallocError(
            f"no tokenizer (or no config) to run {what} on calibration text: "
            "give token ids or activation statistics instead, or use objective 'weight'"
        )
    return data_aware


def _given(column_weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int] | None]) -> Calibration:
    checked = {}
    for name, shape in shapes.items():
        h = column_weights.get(name)
        if h is None:
            raise BitallocError(f"column_weights has no entry for {name}")
        h = torch.as_tensor(h, dtype=torch.float32).reshape(-1).contiguous()
        cols = h.numel() if shape is None else shape[1]  # None: a matrix of unknown shape
        if h.numel() != cols:
            raise BitallocError(f"column_weights[{name!r}] has {h.numel()} values, the matrix {cols} columns")
        if not bool(torch.isfinite(h).all()) or bool((h <= 0).any()):
            raise BitallocError(f"column_weights[{name!r}] must be finite and positive")
        checked[name] = h
    info = {"text": "column_weights"}
    info["digest"] = hashlib.sha256(_serialize(checked, info)).hexdigest()
    return Calibration(checked, info)


def _serialize(column_weights: dict[str, torch.Tensor], info: dict) -> bytes:
    from safetensors.torch import save

    meta = {k: v for k, v in info.items() if k not in ("digest", "path")}
    # one metadata key: safetensors writes several in a random order, and the digest is of the bytes
    metadata = {"bitalloc": json.dumps({"format": CALIBRATION_FORMAT, "info": meta}, sort_keys=True)}
    return save({k: column_weights[k] for k in sorted(column_weights)}, metadata=metadata)


def _covariance_accumulator(name: str, state: dict):
    def hook(module, args):
        x = args[0]
        # the same tensor object as an earlier Linear's input in this forward: a shared input
        # (the list holds a reference, so an identity match cannot be a reused address)
        key = next((k for tensor, k in state["seen"] if tensor is x), None)
        if key is None:
            key = state["groups"].get(name, name)
            state["seen"].append((x, key))
            rows = x.detach().reshape(-1, x.shape[-1]).double()
            product = rows.T @ rows
            sums = state["sums"]
            sums[key] = sums[key] + product if key in sums else product
            state["counts"][key] = state["counts"].get(key, 0) + rows.shape[0]
        previous = state["groups"].setdefault(name, key)
        if previous != key:
            raise BitallocError(f"{name} shares its input with different Linears from one batch to the next")

    return hook


def _accumulator(name: str, sums: dict, counts: dict):
    def hook(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        squares = x.double().square().sum(dim=0)
        sums[name] = sums[name] + squares if name in sums else squares
        counts[name] = counts.get(name, 0) + x.shape[0]

    return hook
