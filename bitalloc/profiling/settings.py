"""Profile options as values: what to measure (`ProfileSettings`) and on which data
(`CalibrationSettings`). Every default is defined here once; the CLI builds these."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..errors import BitallocError
from ..quant import QuantConfig, get_format

DEFAULT_METHODS = ("nf",)
DEFAULT_BITS = (2, 3, 4, 8)
DEFAULT_BLOCK_SIZES = (32, 64, 128)
DEFAULT_SCALES = ("8b256",)
DEFAULT_RANK = 16
DEFAULT_ITERS = 5
from ..lora.decomposition import MAX_ITERS  # noqa: E402,F401  (one limit: LoftQ's)

DEFAULT_TOKENS = 8192
DEFAULT_CONTEXT = 512
OBJECTIVES = ("weight", "activation", "output", "auto")
DEFAULT_LAYER_TOKENS = 512
DEFAULT_DAMPING = 0.01  # λ of the output objective's whitening, a fraction of mean(diag H)


def _tuple(value) -> tuple | None:
    if value is None:
        return None
    return (value,) if isinstance(value, (str, int, QuantConfig)) else tuple(value)


@dataclass(frozen=True)
class ProfileSettings:
    """What a profile measures: the config grid (or explicit ``configs``), LoftQ's rank and
    iterations, the low-rank method, the device and the matrices selected."""

    configs: tuple[str, ...] | None = None  # explicit config strings instead of the grid
    bits: tuple[int, ...] = DEFAULT_BITS
    block_sizes: tuple[int, ...] = DEFAULT_BLOCK_SIZES
    methods: tuple[str, ...] = DEFAULT_METHODS
    scales: tuple[str, ...] = DEFAULT_SCALES  # "8b256" (quantized scales) or fp32/fp16/bf16
    rank: int = DEFAULT_RANK  # LoRA rank r; 0: plain quantization, no correction
    iters: int = DEFAULT_ITERS  # LoftQ iterations T
    lowrank: str = "randomized"  # or "exact" (full SVD)
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    include: tuple[str, ...] | None = None  # regexes: matrices to profile (default: block Linears)
    exclude: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("configs", "bits", "block_sizes", "methods", "scales", "include", "exclude"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        if self.configs is not None:
            object.__setattr__(self, "configs", tuple(str(c) for c in self.configs))

    def grid(self) -> list[QuantConfig]:
        """The configs to profile: explicit ``configs`` in their order (duplicates dropped),
        or the grid sorted; BitallocError naming a bad entry."""
        if self.configs:
            texts = list(self.configs)
        else:
            texts = [  # each format family writes its grid point (uint adds an integer zero point)
                get_format(method).grid_config(bits, block, str(scale).removeprefix("s"))
                for method in self.methods
                for bits in self.bits
                for block in self.block_sizes
                for scale in self.scales
            ]
        grid: dict[QuantConfig, None] = {}
        for text in texts:
            try:
                grid[QuantConfig.parse(text)] = None
            except ValueError as exc:
                message = str(exc) if text in str(exc) else f"config {text!r}: {exc}"
                raise BitallocError(message) from None
        if not grid:
            raise BitallocError("the config grid is empty: give at least one bits, block size and scale")
        if self.configs:
            return list(grid)
        return sorted(grid, key=lambda c: (c.method, c.bits, c.block_size, str(c)))


@dataclass(frozen=True)
class CalibrationSettings:
    """The data of a data-aware profile: ``objective`` ("weight"; "activation": each input
    channel weighted by its second moment h; "output": the layer's output error with the full
    input covariance H; "auto": output whenever the model can be run; None: output when
    text or ids are given, activation when h is), and the data: ``tokens`` of ``text`` (a
    file, or "default": the built-in text) in windows of ``context``, or token ids
    (``input_ids``), or the statistics themselves (``column_weights``: {module: h}).
    ``damping`` is the output objective's λ (H + λ·mean(diag H)·I is factored)."""

    objective: str | None = None
    text: str | os.PathLike | None = None
    tokens: int = DEFAULT_TOKENS
    context: int = DEFAULT_CONTEXT
    input_ids: torch.Tensor | None = field(default=None, compare=False, repr=False)
    column_weights: dict | None = field(default=None, compare=False, repr=False)
    damping: float = DEFAULT_DAMPING
    layer_weights: bool = False  # measure a loss coefficient per matrix (sensitivity.py)
    layer_tokens: int = DEFAULT_LAYER_TOKENS  # calibration tokens the coefficients are measured on

    def __post_init__(self) -> None:
        if not isinstance(self.layer_weights, bool):
            raise BitallocError(f"layer_weights must be True or False, got {self.layer_weights!r}")
        tokens = self.layer_tokens
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens <= 0:
            raise BitallocError(f"layer_tokens must be a positive whole number, got {tokens!r}")
        damping = self.damping
        if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not 0 <= damping <= 1:
            raise BitallocError(f"damping must be a number from 0 to 1, got {damping!r}")

    @property
    def given(self) -> bool:
        """True when calibration data (a text, ids or statistics) was given."""
        return self.text is not None or self.input_ids is not None or self.column_weights is not None


@dataclass(frozen=True)
class Option:
    """One keyword option of `bitalloc.profile` (and `bitalloc.plan_files`): the settings field
    it sets and the command-line flag that gives it (None: Python only, e.g. tensors)."""

    keyword: str
    settings: type  # ProfileSettings or CalibrationSettings
    field: str
    flag: str | None

    @property
    def dest(self) -> str | None:
        """The flag's argparse destination (``--block-sizes`` -> ``block_sizes``)."""
        return None if self.flag is None else self.flag.removeprefix("--").replace("-", "_")


def _profile_option(name: str, flag: str | None = None) -> Option:
    return Option(name, ProfileSettings, name, flag or f"--{name.replace('_', '-')}")


# Every option name, mapped once: the keyword, the settings field, the CLI flag.
OPTIONS = (
    *(_profile_option(f.name) for f in dataclasses.fields(ProfileSettings) if f.name != "methods"),
    _profile_option("methods", "--method"),
    Option("objective", CalibrationSettings, "objective", "--objective"),
    Option("calibration_tokens", CalibrationSettings, "tokens", "--calibration-tokens"),
    Option("calibration_context", CalibrationSettings, "context", None),
    Option("calibration_ids", CalibrationSettings, "input_ids", None),
    Option("column_weights", CalibrationSettings, "column_weights", None),
    Option("damping", CalibrationSettings, "damping", "--damping"),
    Option("layer_weights", CalibrationSettings, "layer_weights", "--layer-weights"),
    Option("layer_tokens", CalibrationSettings, "layer_tokens", "--layer-tokens"),
)
PROFILE_OPTIONS = {o.keyword for o in OPTIONS if o.settings is ProfileSettings}
CALIBRATION_OPTIONS = {o.keyword: o.field for o in OPTIONS if o.settings is CalibrationSettings}


def build_settings(
    settings: ProfileSettings | None,
    calibration: CalibrationSettings | str | os.PathLike | None,
    options: dict,
    *,
    default_objective: str | None = None,
) -> tuple[ProfileSettings, CalibrationSettings]:
    """Settings from the dataclasses plus keyword options (``bits=...``, ``rank=...``,
    ``objective=...``, ``calibration_tokens=...``); ``calibration`` may be a text path or
    "default". Unknown options are a TypeError, as for any function."""
    profile_options = {k: v for k, v in options.items() if k in PROFILE_OPTIONS}
    calibration_options = {CALIBRATION_OPTIONS[k]: v for k, v in options.items() if k in CALIBRATION_OPTIONS}
    unknown = sorted(set(options) - PROFILE_OPTIONS - set(CALIBRATION_OPTIONS))
    if unknown:
        raise TypeError(f"unexpected keyword argument {unknown[0]!r}")
    settings = dataclasses.replace(settings or ProfileSettings(), **profile_options)
    if not isinstance(calibration, CalibrationSettings):
        calibration = CalibrationSettings(text=None if calibration is None else calibration)
    calibration = dataclasses.replace(calibration, **calibration_options)
    if calibration.objective is None and default_objective is not None:
        calibration = dataclasses.replace(calibration, objective=default_objective)
    return settings, calibration


def as_sequence(value: str | Sequence[str] | None) -> list[str] | None:
    return None if value is None else list(_tuple(value))
