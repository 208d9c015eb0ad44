"""GPTQModel: a ``QuantizeConfig`` with base ``bits``/``group_size`` and per-module ``dynamic`` overrides.

GPTQModel (``gptqmodel/quantization/config.py::_resolve_dynamic_override``) strips a ``+:`` (override)
or ``-:`` (skip) prefix from each ``dynamic`` key and tries ``re.match`` against the full module name,
in dict order; the first match wins. Keys here are anchored exact names, kept modules first.
"""

from __future__ import annotations

from ._common import (
    Grid,
    PlanLike,
    Translation,
    anchored,
    begin,
    finish,
    gptq_packed_bits,
    read_plan,
    symmetric,
)
from ._exact import IntegerGroups
from ._plan import Plan, most_common

TARGET = "gptqmodel"
GRID = Grid("symmetric GPTQ integer levels", "an fp16 scale and a packed zero point per group (GPTQ layout)")
# GPTQModel's kernels take groups of 16 to 128 (their SUPPORTS_GROUP_SIZE, besides -1: whole rows)
GPTQ_GROUP_SIZES = (16, 32, 64, 128)
# The GPTQ layout packs qweight along the input and qzeros along the output dimension into int32
# words, 32 rows at a time at 3 bits: shapes that are multiples of 32 pack without padding.
GPTQ_DIMS_MULTIPLE = 32
# What the GPTQ format stores exactly: uint codes, fp16 scales, integer zero points (qzeros), whole
# groups; counted as GPTQ writes it (int32 words, g_idx).
EXACT = IntegerGroups(
    TARGET, lambda m: gptq_packed_bits(m, g_idx=True), group_sizes=GPTQ_GROUP_SIZES,
    dims_multiple=GPTQ_DIMS_MULTIPLE,
)  # fmt: skip


def translate(plan: Plan) -> Translation:
    """The ``QuantizeConfig`` keyword arguments for ``plan``, with notes and GPTQ's bits/param."""
    mats, notes = begin(plan, TARGET, GRID, exact=EXACT)
    base = most_common((m.config.bits, m.config.block_size, symmetric(m)) for m in mats)
    dynamic: dict[str, dict] = {f"-:{anchored(name)}": {} for name in plan.kept}
    for m in mats:
        if (m.config.bits, m.config.block_size, symmetric(m)) != base:
            override = {"bits": m.config.bits, "group_size": m.config.block_size, "sym": symmetric(m)}
            dynamic[f"+:{anchored(m.name)}"] = override
    notes.append(
        f"base bits={base[0]}, group_size={base[1]} (the most common); '+:' overrides for the other "
        f"{len(dynamic) - len(plan.kept)} matrices; kept modules as '-:' keys ({len(plan.kept)}), listed "
        "first: GPTQModel takes the first matching key in dict order"
    )
    payload = {"bits": base[0], "group_size": base[1], "sym": base[2], "dynamic": dynamic}
    translation = finish(plan, mats, notes, TARGET, EXACT.storage, payload)
    # QuantizeConfig keeps `meta` and saves it in quantize_config.json: the notes travel with the model
    payload["meta"] = {"bitalloc": {"notes": translation.notes, "target_bits": translation.target_bits}}
    return translation


def to_gptqmodel(plan: PlanLike) -> dict:
    """``QuantizeConfig(**to_gptqmodel(plan))``: base bits/group_size plus ``dynamic`` per module."""
    return translate(read_plan(plan)).payload
