"""Layer weights for the plan: one loss coefficient per matrix, measured once per profile.

The ILP adds the output errors of all matrices with equal weight, but the same output error
costs the model more in some layers than in others. `prepare_layer_weights` measures a
coefficient c per matrix (`bitalloc.profiling.sensitivity`: noise shaped like the
quantization residual of a reference config is injected into one matrix at a time, and the
KL divergence of the model's next-token distribution is regressed on the injected output
error), so the planner minimizes Σ c · weighted_error ≈ the model's KL.

The coefficients go in the profile's metadata (``layer_weights``) and in a side file
``profile.layer_weights.json`` with what they were computed from, so a resumed or repeated
profile reuses them instead of running the model again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..checkpoints import Source
from ..checkpoints.runnable import runnable
from ..errors import BitallocError
from ..fileio import atomic_path
from ..quant import QuantConfig, fake_quantize
from ..texts import DEFAULT_TEXT, describe_text, text_sha256
from .calibration import token_windows
from .sensitivity import layer_coefficients
from .settings import CalibrationSettings

LAYER_WEIGHTS_SUFFIX = ".layer_weights.json"
SIZES = (0.5, 1.0)


def layer_weights_path(path: str | os.PathLike) -> Path:
    """``profile.parquet`` -> ``profile.layer_weights.json``."""
    path = Path(path)
    return path.with_name(path.stem + LAYER_WEIGHTS_SUFFIX)


def reference_config(grid: list[QuantConfig]) -> QuantConfig:
    """The config whose residual shapes the injected noise: the grid's closest to 3 bits
    (then the smallest block): the middle of the usual allocations."""
    return min(grid, key=lambda c: (abs(c.bits - 3), c.block_size, str(c)))


def layer_weights_spec(calibration: CalibrationSettings, grid: list[QuantConfig]) -> dict:
    """What identifies a coefficient measurement (it goes in the profile settings)."""
    if calibration.input_ids is not None:
        import hashlib

        text = {
            "text": "input_ids",
            "text_sha256": hashlib.sha256(calibration.input_ids.numpy().tobytes()).hexdigest(),
        }
    else:
        source = DEFAULT_TEXT if calibration.text is None else calibration.text
        text = {"text": describe_text(source), "text_sha256": text_sha256(source)}
    return {
        "method": "noise-injection-kl",
        "tokens": calibration.layer_tokens,
        "context": calibration.context,
        "sizes": list(SIZES),
        "reference_config": str(reference_config(grid)),
        **text,
    }


def prepare_layer_weights(
    model,
    source: Source,
    modules: list[str],
    output: str | os.PathLike | None,
    identity: dict,
    calibration: CalibrationSettings,
    grid: list[QuantConfig],
    *,
    quiet: bool = True,
) -> dict:
    """The ``layer_weights`` record of a profile: {method, tokens, ..., seconds,
    coefficients: {module: c}}; reused from the side file beside ``output`` when it was
    made for the same model (``identity``) and spec."""
    spec = layer_weights_spec(calibration, grid)
    wanted = {"spec": spec, **identity}
    path = layer_weights_path(output) if output is not None else None
    if path is not None and path.is_file():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
            if saved.get("identity") == wanted and set(saved["record"]["coefficients"]) >= set(modules):
                return saved["record"]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # not ours or damaged: measured again and replaced
    config = reference_config(grid)

    def residual(module: str, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, config) - weight

    with runnable(model) as (_, _, tokenizer_dir):
        ids = token_windows(
            model, tokenizer_dir, calibration.text, calibration.layer_tokens, calibration.context,
            calibration.input_ids,
        )  # fmt: skip
    if calibration.input_ids is not None and ids.dim() == 2:
        ids = ids[: max(1, calibration.layer_tokens // ids.shape[1])]
    result = layer_coefficients(model, modules, residual, input_ids=ids, sizes=SIZES, quiet=quiet)
    missing = [m for m in modules if m not in result.coefficients]
    if missing:
        raise BitallocError(f"no layer coefficient was measured for {missing[0]}")
    record = {
        **spec,
        "tokens": int(ids.numel()),
        "seconds": round(result.seconds, 3),
        "coefficients": {m: float(result.coefficients[m]) for m in modules},
    }
    if path is not None:
        with atomic_path(path) as temp:
            temp.write_text(json.dumps({"identity": wanted, "record": record}, sort_keys=True))
    return record
