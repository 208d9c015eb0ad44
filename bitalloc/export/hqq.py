"""HQQ: ``quant_config`` per linear tag (``self_attn.q_proj``), the same config in every layer.

HQQ (``hqq/models/base.py::name_to_linear_tag``; transformers' ``HqqConfig(dynamic_config=...)``)
keys configs by tag, the module name without ``model``, ``layers`` and layer indices. A per-tag file
is exported only when the plan is uniform per tag; otherwise the per-module dict for ``HQQLinear``.
"""

from __future__ import annotations

from ..errors import BitallocError
from ._common import Grid, Matrix, PlanLike, Translation, begin, divisor_group, finish, matrices, read_plan
from ._exact import IntegerGroups
from ._plan import Plan

TARGET = "hqq"
GRID = Grid("affine integer levels with HQQ's optimized zero point", "an fp16 scale and zero per group")
GROUP_MULTIPLE = 8  # HQQ's BaseQuantizeConfig asserts group_size % 8 == 0
AXIS = 1  # grouping along the input dimension, as the plan's blocks (HqqConfig's default)


def linear_tag(name: str) -> str:
    """HQQ's tag for a module name: ``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``."""
    return ".".join(
        part for part in name.split(".") if part not in ("model", "layers") and not part.isnumeric()
    )


def storage_bits(m: Matrix, group: int) -> int:
    """HQQ's packed codes (3 bits: 10 codes per int32 along the groups), fp16 scale and zero per group."""
    groups = m.numel // group
    codes = -(-groups // 10) * group * 32 if m.config.bits == 3 else m.numel * m.config.bits
    return codes + groups * 2 * 16


# HQQ (axis=1): a scale and a float zero in the compute dtype (the model's) per group, groups multiples of 8
EXACT = IntegerGroups(
    TARGET, lambda m: storage_bits(m, m.config.block_size), scale_dtypes=("fp16", "bf16"), float_zero=True,
    group_multiple=GROUP_MULTIPLE, scale_follows_model=True,
)  # fmt: skip


def _group(m: Matrix) -> int:
    group = divisor_group(m.config.block_size, m.columns, GROUP_MULTIPLE)
    if group is None:
        raise BitallocError(
            f"hqq: no group size that is a multiple of {GROUP_MULTIPLE} divides the {m.columns} columns "
            f"of {m.name!r}"
        )
    return group


def translate(plan: Plan, per_module: bool = False) -> Translation:
    """``HqqConfig`` arguments per tag (or, with ``per_module``, one ``HQQLinear`` config per module)."""
    groups = {m.name: _group(m) for m in matrices(plan)}
    mats, notes = begin(plan, TARGET, GRID, groups, exact=EXACT)
    module_configs: dict[str, dict | None] = dict.fromkeys(plan.kept)
    for m in mats:
        module_configs[m.name] = {"nbits": m.config.bits, "group_size": groups[m.name], "axis": AXIS}

    def storage(m: Matrix) -> int:
        return storage_bits(m, groups[m.name])

    if per_module:
        notes.append(
            "per module: HQQLinear(linear, BaseQuantizeConfig(**config)) for each module; "
            "None = left in 16 bits"
        )
        return finish(plan, mats, notes, TARGET, storage, module_configs)
    by_tag: dict[str, list[dict | None]] = {}
    for name, config in module_configs.items():
        by_tag.setdefault(linear_tag(name), []).append(config)
    mixed = [tag for tag, configs in by_tag.items() if any(config != configs[0] for config in configs)]
    if mixed:
        raise BitallocError(
            "hqq keys quantization configs by tag (e.g. self_attn.q_proj), not by layer, and this plan "
            f"gives {len(mixed)} of {len(by_tag)} tags different configs in different layers "
            f"({', '.join(mixed)}); export per module instead: bitalloc.export.to_hqq(plan, per_module=True) "
            "gives {module: config} for HQQLinear"
        )
    dynamic_config = {tag: configs[0] for tag, configs in by_tag.items() if configs[0] is not None}
    kept_tags = [tag for tag, configs in by_tag.items() if configs[0] is None and tag != "lm_head"]
    notes.append(
        f"per tag: the plan is uniform per tag ({len(dynamic_config)} quantized tags"
        + (f", kept tags {', '.join(kept_tags)} in skip_modules)" if kept_tags else ")")
    )
    payload = {"dynamic_config": dynamic_config, "skip_modules": ["lm_head", *kept_tags]}
    return finish(plan, mats, notes, TARGET, storage, payload)


def to_hqq(plan: PlanLike, per_module: bool = False) -> dict:
    """``HqqConfig(**to_hqq(plan))`` (per tag), or ``{module: BaseQuantizeConfig kwargs}`` per module."""
    return translate(read_plan(plan), per_module=per_module).payload
