"""The report's files: reading its inputs (a profile table, plans, eval results, told apart
by their content) and its output folder, written beside its final place and renamed into
it. An existing non-empty folder is replaced only if an earlier `report` wrote it (its mark
lists what it wrote), and never when it holds an input."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BitallocError
from ..planning.plan_file import PLAN_FORMAT, Plan
from .fidelity import EVAL_FORMAT

MARKER = ".bitalloc-report"  # in every folder `report` wrote: it may be replaced by another report
MARKER_FORMAT = "bitalloc.report/v1"


@dataclass
class ReportInputs:
    """What a report is drawn from."""

    profile: object | None = None  # pandas DataFrame
    profile_path: Path | None = None
    plans: list[tuple[Path, Plan]] = field(default_factory=list)
    evals: list[tuple[Path, dict]] = field(default_factory=list)


class _NonFinite(ValueError):
    """A NaN or infinity in an input JSON file (no figure or CSV may carry one)."""


def _non_finite(name: str):
    raise _NonFinite(name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise _NonFinite(text)
    return value


def read_inputs(inputs: Sequence[str | os.PathLike]) -> ReportInputs:
    from ..profiling.table import read_profile

    found = ReportInputs()
    if not inputs:
        raise BitallocError("nothing to report: give a profile table, plans or eval results")
    for item in inputs:
        path = Path(item)
        if not path.is_file():
            raise BitallocError(f"report input not found: {path}")
        if path.suffix in (".parquet", ".csv"):
            if found.profile is not None:
                raise BitallocError(f"one profile per report: got {found.profile_path} and {path}")
            found.profile, found.profile_path = read_profile(path), path
            continue
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text, parse_constant=_non_finite, parse_float=_finite)
        except _NonFinite as exc:
            raise BitallocError(
                f"{path} holds a non-finite number ({exc}): bitalloc writes finite values only; "
                "was it edited by hand? run `bitalloc eval` again"
            ) from None
        except (OSError, UnicodeDecodeError, ValueError):
            data = None
        kind = data.get("format") if isinstance(data, dict) else None
        if kind == PLAN_FORMAT:
            found.plans.append((path, Plan.load(path)))
        elif kind == EVAL_FORMAT:
            found.evals.append((path, data))
        else:
            raise BitallocError(
                f"{path} is not a profile table (.parquet/.csv), a plan or a `bitalloc eval` result"
            )
    return found


def check_output(folder: Path, inputs: list[Path]) -> None:
    if folder.exists() and not folder.is_dir():
        raise BitallocError(f"output {folder} exists and is not a folder")
    where = folder.resolve()
    for path in inputs:
        if where == path.resolve() or where in path.resolve().parents:
            raise BitallocError(f"input {path} is inside the output folder {folder}: choose another -o")
    if folder.is_dir() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise BitallocError(
            f"output folder {folder} is not empty and was not written by `bitalloc report`: "
            "choose another -o or empty it"
        )
    if folder.is_dir() and (folder / MARKER).is_file():
        ours = report_files(folder)
        for entry in sorted(folder.rglob("*")):
            name = str(entry.relative_to(folder))
            if name not in ours:
                raise BitallocError(
                    f"output folder {folder} holds {name}, which `bitalloc report` did not write: "
                    "a report replaces its whole folder, so move that away or choose another -o"
                )


def report_files(folder: Path) -> set[str]:
    """What the report in ``folder`` wrote, as its mark lists it (a report from before the
    list: its PNG, CSV and README files); only these may be replaced by another report."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        marker = None
    files = marker.get("files") if isinstance(marker, dict) else None
    if isinstance(files, list) and all(isinstance(f, str) for f in files):
        return {*files, MARKER}
    return {MARKER, "README.md"} | {
        e.name for e in folder.iterdir() if e.is_file() and e.suffix in (".png", ".csv")
    }


def mark(folder: Path) -> None:
    """List what ``folder`` holds in its mark: the next report may replace these."""
    written = sorted(entry.name for entry in folder.iterdir())
    marker = {"format": MARKER_FORMAT, "files": written}
    (folder / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")


def replace_folder(temp: Path, folder: Path) -> None:
    """Rename ``temp`` to ``folder``; an old report there is moved aside first, then deleted."""
    if not folder.exists():
        os.replace(temp, folder)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".old", dir=folder.parent))
    old.rmdir()
    os.replace(folder, old)
    try:
        os.replace(temp, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_rows(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()}
            )
