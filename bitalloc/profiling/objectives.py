"""Objectives: what a profile minimizes, as values registered in one place.

An `Objective` owns everything that differs between the objectives: its name (in the
profile's metadata and the plan's ``objective``), the profile column the planner minimizes,
the statistic it needs and how that is collected (none; h, the diagonal of the inputs'
second moment; or H, all of it: `bitalloc.profiling.collect`), what a profile and a plan
record of it, how a statistic weighs LoftQ (a `bitalloc.lora.weighting` value) and its
label in figures. The built-in ones:

- ``weight``: ‖W − Q − B A‖²_F, no statistics;
- ``activation``: ‖(W − Q − B A)·diag(√h)‖²_F with h the damped diagonal of XᵀX/n (or h
  given directly as ``column_weights``);
- ``output``: the layer's output error ‖(W − Q − B A)·L‖²_F with L Lᵀ = H + λI, H = XᵀX/n.

A new objective is a subclass (or instance) of `Objective` passed to `register`; the
profile, the planner, `apply`, `eval` and the report find it by name.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from ..checkpoints.runnable import can_run, runnable
from ..errors import BitallocError
from ..lora.weighting import IDENTITY, Diagonal, Weighting, Whitened
from .calibrator import Calibrator, calibration_spec, calibrator_for, recalibrator
from .collect import DAMPING
from .given import check_given, given_digest, settings_digest
from .settings import CalibrationSettings

ERROR_LABEL = "total error, log scale"


class Statistics(Mapping):
    """Statistics in memory, read-only: the statistic of each module (h or H, or what the
    objective collects), with the objective they are for and its damping λ."""

    def __init__(self, values: Mapping[str, torch.Tensor], objective: str, damping: float = DAMPING) -> None:
        self._values = dict(values)
        self.objective, self.damping = objective, float(damping)

    def __getitem__(self, module: str) -> torch.Tensor:
        return self._values[module]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def weighting(self, module: str) -> Weighting:
        """How ``module``'s decomposition is weighted."""
        return get_objective(self.objective).weighting(self._values[module], self.damping)


@dataclass(frozen=True)
class Objective:
    """The weight objective, ‖W − Q − B A‖²_F, and the base of every objective: a
    data-aware one overrides `weighting` and the statistics methods."""

    name: str
    column: str = "error"  # the profile column the planner minimizes
    label: str = f"{ERROR_LABEL}\nΣ ‖W − Q − BA‖²_F  (squared weight units)"
    data_aware: bool = False

    def weighting(self, statistic: torch.Tensor | None, damping: float) -> Weighting:
        """How a matrix's decomposition is weighted by its ``statistic``."""
        return IDENTITY

    def check(self, model, calibration: CalibrationSettings) -> None:
        """BitallocError, before a profile writes anything, when ``calibration`` does not fit."""
        if calibration.given:
            raise BitallocError(f"calibration data was given with objective {self.name!r}: drop one of them")

    def profile_settings(self, model, calibration: CalibrationSettings) -> dict:
        """What the profile settings (its resume identity) keep of the objective's data."""
        return {}

    def profile_statistics(self, model, calibration: CalibrationSettings, shapes: dict):
        """(record, statistics) of a profile: what the metadata keeps to compute them again,
        and a `Statistics` mapping or a `Calibrator` (block by block); (None, None) without."""
        return None, None

    def plan_statistics(self, model, record: dict | None, shapes: dict, data: PlanData):
        """A plan's statistics again for `apply` and `eval` (None, `Statistics` or a
        `Calibrator`), from its ``record`` and the ``data`` given."""
        if data.text is not None or data.input_ids is not None or data.column_weights is not None:
            raise BitallocError(f"this plan is {self.name}-only: it takes no calibration data")
        return None

    def damping(self, record: dict | None) -> float:
        """λ a plan records for its weighting (0 where it has none)."""
        return 0.0


@dataclass(frozen=True)
class PlanData:
    """The calibration data given to `apply`/`eval` to compute a plan's statistics again."""

    text: str | os.PathLike | None = None
    input_ids: torch.Tensor | None = field(default=None, repr=False)
    column_weights: dict | None = field(default=None, repr=False)


@dataclass(frozen=True)
class Calibrated(Objective):
    """An objective weighted by the calibration inputs' second moment: its diagonal h
    (`Diagonal`) or with ``covariance`` all of H (`Whitened`, damped by λ)."""

    column: str = "weighted_error"
    data_aware: bool = True
    covariance: bool = False

    def weighting(self, statistic: torch.Tensor | None, damping: float) -> Weighting:
        if statistic is None:
            raise BitallocError(f"the {self.name} objective needs input statistics")
        return Whitened(statistic, damping) if self.covariance else Diagonal(statistic)

    def check(self, model, calibration: CalibrationSettings) -> None:
        if calibration.column_weights is not None:
            if self.covariance:
                raise BitallocError(
                    f"column_weights are a diagonal: the {self.name} objective needs text or token ids"
                )
            return
        if calibration.input_ids is None and model is not None and not can_run(model):
            what = type(model).__name__ if isinstance(model, nn.Module) else getattr(model, "name", model)
            raise BitallocError(
                f"no tokenizer (or no config) to run {what} on calibration text: "
                "give token ids or activation statistics instead, or use objective 'weight'"
            )

    def profile_settings(self, model, calibration: CalibrationSettings) -> dict:
        if calibration.column_weights is not None:
            found = {"calibration": {"column_weights": settings_digest(calibration.column_weights)}}
        else:
            spec = calibration_spec(calibration.text, calibration.tokens, calibration.context,
                                    calibration.input_ids, self.covariance)  # fmt: skip
            found = {"calibration": spec}
            if not isinstance(model, nn.Module):
                with runnable(model):  # the model can be built from its config: before any work
                    pass
        if self.covariance:
            found["damping"] = float(calibration.damping)
        return found

    def profile_statistics(self, model, calibration: CalibrationSettings, shapes: dict):
        if calibration.column_weights is not None:
            given = check_given(calibration.column_weights, shapes)
            record = {"text": "column_weights", "digest": given_digest(given)}
            statistics = Statistics(given, self.name, calibration.damping)
        else:  # every torchrun rank tokenizes and runs the calibration itself: nothing to share
            statistics = calibrator_for(model, calibration, self.covariance)
            record = dict(statistics.record)
        if self.covariance:
            record["lambda"] = float(calibration.damping)
        return record, statistics

    def plan_statistics(self, model, record: dict | None, shapes: dict, data: PlanData):
        if isinstance(record, dict) and record.get("text") == "column_weights":
            if data.column_weights is None:
                raise BitallocError(
                    "this plan was made from given column_weights (h): give the same ones again "
                    "(column_weights=...) to rebuild its decomposition"
                )
            checked = check_given(data.column_weights, shapes, record.get("digest"))
            found = {name: checked[name] for name in shapes if shapes[name] is not None}
            return Statistics(found, self.name, self.damping(record))
        if data.column_weights is not None:
            raise BitallocError("this plan was calibrated on data, not on given column_weights: drop them")
        return recalibrator(model, self.covariance, record, text=data.text, input_ids=data.input_ids)

    def damping(self, record: dict | None) -> float:
        if not self.covariance:
            return 0.0
        lam = (record or {}).get("lambda")
        if not isinstance(lam, (int, float)) or isinstance(lam, bool):
            raise BitallocError(f"this {self.name} plan does not record its damping (calibration.lambda)")
        return float(lam)


_REGISTRY: dict[str, Objective] = {}


def register(objective: Objective) -> Objective:
    """Make ``objective`` known by its name (profile, plan, apply, eval, report); returns it."""
    if not isinstance(objective, Objective):
        raise TypeError(f"expected an Objective, got {type(objective).__name__}")
    if objective.name in ("auto", None) or not isinstance(objective.name, str):
        raise ValueError(f"{objective.name!r} cannot name an objective")
    _REGISTRY[objective.name] = objective
    return objective


def unregister(name: str) -> None:
    """Forget a registered objective (tests that add a toy one remove it again)."""
    _REGISTRY.pop(name, None)


def get_objective(name: str) -> Objective:
    """The registered objective ``name``; BitallocError naming the known ones otherwise."""
    objective = _REGISTRY.get(name) if isinstance(name, str) else None
    if objective is None:
        raise BitallocError(f"unknown objective {name!r}: expected {', '.join(_REGISTRY)}")
    return objective


def objective_names() -> tuple[str, ...]:
    """The registered objectives' names, in registration order."""
    return tuple(_REGISTRY)


class _Attribute(Mapping):
    """A live, read-only view {objective name: one attribute}."""

    def __init__(self, attribute: str) -> None:
        self.attribute = attribute

    def __getitem__(self, name: str):
        if name not in _REGISTRY:
            raise KeyError(name)
        return getattr(_REGISTRY[name], self.attribute)

    def __iter__(self) -> Iterator[str]:
        return iter(list(_REGISTRY))

    def __len__(self) -> int:
        return len(_REGISTRY)


OBJECTIVE_COLUMNS: Mapping[str, str] = _Attribute("column")  # objective -> the column the planner minimizes
OBJECTIVE_LABELS: Mapping[str, str] = _Attribute("label")  # objective -> its figures' error axis label

WEIGHT = register(Objective("weight"))
ACTIVATION = register(
    Calibrated("activation", label=f"{ERROR_LABEL}\nΣ ‖(W − Q − BA)·diag(√h)‖²_F  (squared output units)")
)
OUTPUT = register(
    Calibrated(
        "output",
        label=f"{ERROR_LABEL}\nΣ ‖(W − Q − BA)·L‖²_F, L·Lᵀ = H + λI  (squared output units)",
        covariance=True,
    )
)


def resolve_objective(model, calibration: CalibrationSettings) -> Objective:
    """The objective of a profile. A registered name is checked against the data given;
    None: output when calibration text or ids are given, activation when h itself is, else
    weight; "auto": also output whenever the model can be run on text."""
    name = calibration.objective
    if name not in (None, "auto"):
        if name not in _REGISTRY:
            raise BitallocError(f"unknown objective {name!r}: expected {', '.join(_REGISTRY)} or auto")
        objective = _REGISTRY[name]
    elif calibration.column_weights is not None:
        objective = ACTIVATION
    elif calibration.given:
        objective = OUTPUT
    else:
        return OUTPUT if name == "auto" and can_run(model) else WEIGHT
    # checked before the profile writes anything, so a failed start leaves nothing behind
    objective.check(model, calibration)
    return objective


def statistics_for_plan(
    model,
    objective: str,
    record: dict | None,
    shapes: dict[str, tuple[int, int]],
    *,
    text: str | os.PathLike | None = None,
    input_ids: torch.Tensor | None = None,
    column_weights: dict | None = None,
) -> Calibrator | Statistics | None:
    """How `apply` and `eval` get a plan's statistics again: None (weight plan), the given
    h checked against the plan (a plan made from given ``column_weights``), or the
    `Calibrator` that computes them block by block. ``shapes``: the planned matrices."""
    data = PlanData(text, input_ids, column_weights)
    return get_objective(objective).plan_statistics(model, record, shapes, data)


def load_input_statistics(
    profile_table_or_path,
    model=None,
    *,
    text: str | os.PathLike | None = None,
    input_ids: torch.Tensor | None = None,
    column_weights: dict | None = None,
    quiet: bool = True,
) -> Statistics:
    """Every statistic a data-aware profile's decompositions were weighted with, computed
    again in memory (for small models: SmolLM2's H take 400 MB) from the profile's record:
    ``model`` (default: the profile's recorded source), its calibration ``text`` if moved,
    or the same ``input_ids``/``column_weights`` given again (checked by sha256)."""
    import pandas as pd

    from .table import read_profile

    table = profile_table_or_path
    if not isinstance(table, pd.DataFrame):
        table = read_profile(table)
    attrs = table.attrs
    objective = _REGISTRY.get(attrs.get("objective"))
    if objective is None or not objective.data_aware:
        raise BitallocError("the profile is not data-aware: it has no calibration")
    model = attrs.get("source") if model is None else model
    modules = list(dict.fromkeys(table["module"]))
    shapes = {
        m: tuple(int(x) for x in str(shape).split("x")) for m, shape in zip(table["module"], table["shape"])
    }
    record = attrs.get("calibration")
    found = objective.plan_statistics(model, record, shapes, PlanData(text, input_ids, column_weights))
    if isinstance(found, Calibrator):
        found = found.statistics(model, modules, quiet=quiet)
    return Statistics(found, objective.name, float((record or {}).get("lambda", DAMPING)))


def weighting(statistics, module: str, damping: float | None = None) -> Weighting:
    """How ``module``'s decomposition is weighted by ``statistics``: a `Statistics` (its
    objective's weighting, λ its own unless ``damping``), a mapping of tensors or a tensor
    (h: 1-D, diagonal; H: 2-D, whitened with ``damping``, by default 0.01); the identity for
    None."""
    if statistics is None:
        return IDENTITY
    if isinstance(statistics, Statistics):
        lam = statistics.damping if damping is None else damping
        return get_objective(statistics.objective).weighting(statistics[module], lam)
    statistic = statistics if isinstance(statistics, torch.Tensor) else statistics[module]
    objective = OUTPUT if statistic.dim() == 2 else ACTIVATION  # an untyped tensor: by its shape
    return objective.weighting(statistic, DAMPING if damping is None else damping)
