"""compressed-tensors: a ``quantization_config`` with one config group per (bits, group size).

compressed-tensors (``src/compressed_tensors/utils/match.py``) matches a target by exact module name,
then ``re:`` regex, then class name; ``ignore`` wins over targets. Targets here are full names, so a
scheme reaches exactly the modules the plan gave it. The consumer that quantizes with it is an
llm-compressor recipe (``GPTQModifier(config_groups=..., ignore=...)``); see docs/export.md.
"""

from __future__ import annotations

import math

from ._common import Grid, Matrix, PlanLike, Translation, begin, finish, packed_words, read_plan, symmetric
from ._exact import IntegerGroups
from ._plan import Plan

TARGET = "compressed-tensors"
GRID = Grid("symmetric integer levels", "a 16-bit scale per group, no zero point (pack-quantized)")
VLLM_WNA16_BITS = (4, 8)


def storage_bits(m: Matrix) -> int:
    """pack-quantized: int32-packed rows (``weight_packed``), 16-bit ``weight_scale`` per group and
    the int64 ``weight_shape`` pair; asymmetric groups add ``weight_zero_point``, packed to int32
    along the rows."""
    groups = math.ceil(m.columns / m.config.block_size)
    zeros = 0 if symmetric(m) else groups * packed_words(m.rows, m.config.bits)
    return m.rows * packed_words(m.columns, m.config.bits) + m.rows * groups * 16 + 2 * 64 + zeros


# pack-quantized int groups: scales in the model's dtype, integer zero points (weight_zero_point)
EXACT = IntegerGroups(TARGET, storage_bits, scale_dtypes=("fp16", "bf16"), scale_follows_model=True)


def _group_order(item: tuple) -> tuple:
    """Config groups in (bits, group size) order, symmetric first (the order before uint existed)."""
    (bits, group, sym), _ = item
    return (bits, group, not sym)


def translate(plan: Plan) -> Translation:
    """The ``quantization_config`` for ``plan``, with notes and pack-quantized bits/param."""
    mats, notes = begin(plan, TARGET, GRID, exact=EXACT)
    targets: dict[tuple[int, int, bool], list[str]] = {}
    for m in mats:
        targets.setdefault((m.config.bits, m.config.block_size, symmetric(m)), []).append(m.name)
    config_groups = {
        f"group_{index}": {
            "targets": names,
            "weights": {
                "num_bits": bits,
                "type": "int",
                "symmetric": sym,
                "strategy": "group",
                "group_size": group,
            },
        }
        for index, ((bits, group, sym), names) in enumerate(sorted(targets.items(), key=_group_order))
    }
    unserved = [m for m in mats if m.config.bits not in VLLM_WNA16_BITS]
    if unserved:
        notes.append(
            f"vLLM's WNA16 kernels serve 4 and 8 bits only: {len(unserved)} of {len(mats)} matrices at "
            f"{'/'.join(str(b) for b in sorted({m.config.bits for m in unserved}))} bits load in "
            "compressed-tensors but will not run in vLLM"
        )
    notes.append(
        "consumer: an llm-compressor recipe, GPTQModifier(config_groups=..., ignore=...) from this file, "
        "then oneshot(); the saved checkpoint carries this quantization_config (status compressed)"
    )
    payload = {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "initialized",
        "config_groups": config_groups,
        "ignore": list(dict.fromkeys([*plan.kept, "lm_head"])),
    }
    return finish(plan, mats, notes, TARGET, storage_bits, payload)


def to_compressed_tensors(plan: PlanLike) -> dict:
    """``QuantizationConfig.model_validate(to_compressed_tensors(plan))``: one group per (bits, group)."""
    return translate(read_plan(plan)).payload
