"""`export`: one plan, one target tool, one file (and what had to be approximated on the way)."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..errors import BitallocError
from ..fileio import write_text_atomic
from . import autoround, compressed_tensors, gptqmodel, hqq, llamacpp, torchao
from ._common import PlanLike, Translation, json_text, read_plan
from ._plan import TargetFormat

Translate = Callable[..., Translation]  # translate(plan, **options) -> Translation

# target -> (translate, the keyword options it takes), in registration order
_TRANSLATORS: dict[str, tuple[Translate, tuple[str, ...]]] = {}
_EXACT: dict[str, TargetFormat | None] = {}  # target -> the configs it stores exactly (None: none declared)


def register_target(name: str, translate: Translate, exact: TargetFormat | None = None) -> None:
    """Make ``name`` an export target: ``translate(plan, **options)`` gets a validated `Plan` and
    returns a `Translation`; its keyword parameters after the plan are the target's options.
    ``exact`` declares the configs the target stores exactly and its storage accounting (a
    `TargetFormat` named ``name``), which ``plan --target NAME`` plans in; None: none yet.
    BitallocError if the name is taken."""
    if not isinstance(name, str) or not name or name in _TRANSLATORS:
        raise BitallocError(f"cannot register export target {name!r}: a new, non-empty name is needed")
    if not callable(translate):
        raise BitallocError(f"export target {name!r}: translate must be callable")
    if exact is not None and (not isinstance(exact, TargetFormat) or exact.name != name):
        raise BitallocError(f"export target {name!r}: exact must be a TargetFormat named {name!r}")
    parameters = list(inspect.signature(translate).parameters.values())[1:]
    _TRANSLATORS[name] = (translate, tuple(p.name for p in parameters))
    _EXACT[name] = exact


def target_format(name: str) -> TargetFormat:
    """The exact grid and storage accounting of export target ``name``, for ``plan --target``;
    BitallocError (one line) for an unknown target or one that declares none."""
    if name not in _TRANSLATORS:
        raise BitallocError(f"unknown target {name!r}: expected one of {', '.join(_TRANSLATORS)}")
    exact = _EXACT[name]
    if exact is None:
        exact_ones = ", ".join(key for key, value in _EXACT.items() if value is not None)
        raise BitallocError(
            f"plans for {name} are not yet exact: it declares no configs it stores exactly (plan without "
            f"--target and export --to {name}, which approximates and says so; exact: {exact_ones})"
        )
    return exact


def exact_targets() -> tuple[str, ...]:
    """The export targets that declare an exact grid (``plan --target`` takes them)."""
    return tuple(name for name, exact in _EXACT.items() if exact is not None)


def targets() -> tuple[str, ...]:
    """The registered export targets, in registration order."""
    return tuple(_TRANSLATORS)


for _module in (gptqmodel, autoround, llamacpp, compressed_tensors, torchao, hqq):
    register_target(_module.TARGET, _module.translate, getattr(_module, "EXACT", None))
TARGETS = targets()  # the package's own targets; `targets()` also lists ones registered later


@dataclass(frozen=True)
class ExportResult:
    """An exported config: the file's exact ``text``, ``notes`` (approximations, budget re-check, LoRA
    warning), the bits/param the target really stores (``target_bits``) and where it was written."""

    target: str
    text: str
    notes: list[str]
    target_bits: float
    path: Path | None = None


def export(
    plan: PlanLike,
    target: str,
    output: str | os.PathLike | None = None,
    **options: object,
) -> ExportResult:
    """Translate ``plan`` for ``target`` (one of `targets()`); write it atomically to ``output`` if given.

    Dict targets give indented JSON, llamacpp the tensor-type file. Options: ``imatrix`` (llamacpp),
    ``per_module`` (hqq). Bad input raises BitallocError with one line.
    """
    if target not in _TRANSLATORS:
        raise BitallocError(f"unknown export target {target!r}: expected one of {', '.join(_TRANSLATORS)}")
    translate, allowed = _TRANSLATORS[target]
    # an option left at its default (False/None) is no request: the CLI passes every flag to every target
    options = {key: value for key, value in options.items() if key in allowed or value not in (None, False)}
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"takes only {', '.join(allowed)}" if allowed else "takes no options"
        raise BitallocError(f"export to {target} {takes}, not {', '.join(unknown)}")
    if output is not None and isinstance(plan, (str, os.PathLike)) and _same_file(plan, output):
        raise BitallocError(f"output {str(output)!r} is the input plan: choose another file")
    translation = translate(read_plan(plan), **options)
    payload = translation.payload
    text = payload if isinstance(payload, str) else json_text(payload)
    path = None
    if output is not None:
        path = Path(output)
        try:
            write_text_atomic(path, text)
        except OSError as exc:
            raise BitallocError(f"cannot write {str(path)!r}: {exc}") from None
    return ExportResult(target, text, list(translation.notes), translation.target_bits, path)


def _same_file(first: str | os.PathLike, second: str | os.PathLike) -> bool:
    """Whether two paths name the same file (links and relative paths resolved)."""
    try:
        if os.path.exists(first) and os.path.exists(second):
            return os.path.samefile(first, second)
    except OSError:
        pass
    return Path(first).resolve() == Path(second).resolve()
