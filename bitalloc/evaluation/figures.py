"""Report figures: the budget frontier, the chosen configs per layer, error vs bits, eval results.

`report(inputs, output)` reads one profile table, any number of plans and `bitalloc eval`
results (told apart by their content), and writes into the folder ``output`` a PNG per
figure, the data behind each (CSV) and a README.md naming them:

- ``frontier``: budget -> total objective of the ILP plans (a sweep over the achievable
  range), each uniform config and the LoftQ paper's mix (first k layers at the higher
  config, the rest at the lower one, every k), and the given plans;
- ``heatmap-<plan>``: the chosen bits (colour) and block size (text) per layer × matrix
  type, one per plan (without plans: the sweep's plan at the middle budget);
- ``error-vs-bits``: relative error of LoftQ (and of plain quantization, QLoRA's start)
  per matrix type against exact storage bits per parameter;
- ``eval`` (with eval results): perplexity, KL to the original and top-1 agreement (or
  embedding cosine for encoders) against the plan's bits.

Drawn with matplotlib (the ``report`` extra), Agg canvas, loaded only when `report` runs.
The folder is written beside its final place and renamed into it; an existing non-empty
folder is replaced only if an earlier `report` wrote it, and never when it holds an input.

This module puts a report together; `report_folder` reads the inputs and owns the output
folder, `report_rows` computes the data behind each figure and `plots` draws it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BitallocError
from ..fileio import check_name
from ..profiling.objectives import OBJECTIVE_LABELS  # objective -> its error axis label
from . import plots
from .plots import source_name
from .report_folder import ReportInputs, check_output, mark, read_inputs, replace_folder, save_rows
from .report_rows import FRONTIER_POINTS, error_rows, eval_rows, frontier_rows, heatmap_rows

DEFAULT_OUTPUT = "report"  # the folder `bitalloc report` writes


@dataclass
class ReportFiles:
    """What `report` wrote: the folder, and each figure's PNG and data file by figure name."""

    folder: Path
    figures: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def report(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    points: int = FRONTIER_POINTS,
) -> ReportFiles:
    """Write the figures of a profile table, plans and eval results (any order) to ``output``
    (default ``report/``): PNGs, their data (CSV) and README.md. See the module docstring."""
    figure_class = plots.figure_class()
    found = read_inputs(inputs)
    folder = check_name(output if output is not None else DEFAULT_OUTPUT)
    check_output(folder, [Path(p) for p in inputs])
    if points < 2:
        raise BitallocError(f"the frontier needs at least 2 budgets, got {points}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        files = ReportFiles(folder)
        _draw_all(figure_class, found, temp, files, points)
        (temp / "README.md").write_text(_readme(found, files), encoding="utf-8")
        mark(temp)
        os.chmod(temp, 0o755)  # mkdtemp makes it private
        replace_folder(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    files.figures = {
        name: (folder / png.name, folder / data.name) for name, (png, data) in files.figures.items()
    }
    return files


def _draw_all(figure_class, found: ReportInputs, folder: Path, files: ReportFiles, points: int) -> None:
    table = found.profile
    plans = list(found.plans)
    if table is not None:
        rows, sweep_plans = frontier_rows(table, plans, points)
        save_rows(folder / "frontier.csv", rows)
        figure = plots.draw_frontier(figure_class, rows, table, _objective_label(table))
        plots.save_figure(figure, folder / "frontier.png")
        files.figures["frontier"] = (folder / "frontier.png", folder / "frontier.csv")
        if not plans:
            middle = sweep_plans[len(sweep_plans) // 2]
            plans = [(Path(f"ilp-{middle.target_bits:.4g}.json"), middle)]
            files.notes.append(
                f"no plan given: the heatmap shows the sweep's plan at {middle.target_bits:.4g} bits"
            )
        rows = error_rows(table)
        save_rows(folder / "error-vs-bits.csv", rows)
        plots.save_figure(plots.draw_errors(figure_class, rows, table), folder / "error-vs-bits.png")
        files.figures["error-vs-bits"] = (folder / "error-vs-bits.png", folder / "error-vs-bits.csv")
    stems: set[str] = set()
    for path, plan in plans:
        stem = _unique(re.sub(r"[^\w.+-]", "_", path.stem), stems)
        rows = heatmap_rows(plan)
        name = f"heatmap-{stem}"
        save_rows(folder / f"{name}.csv", rows)
        plots.save_figure(plots.draw_heatmap(figure_class, rows, plan, path.name), folder / f"{name}.png")
        files.figures[name] = (folder / f"{name}.png", folder / f"{name}.csv")
    if found.evals:
        rows = eval_rows(found.evals)
        save_rows(folder / "eval.csv", rows)
        for kind, name in (("causal-lm", "eval"), ("encoder", "eval-embeddings")):
            kind_rows = [r for r in rows if r["kind"] == kind]
            if kind_rows:
                plots.save_figure(plots.draw_eval(figure_class, kind_rows, kind), folder / f"{name}.png")
                files.figures[name] = (folder / f"{name}.png", folder / "eval.csv")


def _objective_label(table) -> str:
    """The frontier's y axis: the total of the profile's objective."""
    return OBJECTIVE_LABELS.get(table.attrs.get("objective") or "weight", "total error, log scale")


def _readme(found: ReportInputs, files: ReportFiles) -> str:
    lines = ["# bitalloc report", ""]
    if found.profile_path is not None:
        table = found.profile
        lines.append(
            f"Profile `{found.profile_path.name}`: {source_name(table.attrs.get('source'))}, "
            f"{table['module'].nunique()} matrices × {table['config'].nunique()} configs, "
            f"objective {table.attrs.get('objective') or 'weight'}."
        )
    if found.plans:
        lines.append("Plans: " + ", ".join(f"`{p.name}`" for p, _ in found.plans) + ".")
    if found.evals:
        lines.append("Evaluations: " + ", ".join(f"`{p.name}`" for p, _ in found.evals) + ".")
    lines += [f"Note: {note}." for note in files.notes]
    lines.append("")
    about = {
        "frontier": "Total objective of the ILP plan for budgets across the achievable range, against "
        "every uniform config and every k of the LoftQ paper's mix (first k layers at the higher "
        "config, the rest at the lower one); stars are the given plans.",
        "error-vs-bits": "Relative error ‖W − Q − BA‖_F/‖W‖_F of LoftQ (solid) and of plain quantization "
        "(dashed, QLoRA's start) per matrix type, pooled over the layers, against each config's exact "
        "bits per parameter.",
        "eval": "Perplexity, KL divergence from the original's next-token distribution (mean; dashed: 99th "
        "percentile) and top-1 agreement of the LoftQ and QLoRA starts against the plan's bits.",
        "eval-embeddings": "Cosine similarity of mean-pooled sentence embeddings to the original's.",
    }
    for name, (png, data) in files.figures.items():
        title = name.replace("-", " ")
        text = about.get(name)
        if name.startswith("heatmap-"):
            text = (
                f"Bits (colour) and block size (text) chosen per layer and matrix type for "
                f"`{name.removeprefix('heatmap-')}`."
            )
        lines += [
            f"## {title}",
            "",
            f"![{name}]({png.name})",
            "",
            text or "",
            "",
            f"Figure: `{png.name}` · data: `{data.name}`",
            "",
        ]
    return "\n".join(lines)


def _unique(stem: str, seen: set[str]) -> str:
    name, i = stem, 2
    while name in seen:
        name, i = f"{stem}-{i}", i + 1
    seen.add(name)
    return name
