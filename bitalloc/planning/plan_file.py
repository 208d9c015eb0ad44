"""The plan file: the `Plan` dataclass and its JSON form (``bitalloc.plan/v2``; v1 plans load).

The JSON layout is a contract described by ``bitalloc/planning/plan.schema.json`` (generated
from `Plan` and `ModuleEntry`); `Plan.from_json` validates against it. Writing is
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
from pathlib import Path

from ..errors import BitallocError, check_path
from ..fileio import write_text_atomic
from ..lora.decomposition import MAX_ITERS
from ..quant import QuantConfig
from . import mckp, objectives
from .entry import MODULE_KEYS, ModuleEntry
from .schema import object_schema

__all__ = [
    "MODULE_KEYS",
    "PLAN_FORMAT",
    "PLAN_FORMATS",
    "ModuleEntry",
    "Plan",
    "plan_schema",
    "validate_plan_dict",
]

PLAN_FORMAT = "bitalloc.plan/v2"
PLAN_FORMATS = ("bitalloc.plan/v1", PLAN_FORMAT)  # what loads
SCHEMA_FILE = Path(__file__).with_name("plan.schema.json")  # the generated schema, shipped in the wheel


def plan_schema() -> dict:
    """The plan's JSON Schema (draft 2020-12), generated from `Plan` and `ModuleEntry` with the
    solvers and objectives registered now; ``plan.schema.json`` is this with the built-in ones."""
    return json.loads(json.dumps(_schema_for(tuple(mckp.SOLVERS), tuple(objectives.OBJECTIVE_COLUMNS))))


def schema_text() -> str:
    """`plan_schema` as the text of ``plan.schema.json``."""
    return json.dumps(plan_schema(), indent=2, ensure_ascii=False) + "\n"


@functools.lru_cache(maxsize=8)
def _schema_for(solvers: tuple, objectives: tuple) -> dict:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://github.com/bitalloc/bitalloc/plan.schema.json",
        "title": "bitalloc plan",
        "description": "One quantization config per weight matrix under an average bit budget. "
        "Generated from bitalloc.planning.plan_file.Plan and "
        "bitalloc.planning.entry.ModuleEntry: python -m bitalloc.planning.plan_file",
        **object_schema(Plan),
        "$defs": {"module": object_schema(ModuleEntry)},
    }


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
    try:
        error = jsonschema.exceptions.best_match(_validator().iter_errors(data))
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


def _validator():
    return _validator_for(tuple(mckp.SOLVERS), tuple(objectives.OBJECTIVE_COLUMNS))


@functools.lru_cache(maxsize=8)
def _validator_for(solvers: tuple, objectives: tuple):
    import jsonschema

    return jsonschema.Draft202012Validator(_schema_for(solvers, objectives))


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


def _schema(fragment, **options):
    """A dataclass field whose JSON Schema is ``fragment`` (see `bitalloc.planning.schema`)."""
    return field(metadata={"schema": fragment}, **options)


def _closed(required: list[str], properties: dict) -> dict:
    return {"type": "object", "required": required, "additionalProperties": False, "properties": properties}


CALIBRATION_DESCRIPTION = (
    "Data-aware plans: the data their input statistics are computed from again by apply and eval "
    "(activation: second moments h; output: covariances H, statistic 'covariance', factored with damping "
    "lambda): the text's name, sha256 and (a user file) path, or token ids given directly (text "
    "'input_ids', their sha256), the token count, the context and the sha256 of the token windows "
    "(ids_sha256); given h: text 'column_weights' and their sha256 (digest). Plans from earlier versions "
    "also have digest, the sha256 of a side file that is no longer read."
)
SHA256 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}
BITS = {"type": "number", "exclusiveMinimum": 0}


@dataclass(kw_only=True)
class Plan:
    """A bit allocation: one quantization config per matrix, fields as in the plan JSON.

    ``modules`` maps each quantized matrix to its `ModuleEntry` (config, method, bits,
    block_size, scale, bits_per_param, storage_bits, shape, numel, rank, error); ``kept``
    lists the matrices left in 16 bits, outside the budget. Each field's JSON Schema is
    beside it: the plan schema is generated from them.
    """

    format: str = _schema(
        {
            "description": "v2 adds the output objective (full input covariance), its calibration fields "
            "and per-matrix layer coefficients; v1 plans still load.",
            "enum": lambda: list(PLAN_FORMATS),
        },
        default=PLAN_FORMAT,
    )
    model: dict = _schema(
        _closed(["source", "fingerprint"], {
            "source": {"type": ["string", "null"]}, "fingerprint": {"type": ["string", "null"]},
        }),
        default_factory=lambda: {"source": None, "fingerprint": None},
    )  # fmt: skip
    budget: dict = _schema(_closed(["target_bits", "achieved_bits", "includes_lora"], {
        "target_bits": BITS, "achieved_bits": BITS, "includes_lora": {"type": "boolean"},
    }))  # fmt: skip
    objective: str = _schema({"enum": lambda: list(objectives.OBJECTIVE_COLUMNS)}, default="weight")
    # data-aware plans: the data their statistics are computed from
    calibration: dict | None = _schema(
        {
            "description": CALIBRATION_DESCRIPTION,
            "type": "object",
            "anyOf": [{"required": ["text_sha256"]}, {"required": ["digest"]}],
            "properties": {
                "digest": SHA256,
                "text": {"type": ["string", "null"]},
                "text_sha256": {"type": ["string", "null"]},
                "text_path": {"type": "string", "minLength": 1},
                "ids_sha256": SHA256,
                "tokens": {"type": "integer", "minimum": 1},
                "context": {"type": "integer", "minimum": 1},
                "damping": {"type": "number", "minimum": 0},
                "statistic": {"enum": ["covariance"]},
                "lambda": {"type": "number", "minimum": 0},
            },
        },
        default=None,
    )
    # per-matrix coefficients: how they were measured
    layer_weights: dict | None = _schema(
        {
            "description": "Plans whose objective was weighted per matrix: how the coefficients (each "
            "module's 'coefficient') were measured.",
            "type": "object",
            "required": ["method"],
            "properties": {"method": {"type": "string", "minLength": 1}},
        },
        default=None,
    )
    solver: dict = _schema(_closed(["name", "status", "objective", "gap"], {
        "name": {"enum": lambda: list(mckp.SOLVERS)}, "status": {"enum": ["optimal"]},
        "objective": {"type": "number", "minimum": 0}, "gap": {"type": "number", "minimum": 0},
    }))  # fmt: skip
    defaults: dict = _schema(_closed(["rank", "iters"], {
        "rank": {"type": "integer", "minimum": 0},
        "iters": {"type": "integer", "minimum": 0, "maximum": MAX_ITERS},
    }))  # fmt: skip
    kept: list[str] = _schema(
        {"type": "array", "uniqueItems": True, "items": {"type": "string", "minLength": 1}},
        default_factory=list,
    )
    # plans made in a target tool's format (bitalloc.plan(..., target=...))
    target: dict | None = _schema(
        {
            **_closed(["name", "storage_bits"], {
                "name": {"type": "string", "minLength": 1},
                "storage_bits": {"type": "integer", "minimum": 1},
            }),
            "description": "Plans made in an export target's format (plan --target): only configs the target "
            "stores exactly, each counted in the target's own storage; storage_bits is the total the target "
            "writes for the quantized matrices, which budget.achieved_bits is computed from.",
        },
        default=None,
    )  # fmt: skip
    modules: dict[str, ModuleEntry] = _schema({
        "type": "object", "minProperties": 1, "propertyNames": {"minLength": 1},
        "additionalProperties": {"$ref": "#/$defs/module"},
    })  # fmt: skip

    def __post_init__(self) -> None:
        if isinstance(self.modules, dict):
            self.modules = {
                name: ModuleEntry.from_dict(entry, f"invalid plan: modules/{_cut(str(name))}")
                for name, entry in self.modules.items()
            }

    # ---- convenient views -----------------------------------------------------------
    @property
    def assignments(self) -> dict[str, str]:
        """Module name -> config string, for the quantized (non-kept) matrices."""
        return {name: entry.config for name, entry in self.modules.items()}

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
        modules = {name: entry.to_dict() for name, entry in self.modules.items()}
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
            **({"target": dict(self.target)} if self.target else {}),
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
        shapes.update({name: tuple(entry.shape) for name, entry in self.modules.items()})
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


if __name__ == "__main__":  # regenerate the shipped schema file from the dataclasses
    write_text_atomic(SCHEMA_FILE, schema_text())
    print(f"wrote {SCHEMA_FILE}")
