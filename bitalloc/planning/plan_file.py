"""The plan file: the `Plan` dataclass and its JSON form (``bitalloc.plan/v1``).

The JSON layout is a contract (docs/architecture.md, "Plan JSON") described by
``bitalloc/plan.schema.json``; `Plan.from_json` validates against it. Writing is
deterministic (fixed key order, no timings), so the same plan gives the same bytes.
"""

from __future__ import annotations

import functools
import json
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import BitallocError
from ..fileio import atomic_path, write_text_atomic
from ..profiling.calibration import calibration_path, read_verified
from ..quant import QuantConfig

PLAN_FORMAT = "bitalloc.plan/v1"


# Key order of a per-module entry in the file (the contract); `weighted_error` only in
# data-aware plans.
MODULE_KEYS = (
    "config",
    "method",
    "bits",
    "block_size",
    "scale",
    "bits_per_param",
    "storage_bits",
    "shape",
    "numel",
    "rank",
    "error",
    "weighted_error",
)


@functools.lru_cache(maxsize=1)
def plan_schema() -> dict:
    """The plan's JSON Schema (draft 2020-12), shipped as ``bitalloc/plan.schema.json``."""
    text = resources.files("bitalloc.planning").joinpath("plan.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def validate_plan_dict(data: object) -> None:
    """Raise BitallocError (one line) unless ``data`` is a valid ``bitalloc.plan/v1`` dict."""
    import jsonschema

    if not isinstance(data, dict):
        raise BitallocError(f"invalid plan: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != PLAN_FORMAT:
        raise BitallocError(f"unsupported plan format {data.get('format')!r}: expected {PLAN_FORMAT!r}")
    validator = jsonschema.Draft202012Validator(plan_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        message = error.message if len(error.message) <= 200 else error.message[:197] + "..."
        raise BitallocError(f"invalid plan: {where}: {message}")
    for name, entry in data["modules"].items():
        shape = entry["shape"]
        if entry["numel"] != shape[0] * shape[1]:
            raise BitallocError(f"invalid plan: modules/{name}: numel does not match shape {shape}")
        try:
            config = QuantConfig.parse(entry["config"])
        except ValueError as exc:
            raise BitallocError(f"invalid plan: modules/{name}: {exc}") from None
        if (config.method, config.bits, config.block_size) != (
            entry["method"],
            entry["bits"],
            entry["block_size"],
        ):
            raise BitallocError(
                f"invalid plan: modules/{name}: method/bits/block_size disagree with "
                f"config {entry['config']!r}"
            )
    overlap = sorted(set(data["kept"]) & set(data["modules"]))
    if overlap:
        raise BitallocError(f"invalid plan: {overlap[0]!r} is both kept and quantized")


@dataclass(kw_only=True)
class Plan:
    """A bit allocation: one quantization config per matrix, fields as in the plan JSON.

    ``modules`` maps each quantized matrix to its entry (config, method, bits, block_size,
    scale, bits_per_param, storage_bits, shape, numel, rank, error); ``kept`` lists the
    matrices left in 16 bits, outside the budget.
    """

    format: str = PLAN_FORMAT
    model: dict = field(default_factory=lambda: {"source": None, "fingerprint": None})
    budget: dict
    objective: str = "weight"
    calibration: dict | None = None  # data-aware plans: the h they were measured with
    solver: dict
    defaults: dict
    kept: list[str] = field(default_factory=list)
    modules: dict[str, dict]
    # data-aware plans: where their activation statistics are (not part of the JSON; `save`
    # copies the file beside the plan, `load` finds it there)
    calibration_file: Path | None = field(default=None, compare=False, repr=False)

    # ---- convenient views -----------------------------------------------------------
    @property
    def assignments(self) -> dict[str, str]:
        """Module name -> config string, for the quantized (non-kept) matrices."""
        return {name: entry["config"] for name, entry in self.modules.items()}

    @property
    def target_bits(self) -> float:
        return self.budget["target_bits"]

    @property
    def achieved_bits(self) -> float:
        return self.budget["achieved_bits"]

    @property
    def total_error(self) -> float:
        """The minimized objective (sum of the objective's error over matrices)."""
        return self.solver["objective"]

    # ---- JSON -------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The plan as plain JSON data, keys in the documented order."""
        modules = {
            name: {key: entry[key] for key in MODULE_KEYS if key in entry}
            for name, entry in self.modules.items()
        }
        return {
            "format": self.format,
            "model": {
                "source": self.model.get("source"),
                "fingerprint": self.model.get("fingerprint"),
            },
            "budget": {key: self.budget[key] for key in ("target_bits", "achieved_bits", "includes_lora")},
            "objective": self.objective,
            **({"calibration": dict(self.calibration)} if self.calibration else {}),
            "solver": {key: self.solver[key] for key in ("name", "status", "objective", "gap")},
            "defaults": {key: self.defaults[key] for key in ("rank", "iters")},
            "kept": list(self.kept),
            "modules": modules,
        }

    def to_json(self) -> str:
        """Indented JSON with a trailing newline; the same plan always gives the same text."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> Plan:
        """Read a plan from JSON text or a file path, validating it against the schema."""
        if isinstance(text_or_path, os.PathLike) or not str(text_or_path).lstrip().startswith("{"):
            path = Path(text_or_path)
            try:
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise BitallocError(f"cannot read plan {str(path)!r}: {exc}") from None
        else:
            text = str(text_or_path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BitallocError(f"plan is not valid JSON: {exc}") from None
        validate_plan_dict(data)
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan atomically (a temporary file in the same folder, then os.replace).

        A data-aware plan's activation statistics travel with it: they are copied (checked by
        digest) to ``PLAN.calibration.safetensors`` beside the plan, where `load` and
        `bitalloc.apply` find them, so the plan can be moved with its side file."""
        path = Path(path)
        if self.objective != "weight" and self.calibration:
            self._save_calibration(calibration_path(path))
        write_text_atomic(path, self.to_json())
        return path

    def _save_calibration(self, target: Path) -> None:
        if self.calibration_file is None:
            raise BitallocError(
                "this data-aware plan has no calibration file to keep beside it: profile with an "
                "output file (profile(model, 'profile.parquet', ...)) so the statistics are saved"
            )
        source = Path(self.calibration_file)
        data = read_verified(source, self.calibration.get("digest"))
        if target.exists() and target.resolve() == source.resolve():
            return
        with atomic_path(target) as temp:
            temp.write_bytes(data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read and validate a plan file (a data-aware plan's statistics are beside it)."""
        plan = cls.from_json(Path(path))
        if plan.objective != "weight":
            plan.calibration_file = calibration_path(path)
        return plan


def most_common(values: Iterable) -> object:
    """The most frequent value (the smallest among equally frequent ones)."""
    counts = Counter(values)
    return min(counts, key=lambda value: (-counts[value], value))
