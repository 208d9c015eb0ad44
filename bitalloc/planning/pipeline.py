"""Planning from a model or a profile file to plan files: what `bitalloc plan` does.

The profile cache (``.bitalloc-cache/`` beside the plan, named by model and settings), the sweep file names
and the default objective ("auto": data-aware whenever the model can be run) live here,
so the Python API reaches the same files as the command line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..checkpoints import model_input_files
from ..errors import BitallocError
from ..fileio import check_output
from ..profiling.profiler import profile
from ..profiling.settings import CalibrationSettings, ProfileSettings, build_settings
from ..profiling.table import profile_metadata, read_profile
from .plan_file import Plan
from .planner import parse_sweep, plan, sweep
from .targets import TargetFormat, check_target, target_settings

DEFAULT_PLAN_FILE = "plan.json"
DEFAULT_OBJECTIVE = "auto"  # `plan MODEL` is data-aware whenever the model can be run


@dataclass(frozen=True)
class PlanConstraints:
    """Solver and constraints of a plan (see `bitalloc.plan`)."""

    solver: str = "cbc"
    count_lora: bool = False
    tie: tuple[str, ...] = ()
    min_bits: int | None = None
    max_bits: int | None = None
    pin: dict[str, str] | None = field(default=None, hash=False)
    keep: tuple[str, ...] = ()
    target: TargetFormat | None = None  # plan in this tool's format (`bitalloc.export.target_format`)

    def as_kwargs(self) -> dict:
        return dict(
            solver=self.solver, count_lora=self.count_lora, tie=tuple(self.tie or ()),
            min_bits=self.min_bits, max_bits=self.max_bits, pin=self.pin, keep=tuple(self.keep or ()),
            target=self.target,
        )  # fmt: skip


@dataclass
class PlanRun:
    """What `plan_files` did: the plans, where each was written, the profile it used."""

    plans: list[Plan]
    paths: list[Path]
    budgets: list[float]
    table: pd.DataFrame
    seconds: float  # solving time


def budget_label(budget: float) -> str:
    """The budget as a file name shows it: short (``2.5``, ``3``) when that reads back as the
    same number, else exact (``2.1234567``: ``{:g}`` would show ``2.12346`` for several
    budgets), so distinct budgets never share a file."""
    short = f"{budget:g}"
    return short if float(short) == budget else repr(float(budget))


def sweep_path(output: str | os.PathLike, budget: float) -> Path:
    """``plan.json`` and budget 2.5 -> ``plan-2.5.json`` (see `budget_label`)."""
    output = Path(output)
    return output.with_name(f"{output.stem}-{budget_label(budget)}{output.suffix}")


CACHE_FOLDER = ".bitalloc-cache"


def model_identity(model) -> dict:
    """What identifies a model on disk for the profile cache: its resolved path and the
    (size, mtime) of the files its weights and config are read from. Cheap (no weight is
    read); a copy, a move or an edit gives another identity, hence a fresh profile, and the
    profile itself still checks every weight digest when it reuses its table."""
    from ..checkpoints import demo_model_path
    from ..checkpoints.safetensors import checkpoint_files

    path = Path(demo_model_path() if model is None else model).resolve()
    try:
        files = checkpoint_files(path) if path.is_dir() or path.suffix == ".safetensors" else [path]
    except BitallocError:
        files = []  # not a model: the profile says why
    folder = path if path.is_dir() else path.parent
    files += [folder / "config.json"] if (folder / "config.json").is_file() and path.suffix != ".gguf" else []
    stats = {}
    for file in files:
        with contextlib.suppress(OSError):
            st = file.stat()
            stats[str(file.resolve())] = [st.st_size, st.st_mtime_ns]
    return {"model": str(path), "files": stats}


def profile_cache_path(
    output: str | os.PathLike, model, settings: ProfileSettings, calibration: CalibrationSettings
) -> Path:
    """Where `plan MODEL` caches its profile: ``.bitalloc-cache/profile-<key>.parquet`` in the
    plan's folder, the key a digest of the model's identity (`model_identity`) and every
    profile setting. Any plan of the same model and settings, whatever its name or budget,
    reuses (or resumes) that profile; another model or setting gets its own. Nothing is
    written into the model's folder unless the plan is."""
    key = {
        "bits": list(settings.bits), "block_sizes": list(settings.block_sizes),
        "methods": list(settings.methods), "scales": list(settings.scales),
        "configs": None if settings.configs is None else list(settings.configs),
        "rank": settings.rank, "iters": settings.iters, "lowrank": settings.lowrank,
        "device": settings.device,
        "include": None if settings.include is None else list(settings.include),
        "exclude": None if settings.exclude is None else list(settings.exclude),
        "objective": calibration.objective,
        "calibration": None if calibration.text is None else str(calibration.text),
        "calibration_tokens": calibration.tokens,
        "auto": "output",  # what auto and data without an objective mean since plan format v2
    }  # fmt: skip
    defaults = CalibrationSettings()
    for name in ("damping", "layer_weights", "layer_tokens"):
        if getattr(calibration, name) != getattr(defaults, name):
            key[name] = getattr(calibration, name)
    if isinstance(model, torch.nn.Module):
        raise BitallocError("plan_files profiles models on disk; for an nn.Module call profile() then plan()")
    key["model"] = model_identity(model)
    if calibration.text is not None and Path(calibration.text).is_file():
        st = Path(calibration.text).stat()
        key["calibration_file"] = [str(Path(calibration.text).resolve()), st.st_size, st.st_mtime_ns]
    if calibration.context != CalibrationSettings().context:
        key["calibration_context"] = calibration.context
    if calibration.input_ids is not None:
        key["calibration_ids"] = hashlib.sha256(calibration.input_ids.numpy().tobytes()).hexdigest()
    if calibration.column_weights is not None:
        raise BitallocError("plan_files takes calibration text or ids; for given statistics call profile()")
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(output).parent / CACHE_FOLDER / f"profile-{digest}.parquet"


def _sweep_budgets(budget: float | None, budgets: str | list[float] | None) -> list | None:
    """The sweep's budgets (None for a single budget); BitallocError for neither, both, an
    empty sweep or a budget given twice (each budget writes one plan file)."""
    if budget is None and budgets is None:
        raise BitallocError("give a budget (e.g. --budget 2.5) or a sweep (--sweep START:STOP:STEP)")
    if budget is not None and budgets is not None:
        raise BitallocError("give a budget or a sweep, not both")
    sweep_budgets = parse_sweep(budgets) if isinstance(budgets, str) else budgets
    if sweep_budgets is not None and not sweep_budgets:
        raise BitallocError("no budgets to sweep")
    if sweep_budgets is not None:
        seen: set[float] = set()
        for value in sweep_budgets:
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                break  # `sweep` names the bad value
            if float(value) in seen:
                raise BitallocError(f"budget {value:g} is given twice: each budget writes one plan file")
            seen.add(float(value))
    return sweep_budgets


# shape: the public API's keyword arguments (the CLI's `plan` options), all keyword-only
def plan_files(
    model: str | os.PathLike | None = None,
    *,
    profile_path: str | os.PathLike | None = None,
    budget: float | None = None,
    budgets: str | list[float] | None = None,
    output: str | os.PathLike = DEFAULT_PLAN_FILE,
    settings: ProfileSettings | None = None,
    calibration: CalibrationSettings | str | os.PathLike | None = None,
    constraints: PlanConstraints | None = None,
    quiet: bool = False,
    **options,
) -> PlanRun:
    """Plan ``model`` (profiled first, cached in ``.bitalloc-cache/`` beside ``output`` for
    any plan of the same model and settings: `profile_cache_path`; None: the demo model) or
    the profile at ``profile_path`` for ``budget``, or for each of ``budgets`` (a list or
    "START:STOP:STEP"; files ``OUTPUT-<budget>.json``), and save the plans (self-contained:
    a data-aware plan records its calibration data, no side file). Profile
    ``settings``/``calibration``/keyword ``options`` apply to a model, and are refused
    with a profile file (it was measured with its own settings). With ``constraints.target``
    (`bitalloc.planning.targets.TargetFormat`) a model is profiled on the target's grid (or the
    given ``configs``, each one it stores exactly) with LoRA rank 0 unless a rank is given, and
    the plan is made in the target's format and storage (`bitalloc.plan`)."""
    sweep_budgets = _sweep_budgets(budget, budgets)
    constraints = constraints or PlanConstraints()
    target = check_target(constraints.target)
    if target is not None and constraints.count_lora:  # before any profiling
        raise BitallocError(
            f"a plan in {target.name}'s storage cannot count LoRA factors: {target.name} does not store them"
        )
    paths = [Path(output)] if sweep_budgets is None else [sweep_path(output, b) for b in sweep_budgets]
    text = calibration.text if isinstance(calibration, CalibrationSettings) else calibration
    inputs = [profile_path, *model_input_files(model), text]
    for path in paths:  # before any work: no output may be an input, or anything but a file
        check_output(path, inputs)
    if profile_path is not None:
        if model is not None:
            raise BitallocError("give a MODEL or a profile file, not both")
        if settings is not None or calibration is not None or options:
            given = ", ".join(sorted(options)) or "profile settings"
            raise BitallocError(
                f"a profile file was given, so profile settings ({given}) do not apply: "
                "drop them, or plan from the model to profile it with them"
            )
        table = read_profile(profile_path)
    else:
        if target is not None and settings is None and "rank" not in options:
            options = {**options, "rank": 0}  # the target stores no LoRA correction: plan without one
        settings, calibration = build_settings(
            settings, calibration, options, default_objective=DEFAULT_OBJECTIVE
        )
        if target is not None:
            settings = target_settings(target, settings)
        cache = profile_cache_path(output, model, settings, calibration)
        table = profile(model, cache, settings, calibration, quiet=quiet)
    start = time.perf_counter()
    source = profile_metadata(table).source
    if sweep_budgets is None:
        plans = [plan(table, budget, source=source, **constraints.as_kwargs())]
        used = [float(budget)]
    else:
        plans = sweep(table, sweep_budgets, source=source, **constraints.as_kwargs())
        used = list(sweep_budgets)
    seconds = time.perf_counter() - start
    for result, path in zip(plans, paths):
        result.save(path)
    return PlanRun(plans, paths, used, table, seconds)
