"""The plan file: the `Plan` dataclass and its JSON form (``bitalloc.plan/v2``; v1 plans load).

The JSON layout is a contract described by ``bitalloc/planning/plan.schema.json``;
`Plan.from_json` validates against it. Writing is
deterministic (fixed key order, no timings), so the same plan gives the same bytes.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..errors import BitallocError, check_path
from ..fileio import write_text_atomic
from ..quant import QuantConfig

PLAN_FORMAT = "bitalloc.plan/v2"
PLAN_FORMATS = ("bitalloc.plan/v1", PLAN_FORMAT)  # what loads


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
    "coefficient",
)


@functools.lru_cache(maxsize=1)
def plan_schema() -> dict:
    """The plan's JSON Schema (draft 2020-12), shipped as ``bitalloc/planning/plan.schema.json``."""
    text = resources.files("bitalloc.planning").joinpath("plan.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def validate_plan_dict(data: object) -> None:
    """Raise BitallocError (one line) unless ``data`` is a valid ``bitalloc.plan/v1`` dict.

    Valid: the schema holds, every number is finite, and each module's derived fields
    (method, bits, block_size, scale, bits_per_param, storage_bits) are what its canonical
    config string implies on its shape, with numel = out·in and rank <= min(shape)."""
    import jsonschema

    if not isinstance(data, dict):
        raise BitallocError(f"invalid plan: expected a JSON object, got {type(data).__name__}")
    if data.get("format") not in PLAN_FORMATS:
        raise BitallocError(f"unsupported plan format {_shown(data.get('format'))}: expected {PLAN_FORMAT!r}")
    bad = _first_non_finite(data)
    if bad is not None:
        where, value = bad
        raise BitallocError(f"invalid plan: {where}: {value} is not a finite number (JSON numbers must be)")
    from ..profiling.objectives import objective_names

    try:
        error = jsonschema.exceptions.best_match(_validator(objective_names()).iter_errors(data))
    except RecursionError:
        raise BitallocError("invalid plan: nested too deeply") from None
    if error is not None:
        where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        message = error.message if len(error.message) <= 200 else error.message[:197] + "..."
        raise BitallocError(f"invalid plan: {_cut(where)}: {message}")
    for name, entry in data["modules"].items():
        _check_module(f"invalid plan: modules/{_cut(name)}", entry)
    overlap = sorted(set(data["kept"]) & set(data["modules"]))
    if overlap:
        raise BitallocError(f"invalid plan: {_shown(overlap[0])} is both kept and quantized")


def _check_module(where: str, entry: dict) -> None:
    """One schema-valid module entry against its config string (the authority)."""
    shape = entry["shape"]
    if entry["numel"] != shape[0] * shape[1]:
        raise BitallocError(f"{where}: numel does not match shape {_shown(shape)}")
    try:
        config = QuantConfig.parse(entry["config"])
    except BitallocError as exc:
        raise BitallocError(f"{where}/config: {exc}") from None
    if entry["config"] != str(config):
        raise BitallocError(
            f"{where}/config: {_shown(entry['config'])} is not canonical: write {str(config)!r}"
        )
    expected = {**config.to_dict(), "storage_bits": config.storage_bits(shape)}
    for key in ("method", "bits", "block_size", "scale", "bits_per_param", "storage_bits"):
        if entry[key] != expected[key]:
            raise BitallocError(
                f"{where}/{key}: {_shown(entry[key])} does not match config {str(config)!r}"
                + (f" on shape {_shown(shape)}" if key == "storage_bits" else "")
                + f" (expected {_shown(expected[key])})"
            )
    if entry["rank"] > min(shape):
        raise BitallocError(f"{where}/rank: {_shown(entry['rank'])} exceeds the matrix size {_shown(shape)}")


@functools.lru_cache(maxsize=4)
def _validator(objectives: tuple[str, ...] = ()):
    """The schema's validator; ``objectives``: the registered objectives, which replace the
    shipped file's list of the built-in ones (an objective added in code is valid too)."""
    import jsonschema

    schema = plan_schema()
    if objectives:
        properties = {**schema["properties"], "objective": {"enum": list(objectives)}}
        schema = {**schema, "properties": properties}
    return jsonschema.Draft202012Validator(schema)


class _NonFinite:
    """What the plan reader puts where JSON text has NaN, Infinity or an overflowing number."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


def _parse_float(text: str) -> float | _NonFinite:
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = next(key for key, _ in pairs if key in seen or seen.add(key))
        raise BitallocError(f"invalid plan: the key {_shown(twice)} appears twice in one object")
    return data


def _first_non_finite(data: object) -> tuple[str, str] | None:
    """(path, value) of the first NaN or infinite number in ``data`` (document order), or None."""
    stack: list[tuple[tuple, object]] = [((), data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, _NonFinite) or (isinstance(value, float) and not math.isfinite(value)):
            return _cut("/".join(map(str, path)) or "(top level)"), str(value)
        if isinstance(value, dict):
            stack.extend(((*path, key), item) for key, item in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend(((*path, index), item) for index, item in reversed(list(enumerate(value))))
    return None


def _shown(value: object, limit: int = 60) -> str:
    """repr(value), cut to one readable line."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for printing
        text = f"<{type(value).__name__} too large to print>"
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} characters)"


def _cut(text: str, limit: int = 120) -> str:
    """A path or name on one line: control characters escaped, cut to ``limit``."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else f"{text[: limit - 20]}...({len(text)} characters)"


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
    calibration: dict | None = None  # data-aware plans: the data their statistics are computed from
    layer_weights: dict | None = None  # per-matrix coefficients: how they were measured
    solver: dict
    defaults: dict
    kept: list[str] = field(default_factory=list)
    modules: dict[str, dict]

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
            **({"layer_weights": dict(self.layer_weights)} if self.layer_weights else {}),
            "solver": {key: self.solver[key] for key in ("name", "status", "objective", "gap")},
            "defaults": {key: self.defaults[key] for key in ("rank", "iters")},
            "kept": list(self.kept),
            "modules": modules,
        }

    def to_json(self) -> str:
        """Indented JSON with a trailing newline; the same plan always gives the same text.

        BitallocError (nothing is written) unless the plan is valid (`validate_plan_dict`):
        every number finite, every derived field what its config implies."""
        try:
            data = self.to_dict()
        except KeyError as exc:
            raise BitallocError(f"invalid plan: missing field {_shown(exc.args[0])}") from None
        except (AttributeError, TypeError) as exc:
            raise BitallocError(f"invalid plan: {exc}") from None
        validate_plan_dict(data)
        try:
            return json.dumps(data, indent=2, allow_nan=False) + "\n"
        except (TypeError, ValueError) as exc:
            raise BitallocError(f"invalid plan: {exc}") from None

    @classmethod
    def from_json(cls, text_or_path: str | os.PathLike) -> Plan:
        """Read a plan from JSON text (str or UTF-8 bytes) or a file path, validating it
        (`validate_plan_dict`); strict JSON: NaN, Infinity and repeated keys are refused."""
        if isinstance(text_or_path, (bytes, bytearray)):
            try:
                text_or_path = bytes(text_or_path).decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BitallocError(f"plan is not UTF-8 text: {exc}") from None
        if not isinstance(text_or_path, (str, os.PathLike)):
            raise BitallocError(f"a plan is JSON text or a path, got {type(text_or_path).__name__}")
        if isinstance(text_or_path, os.PathLike) or not text_or_path.lstrip().startswith("{"):
            try:
                path = Path(text_or_path)
                text = path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError, ValueError, TypeError) as exc:
                raise BitallocError(f"cannot read plan {_shown(str(text_or_path))}: {exc}") from None
        else:
            text = text_or_path
        try:
            data = json.loads(
                text, parse_constant=_NonFinite, parse_float=_parse_float, object_pairs_hook=_unique_keys
            )
        except RecursionError:
            raise BitallocError("plan is not valid JSON: nested too deeply") from None
        except BitallocError:
            raise
        except ValueError as exc:  # JSONDecodeError, or an integer too long to read
            raise BitallocError(f"plan is not valid JSON: {exc}") from None
        validate_plan_dict(data)
        return cls(**data)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the plan atomically (a temporary file in the same folder, then os.replace).

        The plan is self-contained: a data-aware plan records what its statistics are
        computed from (``calibration``), and `bitalloc.apply` computes them again; no file
        goes beside it."""
        path = Path(path)
        text = self.to_json()  # validated first: an invalid plan writes nothing
        write_text_atomic(path, text)
        return path

    def statistics(self, model, *, calibration: str | os.PathLike | None = None, calibration_ids=None,
                   column_weights: dict | None = None):  # fmt: skip
        """How the decompositions of this plan are weighted, for ``model``: None (weight-only),
        the given h checked against the plan, or a
        `bitalloc.profiling.calibration.Calibrator` that computes the statistics again block
        by block from the recorded calibration text (``calibration``: the text file, if it
        is not at the recorded path) or the same token ids (``calibration_ids``)."""
        from ..profiling.objectives import statistics_for_plan

        shapes = {name: None for name in self.kept}  # given h covered the kept matrices too
        shapes.update({name: tuple(entry["shape"]) for name, entry in self.modules.items()})
        return statistics_for_plan(
            model, self.objective, self.calibration, shapes, text=calibration, input_ids=calibration_ids,
            column_weights=column_weights,
        )  # fmt: skip

    @property
    def damping(self) -> float:
        """λ of the plan's weighting (an output plan's ``calibration.lambda``; 0 without one)."""
        from ..profiling.objectives import get_objective

        return get_objective(self.objective).damping(self.calibration)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        """Read and validate a plan file."""
        check_path(path, "plan path")
        return cls.from_json(Path(path))


def most_common(values: Iterable) -> object:
    """The most frequent value (the smallest among equally frequent ones)."""
    counts = Counter(values)
    return min(counts, key=lambda value: (-counts[value], value))
