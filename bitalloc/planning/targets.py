"""Planning in a target tool's format: which configs a target stores exactly, and in how many bits.

An export target (`bitalloc.export`) that can store some of bitalloc's configs exactly (the same
codes, group size, scale and zero point, so its dequantization equals bitalloc's) declares them as
a `TargetFormat`: ``why_not`` says why a config is not stored exactly (on a matrix shape, or on any
shape), ``storage_bits`` is the target's own accounting of what it writes, and ``grid`` the default
configs to profile for it. Planning with a target (`bitalloc.plan(..., target=...)`) keeps, per
matrix, only the configs the target stores exactly for that matrix's shape and counts each in the
target's storage, so the plan's bits are the target's bits. The declarations live with the export
targets (this package comes first and only defines the protocol).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from ..errors import BitallocError
from ..profiling.settings import DEFAULT_METHODS, DEFAULT_SCALES, ProfileSettings
from ..quant import QuantConfig

Shape = tuple[int, int]


class TargetFormat:
    """What an export target stores exactly (subclass it; `bitalloc.export` has the declarations).

    ``name`` is the export target's name. A target that stores no bitalloc config exactly has no
    TargetFormat (plans for it approximate, and its export says so)."""

    name: str  # the export target's name
    description: str = ""  # the exact configs in words, for error messages

    def why_not(self, config: QuantConfig, shape: Shape | None = None) -> str | None:
        """None if the target stores ``config`` exactly on a matrix of ``shape`` (None: on some
        shape), else why not, in a few words."""
        raise NotImplementedError

    def storage_bits(self, config: QuantConfig, shape: Shape) -> int:
        """Bits the target writes for a (rows, columns) matrix in ``config`` (its own accounting)."""
        raise NotImplementedError

    def grid(self, bits: Sequence[int], block_sizes: Sequence[int]) -> list[str]:
        """The configs to profile for the target at these bits and block sizes (its default grid)."""
        raise NotImplementedError

    def plan_why_not(self, configs: Sequence[QuantConfig]) -> str | None:
        """None if a plan using all of ``configs`` (each stored exactly on its own) is stored exactly
        as a whole, else why not (e.g. two scale dtypes where the target stores the model's one)."""
        return None

    def conditions(self, configs: Sequence[QuantConfig]) -> str | None:
        """What must hold where the target runs for it to store ``configs`` as planned (a clause for
        the export's "exact" note), or None."""
        return None


def check_target(target: object) -> TargetFormat | None:
    """``target`` if it is a TargetFormat or None; BitallocError otherwise (names resolve in
    `bitalloc.export.target_format`)."""
    if target is None or isinstance(target, TargetFormat):
        return target
    raise BitallocError(
        f"target must be a TargetFormat (bitalloc.export.target_format(name)), got {type(target).__name__}"
    )


def refuse(target: TargetFormat, config: str | QuantConfig, why: str) -> BitallocError:
    """The one-line error for a config the target does not store exactly."""
    return BitallocError(
        f"config {str(config)!r} is not stored exactly by {target.name} ({why}); --target {target.name} "
        f"takes {target.description}"
    )


def check_configs(target: TargetFormat, configs: Sequence[str]) -> None:
    """BitallocError naming the first config the target never stores exactly."""
    parsed = []
    for text in configs:
        parsed.append(QuantConfig.parse(text))
        why = target.why_not(parsed[-1])
        if why is not None:
            raise refuse(target, text, why)
    why = target.plan_why_not(parsed)
    if why is not None:
        raise BitallocError(f"--target {target.name}: the configs are not stored exactly together: {why}")


def target_settings(target: TargetFormat, settings: ProfileSettings) -> ProfileSettings:
    """``settings`` for profiling in ``target``'s format: explicit configs are checked (each must be
    one the target stores exactly), else the grid is the target's at the settings' bits and block
    sizes. The target chooses the format family and scales, so other methods or scales are refused."""
    if settings.configs:
        check_configs(target, settings.configs)
        return settings
    if tuple(settings.methods) != DEFAULT_METHODS or tuple(settings.scales) != DEFAULT_SCALES:
        raise BitallocError(
            f"--target {target.name} chooses the format ({target.description}): drop --method and "
            "--scales, or give --configs that it stores exactly"
        )
    return dataclasses.replace(settings, configs=tuple(target.grid(settings.bits, settings.block_sizes)))
