"""Activation statistics for the data-aware objective: h = diag(XᵀX)/n per input channel.

What matters for a quantized layer is its output error ‖(W − Ŵ)X‖, whose diagonal
approximation is ‖(W − Ŵ)·diag(√h)‖²_F with h the second moment of each input channel
over calibration tokens. `calibrate` runs the model over those tokens one transformer
block at a time (`bitalloc.checkpoints.runnable`), with forward hooks on the Linear layers,
so a large model never sits whole in memory. h is damped (h + 0.01·mean(h)) so that
dead channels cannot blow the weights up.

h is stored per module in a safetensors file beside the profile (``profile.parquet`` ->
``profile.calibration.safetensors``); its sha256 goes in the profile metadata, so `apply`
can reuse exactly the same h (`load_column_weights`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..checkpoints import open_source
from ..checkpoints.runnable import BATCH_TOKENS, can_run, load_tokenizer, run_blocks, runnable
from ..errors import BitallocError
from ..fileio import atomic_path
from ..texts import DEFAULT_TEXT, describe_text, read_text, text_digest, tokenize, windows
from .settings import DEFAULT_CONTEXT, DEFAULT_TOKENS, OBJECTIVES, CalibrationSettings

DAMPING = 0.01
CALIBRATION_FORMAT = "bitalloc.calibration/v1"
CALIBRATION_SUFFIX = ".calibration.safetensors"


@dataclass
class Calibration:
    """Damped per-input-channel second moments by module name, and what produced them."""

    column_weights: dict[str, torch.Tensor]
    info: dict  # text, text_sha256, tokens, context, damping, digest (of the safetensors bytes)
    seconds: float = field(default=0.0, compare=False)


def calibration_path(path: str | os.PathLike) -> Path:
    """Where the h of a profile or plan lives: ``profile.parquet`` ->
    ``profile.calibration.safetensors``, ``plan.json`` -> ``plan.calibration.safetensors``."""
    path = Path(path)
    return path.with_name(path.stem + CALIBRATION_SUFFIX)


def calibration_spec(
    text: str | os.PathLike | None = DEFAULT_TEXT,
    tokens: int = DEFAULT_TOKENS,
    context: int = DEFAULT_CONTEXT,
    input_ids: torch.Tensor | None = None,
) -> dict:
    """What identifies a calibration run (it goes in the profile settings): the text's name
    and sha256, the tokens asked for, the context and the damping. ``text`` None or
    "default" is the built-in text; ``input_ids`` (token ids given directly) replace it."""
    if tokens <= 0 or context <= 0:
        raise BitallocError(f"calibration tokens and context must be positive, got {tokens}, {context}")
    if input_ids is not None:
        ids = input_ids.to(torch.long).contiguous()
        name, digest = "input_ids", hashlib.sha256(ids.numpy().tobytes()).hexdigest()
        context = ids.shape[-1] if ids.dim() == 2 else context
    else:
        name, digest = describe_text(text), text_digest(read_text(text))
    return {
        "text": name,
        "text_sha256": digest,
        "tokens": int(tokens),
        "context": int(context),
        "damping": DAMPING,
    }


def calibrate(
    model: str | os.PathLike | nn.Module,
    modules: Sequence[str] | None = None,
    *,
    text: str | os.PathLike | None = DEFAULT_TEXT,
    tokens: int = DEFAULT_TOKENS,
    context: int = DEFAULT_CONTEXT,
    input_ids: torch.Tensor | None = None,
    quiet: bool = True,
) -> Calibration:
    """h for every Linear in ``modules`` (default: what `profile` selects) of ``model``.

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
    info = calibration_spec(text, tokens, context, input_ids)
    with runnable(model) as (net, load, tokenizer_dir):
        if input_ids is None:
            ids = tokenize(load_tokenizer(tokenizer_dir, model), read_text(text), tokens)
        else:
            ids = input_ids.to(torch.long).reshape(-1)[:tokens] if input_ids.dim() == 1 else input_ids
        ids = windows(ids, context) if ids.dim() == 1 else ids
        column_weights = collect_column_weights(net, ids, modules, load=load, quiet=quiet)
    info.update(tokens=int(ids.numel()), context=int(ids.shape[1]))
    info["digest"] = hashlib.sha256(_serialize(column_weights, info)).hexdigest()
    return Calibration(column_weights, info, time.perf_counter() - start)


def collect_column_weights(
    net: nn.Module,
    input_ids: torch.Tensor,
    modules: Sequence[str],
    *,
    load: Callable[[str], torch.Tensor] | None = None,
    damping: float = DAMPING,
    batch_tokens: int = BATCH_TOKENS,
    quiet: bool = True,
) -> dict[str, torch.Tensor]:
    """Damped diag(XᵀX)/n of each named Linear's input over ``input_ids`` (n, context),
    running ``net`` one block at a time. Parameters still on the meta device are read with
    ``load(name)`` when their module runs and released after their block."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def on_block(prefix: str, block: nn.Module) -> list:
        hooks = []
        for name in [m for m in modules if m.startswith(prefix)]:
            linear = net.get_submodule(name)
            if not isinstance(linear, nn.Linear):
                raise BitallocError(
                    f"{name} is a {type(linear).__name__}, not an nn.Linear: cannot calibrate it"
                )
            hooks.append(linear.register_forward_pre_hook(_accumulator(name, sums, counts)))
        return hooks

    run_blocks(net, input_ids, modules, on_block, load=load, batch_tokens=batch_tokens, quiet=quiet)
    result = {}
    for name in modules:
        h = (sums[name] / counts[name]).float().cpu()
        result[name] = (h + damping * h.mean()).contiguous()
    return result


# ---- files -----------------------------------------------------------------------------


def _serialize(column_weights: dict[str, torch.Tensor], info: dict) -> bytes:
    from safetensors.torch import save

    meta = {k: v for k, v in info.items() if k not in ("digest", "path")}
    # one metadata key: safetensors writes several in a random order, and the digest is of the bytes
    metadata = {"bitalloc": json.dumps({"format": CALIBRATION_FORMAT, "info": meta}, sort_keys=True)}
    return save({k: column_weights[k] for k in sorted(column_weights)}, metadata=metadata)


def save_calibration(calibration: Calibration, path: str | os.PathLike, identity: dict | None = None) -> None:
    """Write h atomically; ``identity`` (model fingerprint, spec) lets a rerun reuse the file."""
    data = _serialize(calibration.column_weights, calibration.info)
    if hashlib.sha256(data).hexdigest() != calibration.info["digest"]:
        raise BitallocError("calibration digest does not match its tensors")  # a bug if reached
    with atomic_path(path) as temp:
        temp.write_bytes(data)
    record = Path(f"{path}.json")  # what `prepare_calibration` compares before reusing the file
    if identity is None:
        record.unlink(missing_ok=True)
        return
    with atomic_path(record) as temp:
        temp.write_text(json.dumps({"identity": identity, "info": calibration.info}, sort_keys=True))


def read_verified(path: str | os.PathLike, digest: str | None = None) -> bytes:
    """The bytes of a calibration file, checked against ``digest`` (its sha256) if given."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise BitallocError(f"calibration file {path} cannot be read: {exc.strerror or exc}") from None
    found = hashlib.sha256(data).hexdigest()
    if digest is not None and found != digest:
        raise BitallocError(
            f"{path} does not hold the plan's calibration (sha256 {found[:12]}, expected {digest[:12]})"
        )
    return data


def read_calibration(path: str | os.PathLike, digest: str | None = None) -> dict[str, torch.Tensor]:
    """h from a calibration file, checked against ``digest`` (sha256 of the file) if given."""
    from safetensors.torch import load

    data = read_verified(path, digest)
    try:
        return load(data)
    except Exception as exc:  # safetensors raises its own error types
        raise BitallocError(f"{path} is not a calibration file: {exc}") from None


def load_column_weights(profile_table_or_path) -> dict[str, torch.Tensor]:
    """The h a data-aware profile was measured with, by module (for `apply`), digest-checked.

    Takes the profile's path, or its table (then the file is the one recorded when the
    profile was written: ``attrs["calibration"]["path"]``).
    """
    import pandas as pd

    from .table import read_profile

    if isinstance(profile_table_or_path, pd.DataFrame):
        attrs, file = profile_table_or_path.attrs, None
    else:
        attrs = read_profile(profile_table_or_path).attrs
        file = calibration_path(profile_table_or_path)
    info = attrs.get("calibration")
    if not info:
        raise BitallocError("the profile is not data-aware: it has no calibration")
    if file is None:
        if not info.get("path"):
            raise BitallocError("this profile was not written to a file: its h was not saved")
        file = Path(info["path"])
    return read_calibration(file, info["digest"])


def resolve_objective(model, calibration: CalibrationSettings) -> str:
    """ "weight" or "activation" for a profile. Objective None: activation when any
    calibration data is given; "auto": also whenever the model can be run on text."""
    objective, given = calibration.objective, calibration.given
    if objective not in (None, *OBJECTIVES):
        raise BitallocError(f"unknown objective {objective!r}: expected weight, activation or auto")
    if objective == "weight":
        if given:
            raise BitallocError("calibration data was given with objective 'weight': drop one of them")
        return "weight"
    if not given and objective != "activation":
        return "activation" if objective == "auto" and can_run(model) else "weight"
    # checked before the profile writes anything, so a failed start leaves nothing behind
    needs_model = calibration.input_ids is None and calibration.column_weights is None
    if needs_model and model is not None and not can_run(model):
        what = type(model).__name__ if isinstance(model, nn.Module) else getattr(model, "name", model)
        raise BitallocError(
            f"no tokenizer (or no config) to run {what} on calibration text: "
            "give token ids or activation statistics instead, or use objective 'weight'"
        )
    return "activation"


def calibration_settings(calibration: CalibrationSettings) -> dict:
    """The calibration part of a profile's settings (its resume identity)."""
    if calibration.column_weights is not None:
        return {"column_weights": hashlib.sha256(_serialize(calibration.column_weights, {})).hexdigest()}
    return calibration_spec(calibration.text, calibration.tokens, calibration.context, calibration.input_ids)


def prepare_calibration(
    model,
    shapes: dict[str, tuple[int, int]],
    output: str | os.PathLike | None,
    identity: dict,
    calibration: CalibrationSettings,
    *,
    quiet: bool = True,
) -> Calibration:
    """The profiler's entry: h for the matrices in ``shapes`` (name -> (out, in)), saved
    beside ``output`` when given. Given ``column_weights`` are checked and used as they are;
    otherwise a calibration file made for the same model (``identity``: fingerprint, content
    digest) and spec is reused, or the model is run."""
    path = calibration_path(output) if output is not None else None
    if calibration.column_weights is not None:
        result = _given(calibration.column_weights, shapes)
    else:
        spec = calibration_spec(
            calibration.text, calibration.tokens, calibration.context, calibration.input_ids
        )
        wanted = {"spec": spec, **identity}
        result = _reuse(path, wanted, shapes) if path is not None else None
        if result is not None:
            return result
        result = calibrate(
            model, list(shapes), text=calibration.text, tokens=calibration.tokens,
            context=calibration.context, input_ids=calibration.input_ids, quiet=quiet,
        )  # fmt: skip
    if path is not None:
        save_calibration(result, path, None if calibration.column_weights is not None else wanted)
        result.info["path"] = str(path.resolve())
    return result


def _given(column_weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, int]]) -> Calibration:
    checked = {}
    for name, (_, cols) in shapes.items():
        h = column_weights.get(name)
        if h is None:
            raise BitallocError(f"column_weights has no entry for {name}")
        h = torch.as_tensor(h, dtype=torch.float32).reshape(-1).contiguous()
        if h.numel() != cols:
            raise BitallocError(f"column_weights[{name!r}] has {h.numel()} values, the matrix {cols} columns")
        if not bool(torch.isfinite(h).all()) or bool((h <= 0).any()):
            raise BitallocError(f"column_weights[{name!r}] must be finite and positive")
        checked[name] = h
    info = {"text": "column_weights"}
    info["digest"] = hashlib.sha256(_serialize(checked, info)).hexdigest()
    return Calibration(checked, info)


def _reuse(path: Path, wanted: dict, shapes: dict) -> Calibration | None:
    record_file = Path(f"{path}.json")
    if not (path.is_file() and record_file.is_file()):
        return None
    with contextlib.suppress(OSError, ValueError, KeyError, BitallocError):
        record = json.loads(record_file.read_text(encoding="utf-8"))
        if record["identity"] == wanted:
            column_weights = read_calibration(path, record["info"]["digest"])
            if all(tuple(column_weights[m].shape) == (cols,) for m, (_, cols) in shapes.items()):
                return Calibration(column_weights, dict(record["info"], path=str(path.resolve())))
    return None


def _accumulator(name: str, sums: dict, counts: dict):
    def hook(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        squares = x.double().square().sum(dim=0)
        sums[name] = sums[name] + squares if name in sums else squares
        counts[name] = counts.get(name, 0) + x.shape[0]

    return hook
