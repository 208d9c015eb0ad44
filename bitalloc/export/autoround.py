"""AutoRound: ``layer_config``, full module name -> ``{bits, group_size, sym, data_type}``.

AutoRound (``auto_round/compressors/layer_config/resolver.py``) uses a key as is when it names a
quantizable layer and otherwise as a regex with ``re.search``; every key here is a full name.
"""

from __future__ import annotations

from ._common import Grid, PlanLike, Translation, begin, finish, gptq_packed_bits, read_plan, symmetric
from ._exact import IntegerGroups
from ._plan import Plan, most_common
from .gptqmodel import GPTQ_DIMS_MULTIPLE, GPTQ_GROUP_SIZES

TARGET = "autoround"
GRID = Grid("symmetric integer levels", "an fp16 scale and a packed zero point per group (auto_round format)")
# AutoRound's own entry for a layer left in 16 bits (what its ignore_layers option writes).
KEPT = {"bits": 16, "act_bits": 16, "data_type": "float", "act_data_type": "float"}
# The auto_round format is GPTQ's packed layout without g_idx: the same exact configs.
EXACT = IntegerGroups(
    TARGET, lambda m: gptq_packed_bits(m, g_idx=False), group_sizes=GPTQ_GROUP_SIZES,
    dims_multiple=GPTQ_DIMS_MULTIPLE,
)  # fmt: skip


def translate(plan: Plan) -> Translation:
    """The ``layer_config`` for ``plan``, with notes and AutoRound's bits/param."""
    mats, notes = begin(plan, TARGET, GRID, exact=EXACT)
    layer_config = {name: dict(KEPT) for name in plan.kept}
    for m in mats:
        layer_config[m.name] = {
            "bits": m.config.bits,
            "group_size": m.config.block_size,
            "sym": symmetric(m),
            "data_type": "int",
        }
    bits, group = most_common((m.config.bits, m.config.block_size) for m in mats)
    notes.append(
        f"every planned module listed by full name, kept modules at 16 bits ({len(plan.kept)}); layers "
        f"outside the plan take the scheme you pass (the plan's most common: W{bits}A16, group {group})"
    )
    return finish(plan, mats, notes, TARGET, EXACT.storage, layer_config)


def to_autoround(plan: PlanLike) -> dict:
    """``AutoRound(model, tokenizer, layer_config=to_autoround(plan))``: one entry per module."""
    return translate(read_plan(plan)).payload
