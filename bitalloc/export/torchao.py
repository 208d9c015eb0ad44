"""torchao: ``FqnToConfig`` of module names -> ``IntxWeightOnlyConfig(torch.intN, PerGroup(B))``.

torchao (``torchao/quantization/quant_api.py``) applies a module's config when its fully qualified
name is a key (exact names before ``re:`` regexes); ``None`` leaves the module alone. The file form is
torchao's own serialization (``torchao.core.config.config_from_dict`` reads it back).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..quant import format_of
from ._common import (
    Grid,
    Matrix,
    PlanLike,
    Translation,
    begin,
    divisor_group,
    finish,
    matrices,
    read_plan,
)
from ._exact import IntegerGroups
from ._plan import Plan

if TYPE_CHECKING:
    from torchao.quantization import FqnToConfig

TARGET = "torchao"
GRID = Grid("symmetric intN levels", "a scale in the weight's dtype and an int8 zero point per group")
SCALE_BITS = 16  # scales take the weight's dtype: bf16/fp16 checkpoints assumed
# Serialization versions of the configs written below (torchao 0.14-0.18).
FQN_TO_CONFIG_VERSION = 1
INTX_WEIGHT_ONLY_VERSION = 2
PER_GROUP_VERSION = 1


def assignments(plan: Plan) -> dict[str, tuple[int, int, str] | None]:
    """Module name -> (bits, group size, mapping type) for torchao, ``None`` for kept modules.

    torchao needs the group size to divide the row, so a block that does not gets the largest
    group that does; uint configs map to ASYMMETRIC, the others to SYMMETRIC."""
    config: dict[str, tuple[int, int, str] | None] = dict.fromkeys(plan.kept)
    for m in matrices(plan):
        mapping = "ASYMMETRIC" if m.config.asymmetric else "SYMMETRIC"
        config[m.name] = (m.config.bits, divisor_group(m.config.block_size, m.columns), mapping)
    return config


def storage_bits(m: Matrix, group: int) -> int:
    """UNPACKED_TO_INT8: one int8 per weight, then a 16-bit scale and an int8 zero point per group."""
    return m.numel * 8 + m.rows * (m.columns // group) * (SCALE_BITS + 8)


# IntxWeightOnlyConfig(ASYMMETRIC, UNPACKED_TO_INT8): a scale in the weight's dtype (bf16 models
# first) and an int8 zero point per group, groups dividing the row
EXACT = IntegerGroups(
    TARGET,
    lambda m: storage_bits(m, m.config.block_size),
    scale_dtypes=("bf16", "fp16"),
    scale_follows_model=True,
)


def _config_dict(bits: int, group: int, mapping: str = "SYMMETRIC") -> dict:
    """One ``IntxWeightOnlyConfig`` in torchao's ``config_to_dict`` form (defaults left out)."""
    return {
        "_type": "IntxWeightOnlyConfig",
        "_version": INTX_WEIGHT_ONLY_VERSION,
        "_data": {
            "weight_dtype": {"_type": "torch.dtype", "_data": f"int{bits}"},
            "granularity": {
                "_type": "PerGroup",
                "_version": PER_GROUP_VERSION,
                "_data": {"group_size": group},
            },
            "mapping_type": {"_type": "MappingType", "_data": mapping},
            "intx_packing_format": {"_type": "IntxPackingFormat", "_data": "UNPACKED_TO_INT8"},
        },
    }


def translate(plan: Plan) -> Translation:
    """The JSON twin of ``to_torchao(plan)``, with notes and torchao's bits/param."""
    config = assignments(plan)
    groups = {name: value[1] for name, value in config.items() if value is not None}
    mats, notes = begin(plan, TARGET, GRID, groups, exact=EXACT)
    if any(not format_of(m.config).uniform for m in mats):
        notes.append(
            "torchao's NF4 (NF4WeightOnlyConfig: block 64, int8 scalers per 256 blocks, mean-subtracted) "
            "is fixed, 4-bit only and not loadable from a dict, so NF configs map to IntxWeightOnlyConfig"
        )
    notes.append(
        "IntxWeightOnlyConfig's default layout UNPACKED_TO_INT8 stores every weight in 8 bits whatever "
        "its bit width (packed layouts need torchao's CPU kernels); the budget re-check counts that"
    )
    notes.append(
        f"apply with quantize_(model, config, filter_fn=None); kept modules map to None ({len(plan.kept)})"
    )
    fqn_to_config = {name: None if value is None else _config_dict(*value) for name, value in config.items()}
    payload = {
        "_type": "FqnToConfig",
        "_version": FQN_TO_CONFIG_VERSION,
        "_data": {"fqn_to_config": fqn_to_config},
    }
    return finish(plan, mats, notes, TARGET, lambda m: storage_bits(m, groups[m.name]), payload)


def to_torchao_dict(plan: PlanLike) -> dict:
    """The JSON-able twin of `to_torchao`: ``config_from_dict(to_torchao_dict(plan))`` rebuilds it."""
    return translate(read_plan(plan)).payload


def to_torchao(plan: PlanLike) -> FqnToConfig:
    """The real ``torchao.quantization.FqnToConfig`` for ``plan`` (imports torch and torchao)."""
    import torch
    from torchao.quantization import FqnToConfig, IntxWeightOnlyConfig, MappingType, PerGroup
    from torchao.quantization.quantize_.workflows import IntxPackingFormat

    plan = read_plan(plan)
    translate(plan)  # the same checks, warning and notes as the file form
    fqn_to_config = {
        name: None
        if value is None
        else IntxWeightOnlyConfig(
            weight_dtype=getattr(torch, f"int{value[0]}"),
            granularity=PerGroup(value[1]),
            mapping_type=getattr(MappingType, value[2]),
            intx_packing_format=IntxPackingFormat.UNPACKED_TO_INT8,
        )
        for name, value in assignments(plan).items()
    }
    return FqnToConfig(fqn_to_config)
