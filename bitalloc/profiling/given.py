"""Statistics given directly instead of computed: h by module (``column_weights``).

A profile or plan made from given h records their sha256 (`given_digest`: of the checked
vectors, serialized as safetensors with one metadata key), and `apply`/`eval` take the same
h again, checked against it. `calibration_path` names the side file earlier versions kept
beside a profile or plan (nothing writes or reads it any more).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import BitallocError

CALIBRATION_FORMAT = "bitalloc.calibration/v1"
CALIBRATION_SUFFIX = ".calibration.safetensors"  # earlier versions' side file (no longer written)


def calibration_path(path: str | os.PathLike) -> Path:
    """The side file earlier versions kept beside a profile or plan (``profile.parquet`` ->
    ``profile.calibration.safetensors``); nothing writes or reads it any more."""
    path = Path(path)
    return path.with_name(path.stem + CALIBRATION_SUFFIX)


def given_digest(column_weights: dict[str, torch.Tensor]) -> str:
    """sha256 of given h (checked vectors, by module): what a plan made from them records."""
    return hashlib.sha256(_serialize(column_weights, {"text": "column_weights"})).hexdigest()


def check_given(column_weights: dict, shapes: dict[str, tuple[int, int]], digest: str | None = None) -> dict:
    """Given h checked against the matrices (``shapes``: name -> (out, in)) and, for a plan,
    against its record's ``digest``."""
    checked, found = _given(column_weights, shapes)
    if digest is not None and found != digest:
        raise BitallocError(
            f"the column_weights given are not the plan's (sha256 {found[:12]}, expected {digest[:12]})"
        )
    return checked


def _given(column_weights: dict, shapes: dict[str, tuple[int, int] | None]) -> tuple[dict, str]:
    """The checked h by module and their digest."""
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
    return checked, hashlib.sha256(_serialize(checked, {"text": "column_weights"})).hexdigest()


def _serialize(column_weights: dict[str, torch.Tensor], info: dict) -> bytes:
    from safetensors.torch import save

    meta = {k: v for k, v in info.items() if k not in ("digest", "path")}
    # one metadata key: safetensors writes several in a random order, and the digest is of the bytes
    metadata = {"bitalloc": json.dumps({"format": CALIBRATION_FORMAT, "info": meta}, sort_keys=True)}
    return save({k: column_weights[k] for k in sorted(column_weights)}, metadata=metadata)


def settings_digest(column_weights: dict[str, torch.Tensor]) -> str:
    """sha256 of given h as they were given: the profile settings' resume identity."""
    return hashlib.sha256(_serialize(column_weights, {})).hexdigest()
