"""What every export target shares: reading the plan, per-matrix views, notes, the budget re-check.

Each target module turns a plan into a `Translation`: the payload its tool reads (a dict, or text
for llama.cpp), notes on what had no exact equivalent, and the bits per parameter the tool will
really store for the plan's matrices (its own accounting, not bitalloc's).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from fractions import Fraction

from ..errors import BitallocError
from ..quant import QuantConfig, format_of
from ._plan import Plan, TargetFormat, achieved_bits

PlanLike = Plan | dict | str | os.PathLike


@dataclass(frozen=True)
class Matrix:
    """One quantized matrix of the plan: module name, parsed config, shape (rows = out, columns = in)."""

    name: str
    config: QuantConfig
    rows: int
    columns: int
    storage_bits: int  # bitalloc's exact storage for this config

    @property
    def numel(self) -> int:
        return self.rows * self.columns


@dataclass
class Translation:
    """A target's view of a plan: ``payload`` for the tool, ``notes`` for the user, bits it stores."""

    payload: dict | str
    notes: list[str]
    target_bits: float


def read_plan(plan: PlanLike) -> Plan:
    """Validate ``plan`` (a `Plan`, parsed JSON or a path) as ``bitalloc.plan/v1``; BitallocError if not."""
    if isinstance(plan, Plan):
        try:
            text = plan.to_json()
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise BitallocError(f"invalid plan: {exc}") from None
        return Plan.from_json(text)
    if isinstance(plan, dict):
        try:
            text = json.dumps(plan, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise BitallocError(f"invalid plan: {exc}") from None
        return Plan.from_json(text)
    if isinstance(plan, (str, os.PathLike)):
        return Plan.load(plan)
    raise BitallocError(f"invalid plan: expected a Plan, a dict or a path, got {type(plan).__name__}")


def matrices(plan: Plan) -> list[Matrix]:
    """The plan's quantized matrices in plan order (kept ones are in ``plan.kept``)."""
    return [
        Matrix(
            name=name,
            config=QuantConfig.parse(entry.config),
            rows=entry.shape[0],
            columns=entry.shape[1],
            storage_bits=entry.storage_bits,
        )
        for name, entry in plan.modules.items()
    ]


def anchored(name: str) -> str:
    """A regex that matches exactly ``name`` (``^...$``, dots escaped)."""
    return f"^{re.escape(name)}$"


def json_text(payload: dict) -> str:
    """Indented JSON with a trailing newline; key order is the payload's own (built deterministically)."""
    return json.dumps(payload, indent=2, allow_nan=False) + "\n"


def count(items: Iterable[object], total: int) -> str:
    """'N of M matrices' for notes."""
    return f"{sum(1 for _ in items)} of {total} matrices"


def divisor_group(block_size: int, columns: int, multiple_of: int = 1) -> int | None:
    """The largest group size <= ``block_size`` that divides ``columns`` (a multiple of ``multiple_of``)."""
    for group in range(min(block_size, columns), 0, -1):
        if columns % group == 0 and group % multiple_of == 0:
            return group
    return None


def lora_note(plan: Plan, target: str) -> list[str]:
    """Warn (and note) when the plan was made with a LoRA correction the target will not have."""
    rank = max([plan.defaults["rank"], *(entry.rank for entry in plan.modules.values())])
    if rank <= 0:
        return []
    note = (
        f"this plan was made with LoRA rank {rank}: it minimized ||W - Q - B.A||, but {target} quantizes "
        "with its own method and no B.A, so the allocation assumed a correction the target will not "
        "have; plan from a no-correction profile for export (bitalloc profile --rank 0)"
    )
    warnings.warn(note, UserWarning, stacklevel=5)  # the caller of to_*/export
    return [note]


def budget_check(
    plan: Plan, mats: list[Matrix], target: str, storage: Callable[[Matrix], int]
) -> tuple[str, float]:
    """Re-check the budget in the target's storage: (note, bits/param the target stores).

    A plan made in this target's format (``plan.target``) counted its bits in the target's storage:
    the re-check compares with that total, and its figure is computed as the plan's achieved bits
    were (`bitalloc.planning.budget.achieved_bits`), so the two are equal floats when the storage is."""
    numel = sum(m.numel for m in mats)
    budget = plan.budget["target_bits"]
    in_target = bool(plan.target) and plan.target["name"] == target
    plan_total = plan.target["storage_bits"] if in_target else sum(m.storage_bits for m in mats)
    target_total = sum(storage(m) for m in mats)
    ratio = Fraction(target_total, numel)
    target_bits = achieved_bits(ratio, budget) if ratio <= Fraction(budget) else float(round(ratio, 6))
    plan_bits = Fraction(plan_total, numel)
    verdict = "over" if ratio > Fraction(budget) else "within"
    if in_target and plan_total == target_total:
        note = (
            f"budget re-check in {target}'s storage: {target_bits!r} bits/param for the plan's {len(mats)} "
            f"quantized matrices, equal to the plan's bits (planned in {target}'s storage; {verdict} the "
            f"plan's budget of {budget:g})"
        )
    else:
        where = f"{target}'s storage when planned" if in_target else "bitalloc's format"
        note = (
            f"budget re-check in {target}'s storage: {float(ratio):.4f} bits/param for the plan's "
            f"{len(mats)} quantized matrices vs {float(plan_bits):.4f} in {where} "
            f"({float(ratio - plan_bits):+.4f}; {verdict} the plan's budget of {budget:g})"
        )
    if plan.budget["includes_lora"]:
        note += "; the plan's budget also counted LoRA factors, which the target does not store"
    return note, target_bits


def exact_note(plan: Plan, mats: list[Matrix], target: str, conditions: str | None = None) -> str:
    """The note of a plan whose every config the target stores exactly (``conditions``: what must
    hold where it runs)."""
    note = (
        f"exact: {target} stores the configs of all {len(mats)} matrices as planned (the same codes, groups, "
        "scales and offsets: its dequantization of them equals bitalloc's)"
    )
    if conditions:
        note += f"; {conditions}"
    if not (plan.target and plan.target["name"] == target):
        note += (
            f"; the plan's budget counted bitalloc's storage, not {target}'s (plan --target {target} "
            "counts the target's)"
        )
    return note


@dataclass(frozen=True)
class Grid:
    """How a target stores a quantized matrix, in words for the notes."""

    levels: str  # e.g. "symmetric integer levels"
    scales: str  # e.g. "an fp16 scale and a packed zero point per group"


def grid_notes(
    mats: list[Matrix], target: str, grid: Grid, groups: dict[str, int] | None = None
) -> list[str]:
    """Notes for targets that store integer levels per group: what the plan's formats became."""
    total = len(mats)
    asymmetric = [m for m in mats if m.config.asymmetric]
    uniform_grid = [m for m in mats if not m.config.asymmetric and format_of(m.config).uniform]
    nf = count((m for m in mats if not format_of(m.config).uniform), total)
    uniform = count(uniform_grid, total)
    symmetric = total - len(asymmetric)
    notes = []
    if symmetric:
        which = f"all {total}" if symmetric == total else f"{symmetric} of {total}"
        notes.append(
            f"levels -> {grid.levels} for {which} matrices: {target} has no NormalFloat codebook (NF: {nf}) "
            f"and its integer grid is not bitalloc's linspace(-1, 1, 2^k) (int: {uniform})"
        )
    if asymmetric:
        notes.append(
            f"asymmetric integer groups (uint: {count(asymmetric, total)}) -> {target}'s asymmetric mode "
            "(sym=False), the same formula w = (q - z)·s"
        )
    scale_formats = ", ".join(sorted({"s" + m.config.scale_format + m.config.tail for m in mats}))
    notes.append(f"scales ({scale_formats}) -> {grid.scales}")
    searched = [m for m in mats if m.config.search]
    if searched:
        notes.append(
            f"-mse scale search ({count(searched, total)}): {target} chooses its own scales when it quantizes"
        )
    rounded = [m for m in mats if m.config.gptq]
    if rounded:
        notes.append(
            f"-gptq rounding ({count(rounded, total)}): {target} chooses its own codes when it quantizes"
        )
    if groups is not None:
        changed = [m for m in mats if groups[m.name] != m.config.block_size]
        if changed:
            pairs = sorted({(m.config.block_size, groups[m.name], m.columns) for m in changed})
            detail = ", ".join(f"{b} -> {g} for {c} columns" for b, g, c in pairs)
            notes.append(
                f"group size ({count(changed, total)}): {detail}, the largest group that divides the row"
            )
    else:
        partial = [m for m in mats if m.columns % m.config.block_size]
        if partial:
            notes.append(
                f"rows not a multiple of the group size ({count(partial, total)}): the last group of each "
                "row is partial; some kernels refuse such shapes"
            )
    return notes


def begin(
    plan: Plan,
    target: str,
    grid: Grid | None = None,
    groups: dict[str, int] | None = None,
    exact: TargetFormat | None = None,
) -> tuple[list[Matrix], list[str]]:
    """The plan's matrices and the first notes: the LoRA warning, then "exact" when the target
    stores every config exactly (``exact``: its declared grid), else for integer-grid targets what
    the plan's levels, scales and blocks became (see `grid_notes`)."""
    mats = matrices(plan)
    notes = lora_note(plan, target)
    configs = [m.config for m in mats]
    if (
        exact is not None
        and all(exact.why_not(m.config, (m.rows, m.columns)) is None for m in mats)
        and exact.plan_why_not(configs) is None
    ):
        notes.append(exact_note(plan, mats, target, exact.conditions(configs)))
    elif grid is not None:
        notes += grid_notes(mats, target, grid, groups)
    return mats, notes


def finish(
    plan: Plan,
    mats: list[Matrix],
    notes: list[str],
    target: str,
    storage: Callable[[Matrix], int],
    payload: dict | str,
) -> Translation:
    """The translation, with the budget re-checked in the target's ``storage`` as the last note."""
    note, target_bits = budget_check(plan, mats, target, storage)
    return Translation(payload, [*notes, note], target_bits)


def packed_words(values: int, bits: int, word_bits: int = 32) -> int:
    """Bits taken by ``values`` codes of ``bits`` bits packed densely into ``word_bits``-bit words."""
    return math.ceil(values * bits / word_bits) * word_bits


def symmetric(m: Matrix) -> bool:
    """Whether the target's group is symmetric (no stored zero point used): all but uint configs."""
    return not m.config.asymmetric


def gptq_packed_bits(m: Matrix, g_idx: bool) -> int:
    """Bits of the GPTQ packed layout (GPTQModel, AutoRound): int32-packed codes and zero points,
    fp16 scales per group, plus GPTQ's int32 ``g_idx`` per input column when ``g_idx``."""
    groups = math.ceil(m.columns / m.config.block_size)
    bits = m.config.bits
    codes = m.rows * packed_words(m.columns, bits)
    zeros = groups * packed_words(m.rows, bits)
    return codes + zeros + groups * m.rows * 16 + (32 * m.columns if g_idx else 0)
