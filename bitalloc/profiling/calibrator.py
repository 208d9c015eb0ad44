"""Calibration runs: the tokens a data-aware objective's statistics are computed from.

The statistics are computed one transformer block at a time (`Calibrator.stream`): the
calibration tokens' hidden states (of the original model) run through block l with hooks on
its Linears (`bitalloc.profiling.collect`), the block's statistics (float64 sums, handed over
as float32) go to the caller, which uses them (the profile measures that block's matrices;
`apply` and `eval` decompose them) and drops them before the next block. Memory holds one
block's statistics; nothing is written to disk. What is needed to compute them again goes in
the profile and the plan (`Calibrator.record`): the text's name, sha256 and (for a user file)
path, the token count, the context, the damping and the sha256 of the token ids; for token
ids given directly only their sha256, so `apply` needs the same ids given again (checked).
Same ids, same code: the recomputed statistics equal the profile's to float rounding (bit
for bit on one machine and thread count).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import open_source
from ..checkpoints.runnable import BATCH_TOKENS, load_tokenizer, runnable
from ..errors import BitallocError
from ..texts import DEFAULT_TEXT, describe_text, is_default, text_sha256, tokenize_prefix, windows
from .collect import DAMPING, BlockStepper, collect_statistics
from .settings import DEFAULT_CONTEXT, DEFAULT_TOKENS, CalibrationSettings


def ids_digest(ids: torch.Tensor) -> str:
    """sha256 of token ids (as int64): identifies given ids, and the windows a text gave."""
    return hashlib.sha256(ids.to(torch.long).contiguous().cpu().numpy().tobytes()).hexdigest()


@dataclass(frozen=True)
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


def calibrator_for(model, calibration: CalibrationSettings, covariance: bool) -> Calibrator:
    """The profile's calibrator: the tokens of ``calibration`` (tokenized with the model's
    tokenizer, or the given ids), collecting H (``covariance``) or h."""
    spec = calibration_spec(calibration.text, calibration.tokens, calibration.context,
                            calibration.input_ids, covariance)  # fmt: skip
    ids = _windows_of(model, calibration.text, calibration.tokens, calibration.context, calibration.input_ids)
    record = dict(spec, tokens=int(ids.numel()), context=int(ids.shape[1]), ids_sha256=ids_digest(ids))
    if calibration.input_ids is None and not is_default(calibration.text):
        record["text_path"] = str(Path(calibration.text).resolve())
    return Calibrator(ids, dict(sorted(record.items())), covariance)


def recalibrator(
    model,
    covariance: bool,
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
        raise BitallocError("this data-aware plan does not record its calibration data (text_sha256)")
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
    calibrator = calibrator_for(model, settings, covariance)
    found = calibrator.statistics(model, modules, quiet=quiet)
    seconds = time.perf_counter() - start
    if covariance:
        return Calibration(None, calibrator.record, seconds, found)
    return Calibration(found, calibrator.record, seconds)
