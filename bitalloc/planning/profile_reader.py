"""Reading a profile table for planning: every cell checked, one `Matrix` per module.

The config string is the authority: a row's method, bits, block size and storage must be
what its config implies on its shape. Integer columns are read through float64, so they
are exact up to 2**53; error columns must be finite, non-negative and sum to a finite
total. The metadata is read once into a `ProfileMetadata`.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..errors import BitallocError
from ..names import natural_key
from ..profiling.table import REQUIRED_COLUMNS, ProfileMetadata, profile_metadata, read_profile
from ..quant import QuantConfig
from .budget import LORA_BITS, finite
from .objectives import OBJECTIVE_COLUMNS
from .plan_file import _shown

MAX_EXACT_INT = 2**53  # integer columns are read through float64: exact up to here


@dataclass
class Row:
    """One profiled (matrix, config) pair."""

    storage_bits: int
    error: float
    objective_error: float  # what the solver minimizes: coefficient x weighted (or plain) error
    bits: int
    rank: int
    iters: int
    weighted_error: float | None = None  # the profile's objective column, before the coefficient
    coefficient: float | None = None  # the matrix's layer weight, when the profile has them


@dataclass
class Matrix:
    shape: tuple[int, int]
    numel: int
    rows: dict[str, Row]  # config string -> row

    def storage(self, config: str, count_lora: bool) -> int:
        """Bits the budget counts for this matrix: storage_bits, plus LoRA factors if counted."""
        lora = self.rows[config].rank * (self.shape[0] + self.shape[1]) * LORA_BITS
        return self.rows[config].storage_bits + (lora if count_lora else 0)


@dataclass
class ProfileMatrices:
    """A checked profile: its matrices in natural name order, its metadata and objective."""

    matrices: dict[str, Matrix]
    meta: ProfileMetadata
    objective: str


@dataclass
class _Columns:
    """The table's columns as checked Python lists, one value per row."""

    names: list[str]
    configs: list[str]  # canonical config strings
    shapes: list
    methods: list
    numel: list[int]
    storage: list[int]
    bits: list[int]
    block_size: list[int]
    rank: list[int]
    iters: list[int]
    error: list[float]
    objective_error: list[float]


def read_table(profile_table) -> ProfileMatrices:
    """The matrices of ``profile_table`` (a DataFrame or a profile path), every row checked."""
    if isinstance(profile_table, (str, os.PathLike)):
        profile_table = read_profile(profile_table)
    if not isinstance(profile_table, pd.DataFrame):
        raise BitallocError(
            f"not a profile table: expected a pandas DataFrame, got {type(profile_table).__name__}"
        )
    meta = profile_metadata(profile_table)
    objective = meta.objective_name
    if objective not in OBJECTIVE_COLUMNS:
        raise BitallocError(
            f"unknown objective {objective!r} in the profile: expected {', '.join(OBJECTIVE_COLUMNS)}"
        )
    _check_columns(profile_table, OBJECTIVE_COLUMNS[objective])
    columns = _read_columns(profile_table, OBJECTIVE_COLUMNS[objective])
    matrices = _matrices(columns)
    for column, values in (("error", columns.error), (OBJECTIVE_COLUMNS[objective], columns.objective_error)):
        try:
            total = math.fsum(values)
        except OverflowError:
            total = math.inf
        if not math.isfinite(total):
            raise BitallocError(f"profile column {column!r}: values too large (their sum is not finite)")
    order = sorted(matrices, key=natural_key)
    return ProfileMatrices({name: matrices[name] for name in order}, meta, objective)


def _check_columns(table: pd.DataFrame, objective_column: str) -> None:
    needed = (*REQUIRED_COLUMNS, objective_column)
    missing = [column for column in dict.fromkeys(needed) if column not in table.columns]
    if missing:
        raise BitallocError(f"not a profile table: missing column(s) {', '.join(missing)}")
    duplicated = [c for c in dict.fromkeys(table.columns[table.columns.duplicated()])]
    if duplicated:
        raise BitallocError(f"not a profile table: duplicate column(s) {', '.join(map(str, duplicated))}")
    if len(table) == 0:
        raise BitallocError("the profile table is empty")


def _read_columns(table: pd.DataFrame, objective_column: str) -> _Columns:
    names = _module_names(table["module"])

    def ints(column: str, minimum: int) -> list[int]:
        return _column(table, column, names, integer=True, minimum=minimum)

    values = dict(
        numel=ints("numel", 1), storage=ints("storage_bits", 1), bits=ints("bits", 1),
        block_size=ints("block_size", 1), rank=ints("rank", 0), iters=ints("iters", 0),
        error=_column(table, "error", names, integer=False, minimum=0),
        objective_error=_column(table, objective_column, names, integer=False, minimum=0),
    )  # fmt: skip
    configs = table["config"].astype(str).to_numpy()
    canonical = {text: canonical_config(text, "profile table") for text in set(configs)}
    return _Columns(
        names=names,
        configs=[canonical[text] for text in configs],
        shapes=list(table["shape"].to_numpy()),
        methods=list(table["method"].to_numpy(dtype=object)),
        **values,
    )


def _matrices(columns: _Columns) -> dict[str, Matrix]:
    """One Matrix per module; every row checked against its config (the authority)."""
    parsed = {config: QuantConfig.parse(config) for config in set(columns.configs)}
    matrices: dict[str, Matrix] = {}
    exact_storage: dict[tuple[str, tuple[int, int]], int] = {}  # (config, shape) -> storage_bits
    for i, name in enumerate(columns.names):
        shape = _parse_shape(columns.shapes[i], name)
        if shape[0] * shape[1] != columns.numel[i]:
            raise BitallocError(f"profile row for {name!r}: numel {columns.numel[i]} != shape {shape}")
        matrix = matrices.get(name)
        if matrix is None:
            matrix = matrices[name] = Matrix(shape, columns.numel[i], {})
        elif matrix.shape != shape:
            raise BitallocError(
                f"profile rows for {name!r} disagree on its shape: {matrix.shape} and {shape}"
            )
        config = columns.configs[i]
        if config in matrix.rows:
            raise BitallocError(f"the profile has two rows for {name!r} with config {config!r}")
        exact = exact_storage.get((config, shape))
        if exact is None:
            exact = exact_storage[config, shape] = parsed[config].storage_bits(shape)
        row = Row(
            columns.storage[i], columns.error[i], columns.objective_error[i], columns.bits[i],
            columns.rank[i], columns.iters[i],
        )  # fmt: skip
        where = f"profile row for {name!r} with config {config!r}"
        _check_row(where, parsed[config], shape, row, (columns.methods[i], columns.block_size[i]), exact)
        matrix.rows[config] = row
    return matrices


def apply_coefficients(matrices: dict[str, Matrix], meta: ProfileMetadata) -> None:
    """Multiply each matrix's objective errors by its layer coefficient, if the profile has them."""
    coefficients = meta.coefficients
    if coefficients is None:
        return
    for name, matrix in matrices.items():
        value = coefficients.get(name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not finite(value) or value < 0:
            raise BitallocError(
                f"the profile's layer coefficient for {name!r} is missing or bad: {_shown(value)}"
            )
        for row in matrix.rows.values():
            row.weighted_error, row.coefficient = row.objective_error, float(value)
            row.objective_error = float(value) * row.objective_error


def _module_names(column: pd.Series) -> list[str]:
    """The ``module`` column as non-empty strings (BitallocError naming the first bad one)."""
    names = column.to_numpy(dtype=object)
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise BitallocError(
                f"profile column 'module' has a bad value {name!r} (row {i}): expected a name"
            )
    return [str(name) for name in names]


def _check_row(where: str, quant: QuantConfig, shape, row: Row, method_block: tuple, exact: int) -> None:
    """The row's derived columns must be what its config implies (the config is the authority);
    ``method_block`` is the row's (method, block_size), ``exact`` the config's exact storage
    on ``shape``."""
    method, block_size = method_block
    for column, value, expected in (
        ("method", method, quant.method),
        ("bits", row.bits, quant.bits),
        ("block_size", block_size, quant.block_size),
    ):
        if not isinstance(value, type(expected)) or value != expected:
            raise BitallocError(f"{where}: {column} {_shown(value)} disagrees with the config ({expected!r})")
    if row.storage_bits != exact:
        raise BitallocError(
            f"{where}: storage_bits {row.storage_bits} is not the exact storage of the config on shape "
            f"{list(shape)} ({exact})"
        )
    if row.rank > min(shape):
        raise BitallocError(f"{where}: rank {row.rank} exceeds the matrix size {list(shape)}")


def _column(table: pd.DataFrame, column: str, names, *, integer: bool, minimum: float) -> list:
    try:
        values = pd.to_numeric(table[column]).to_numpy(dtype=np.float64)
    except (ValueError, TypeError, OverflowError):
        raise BitallocError(f"profile column {column!r} is not numeric") from None
    if values.shape != (len(table),):
        raise BitallocError(f"profile column {column!r} is not numeric")
    bad = ~np.isfinite(values) | (values < minimum)
    if integer:
        bad |= (values != np.round(values)) | (values > MAX_EXACT_INT)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        value = float(values[i])
        expected = f"an integer >= {minimum}" if integer else f"a finite number >= {minimum}"
        if integer and math.isfinite(value) and value > MAX_EXACT_INT:
            expected = "an integer up to 2**53"
        raise BitallocError(
            f"profile column {column!r} has a bad value {value!r} (module {_shown(names[i])}): "
            f"expected {expected}"
        )
    return [int(v) for v in values] if integer else values.tolist()


def _parse_shape(shape, name: str) -> tuple[int, int]:
    """[out, in] as a list, tuple or array, or the string "OUTxIN" (also "[out, in]")."""
    try:
        if isinstance(shape, str):
            parts = re.fullmatch(r"\s*[\[(]?\s*([0-9]+)\s*(?:x|×|,)\s*([0-9]+)\s*[\])]?\s*", shape)
            dims = tuple(int(part) for part in parts.groups())
        else:
            dims = tuple(int(part) for part in shape)
            if any(isinstance(part, bool) or part != dim for part, dim in zip(shape, dims, strict=True)):
                dims = ()  # 128.5, True: not a dimension
    except (AttributeError, TypeError, ValueError, OverflowError):
        dims = ()
    if len(dims) != 2 or min(dims) < 1:
        raise BitallocError(f"profile row for {name!r}: bad shape {_shown(str(shape))}, expected [out, in]")
    return dims


def canonical_config(text: str, where: str) -> str:
    """The canonical string of config ``text``; BitallocError prefixed with ``where``."""
    try:
        return str(QuantConfig.parse(text))
    except BitallocError as exc:
        message = str(exc) if repr(text) in str(exc) else f"config {text!r}: {exc}"
        raise BitallocError(f"{where}: {message}") from None
