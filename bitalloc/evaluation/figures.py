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
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import BitallocError
from ..fileio import check_name
from ..names import natural_key
from ..planning.plan_file import PLAN_FORMAT, Plan
from ..profiling.objectives import OBJECTIVE_LABELS  # objective -> its error axis label
from ..quant import QuantConfig
from .fidelity import EVAL_FORMAT, VARIANTS

DEFAULT_OUTPUT = "report"  # the folder `bitalloc report` writes
MARKER = ".bitalloc-report"  # in every folder `report` wrote: it may be replaced by another report
FRONTIER_POINTS = 25  # budgets in the frontier sweep, evenly spaced over the achievable range
FRONTIER_SOLVER = "dp"  # exact, and fast for many budgets
LOFTQ_MIX = ("nf4-b64-s8b256", "nf2-b64-s8b256")  # the LoftQ paper's mix: first k layers high, rest low
UNIFORM_BUDGET = 64.0  # bits/param: every uniform config fits
DPI = 120
BITS_LABEL = "bits per parameter (exact storage, LoRA not counted)"
VARIANT_STYLE = {
    "original": {"color": "black", "linestyle": ":", "label": "original"},
    "loftq": {"color": "tab:blue", "marker": "o", "label": "LoftQ start (Q + BA)"},
    "qlora": {"color": "tab:red", "marker": "s", "label": "QLoRA start (Q, no LoRA)"},
}


@dataclass
class ReportFiles:
    """What `report` wrote: the folder, and each figure's PNG and data file by figure name."""

    folder: Path
    figures: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class _Inputs:
    profile: object | None = None  # pandas DataFrame
    profile_path: Path | None = None
    plans: list[tuple[Path, Plan]] = field(default_factory=list)
    evals: list[tuple[Path, dict]] = field(default_factory=list)


def report(
    inputs: Sequence[str | os.PathLike],
    output: str | os.PathLike | None = None,
    *,
    points: int = FRONTIER_POINTS,
) -> ReportFiles:
    """Write the figures of a profile table, plans and eval results (any order) to ``output``
    (default ``report/``): PNGs, their data (CSV) and README.md. See the module docstring."""
    figure_class = _figure_class()
    found = _read_inputs(inputs)
    folder = check_name(output if output is not None else DEFAULT_OUTPUT)
    _check_output(folder, [Path(p) for p in inputs])
    if points < 2:
        raise BitallocError(f"the frontier needs at least 2 budgets, got {points}")
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=folder.parent))
    try:
        files = ReportFiles(folder)
        _draw_all(figure_class, found, temp, files, points)
        (temp / "README.md").write_text(_readme(found, files), encoding="utf-8")
        written = sorted(entry.name for entry in temp.iterdir())  # the next report may replace these
        marker = {"format": "bitalloc.report/v1", "files": written}
        (temp / MARKER).write_text(json.dumps(marker) + "\n", encoding="utf-8")
        os.chmod(temp, 0o755)  # mkdtemp makes it private
        _replace(temp, folder)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    files.figures = {
        name: (folder / png.name, folder / data.name) for name, (png, data) in files.figures.items()
    }
    return files


# ---- inputs and the output folder ---------------------------------------------------------


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BitallocError(
            "bitalloc report draws with matplotlib, which is not installed: pip install 'bitalloc[report]'"
        ) from None
    return Figure


class _NonFinite(ValueError):
    """A NaN or infinity in an input JSON file (no figure or CSV may carry one)."""


def _non_finite(name: str):
    raise _NonFinite(name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise _NonFinite(text)
    return value


def _read_inputs(inputs: Sequence[str | os.PathLike]) -> _Inputs:
    from ..profiling.table import read_profile

    found = _Inputs()
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


def _check_output(folder: Path, inputs: list[Path]) -> None:
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
        ours = _report_files(folder)
        for entry in sorted(folder.rglob("*")):
            name = str(entry.relative_to(folder))
            if name not in ours:
                raise BitallocError(
                    f"output folder {folder} holds {name}, which `bitalloc report` did not write: "
                    "a report replaces its whole folder, so move that away or choose another -o"
                )


def _report_files(folder: Path) -> set[str]:
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


def _replace(temp: Path, folder: Path) -> None:
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


# ---- figures ------------------------------------------------------------------------------


def _draw_all(figure_class, found: _Inputs, folder: Path, files: ReportFiles, points: int) -> None:
    table = found.profile
    plans = list(found.plans)
    if table is not None:
        rows, sweep_plans = frontier_rows(table, plans, points)
        _save_rows(folder / "frontier.csv", rows)
        _save_figure(_draw_frontier(figure_class, rows, table), folder / "frontier.png")
        files.figures["frontier"] = (folder / "frontier.png", folder / "frontier.csv")
        if not plans:
            middle = sweep_plans[len(sweep_plans) // 2]
            plans = [(Path(f"ilp-{middle.target_bits:.4g}.json"), middle)]
            files.notes.append(
                f"no plan given: the heatmap shows the sweep's plan at {middle.target_bits:.4g} bits"
            )
        rows = error_rows(table)
        _save_rows(folder / "error-vs-bits.csv", rows)
        _save_figure(_draw_errors(figure_class, rows, table), folder / "error-vs-bits.png")
        files.figures["error-vs-bits"] = (folder / "error-vs-bits.png", folder / "error-vs-bits.csv")
    stems: set[str] = set()
    for path, plan in plans:
        stem = _unique(re.sub(r"[^\w.+-]", "_", path.stem), stems)
        rows = heatmap_rows(plan)
        name = f"heatmap-{stem}"
        _save_rows(folder / f"{name}.csv", rows)
        _save_figure(_draw_heatmap(figure_class, rows, plan, path.name), folder / f"{name}.png")
        files.figures[name] = (folder / f"{name}.png", folder / f"{name}.csv")
    if found.evals:
        rows = eval_rows(found.evals)
        _save_rows(folder / "eval.csv", rows)
        for kind, name in (("causal-lm", "eval"), ("encoder", "eval-embeddings")):
            kind_rows = [r for r in rows if r["kind"] == kind]
            if kind_rows:
                _save_figure(_draw_eval(figure_class, kind_rows, kind), folder / f"{name}.png")
                files.figures[name] = (folder / f"{name}.png", folder / "eval.csv")


def frontier_rows(table, plans: Iterable[tuple[Path, Plan]] = (), points: int = FRONTIER_POINTS):
    """(rows, sweep plans): the ILP sweep, every uniform config, every k of the LoftQ mix and
    the given plans (those in the profile's objective, LoRA not counted) as
    {series, name, budget, bits_per_param, total_error}."""
    from ..planning.planner import feasible_range, sweep
    from ..planning.report import uniform_baselines

    objective = table.attrs.get("objective") or "weight"
    low, high = feasible_range(table)
    budgets = sorted({float(b) for b in np.linspace(low, high, points)} | {low, high})
    sweep_plans = sweep(table, budgets, solver=FRONTIER_SOLVER)
    rows = [
        _point("ILP plan", f"ILP {b:.4g}", b, p.achieved_bits, p.total_error)
        for b, p in zip(budgets, sweep_plans)
    ]
    for base in sorted(uniform_baselines(table, UNIFORM_BUDGET), key=lambda b: (b.achieved_bits, b.name)):
        rows.append(_point("uniform", base.name, None, base.achieved_bits, base.error))
    mix = _mix_configs(table)
    if mix is not None:
        rows += _first_k_rows(table, *mix, high_budget=high)
    for path, plan in plans:
        if plan.objective == objective and not plan.budget["includes_lora"]:
            rows.append(_point("plan", path.name, plan.target_bits, plan.achieved_bits, plan.total_error))
    return rows, sweep_plans


def _point(series, name, budget, bits, error) -> dict:
    return {"series": series, "name": name, "budget": budget, "bits_per_param": bits, "total_error": error}


def _mix_configs(table) -> tuple[str, str] | None:
    """(high, low) for the LoftQ mix: nf4-b64/nf2-b64 when profiled, else the lowest-bit
    config and the 4-bit (or the highest-bit) one with the same block size and scales."""
    configs = {str(c) for c in table["config"].unique()}
    if set(LOFTQ_MIX) <= configs:
        return LOFTQ_MIX
    parsed = sorted(
        (QuantConfig.parse(c) for c in configs), key=lambda c: (c.bits, abs(c.block_size - 64), str(c))
    )
    low = parsed[0]
    higher = [c for c in parsed if c.bits > low.bits]
    if not higher:
        return None
    alike = [c for c in higher if str(c).split("-", 1)[1] == str(low).split("-", 1)[1]] or higher
    high = next((c for c in alike if c.bits == 4), max(alike, key=lambda c: (c.bits, str(c))))
    return str(high), str(low)


def _first_k_rows(table, high: str, low: str, high_budget: float) -> list[dict]:
    """One point per k: each call finds the largest k that fits, then the budget is put just
    below that mix's bits, so the next call finds the next smaller k."""
    from ..planning.report import first_k_layers_baseline

    rows, budget, seen = [], max(high_budget, UNIFORM_BUDGET), set()
    while budget > 0:
        base = first_k_layers_baseline(table, budget, high=high, low=low)
        if base is None or base.name in seen:
            break
        seen.add(base.name)
        k = int(re.match(r"first (\d+) layers", base.name).group(1))
        rows.append(
            _point("first-k", f"first {k} layers {high}, rest {low}", None, base.achieved_bits, base.error)
        )
        budget = base.achieved_bits - 1e-6
    return sorted(rows, key=lambda r: r["bits_per_param"])


def _draw_frontier(figure_class, rows: list[dict], table):
    objective = table.attrs.get("objective") or "weight"
    figure = figure_class(figsize=(10.5, 5.6), dpi=DPI, layout="constrained")
    ax = figure.subplots()
    ilp = [r for r in rows if r["series"] == "ILP plan"]
    ax.plot(
        [r["bits_per_param"] for r in ilp],
        [r["total_error"] for r in ilp],
        "-o",
        color="tab:blue",
        markersize=4,
        linewidth=2,
        label="ILP plan (sweep of budgets)",
        zorder=3,
    )
    mix = [r for r in rows if r["series"] == "first-k"]
    if mix:
        label = "LoftQ mix: " + mix[0]["name"].split(" layers ", 1)[1].replace(
            ",", " for the first k layers,", 1
        )
        ax.plot(
            [r["bits_per_param"] for r in mix],
            [r["total_error"] for r in mix],
            "--s",
            color="tab:orange",
            markersize=4,
            linewidth=1.2,
            label=label,
            zorder=2,
        )
    uniform = [r for r in rows if r["series"] == "uniform"]
    colors = _colors(len(uniform))
    for color, row in zip(colors, uniform):
        ax.scatter(
            row["bits_per_param"],
            row["total_error"],
            marker="D",
            s=42,
            color=color,
            edgecolor="black",
            linewidth=0.5,
            label=f"uniform {row['name']}",
            zorder=4,
        )
    plans = [r for r in rows if r["series"] == "plan"]
    for i, row in enumerate(plans):
        ax.scatter(
            row["bits_per_param"],
            row["total_error"],
            marker="*",
            s=220,
            color="gold",
            edgecolor="black",
            linewidth=0.8,
            label="given plan (labelled)" if i == 0 else None,
            zorder=5,
        )
        # below and left of the frontier nothing is achievable, so nothing else is drawn there
        ax.annotate(
            row["name"],
            (row["bits_per_param"], row["total_error"]),
            xytext=(-9, -9),
            textcoords="offset points",
            ha="right",
            va="top",
            fontsize=8,
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "0.6", "alpha": 0.9},
            zorder=6,
        )
    ax.set_yscale("log")
    ax.set_xlabel(BITS_LABEL)
    ax.set_ylabel(OBJECTIVE_LABELS.get(objective, "total error, log scale"))
    matrices = table["module"].nunique()
    ax.set_title(
        f"Budget frontier: {_source_name(table.attrs.get('source'))}, {matrices} matrices, "
        f"objective {objective}"
    )
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return figure


def error_rows(table) -> list[dict]:
    """Per matrix type and config: exact bits/param, pooled relative error of LoftQ
    (sqrt(Σ error / Σ ‖W‖²)) and of plain quantization (qlora_error), matrices counted."""
    frame = table[["module", "config", "numel", "storage_bits", "error", "rel_error", "qlora_error"]].copy()
    frame = frame[frame["rel_error"] > 0]
    frame["norm_sq"] = frame["error"] / frame["rel_error"] ** 2
    norms = frame.groupby("module")["norm_sq"].median()
    frame["norm_sq"] = frame["module"].map(norms)
    kinds = matrix_kinds(frame["module"].unique())
    frame["kind"] = frame["module"].map(kinds)
    grouped = frame.groupby(["kind", "config"], sort=False).agg(
        storage_bits=("storage_bits", "sum"),
        numel=("numel", "sum"),
        error=("error", "sum"),
        qlora_error=("qlora_error", "sum"),
        norm_sq=("norm_sq", "sum"),
        matrices=("module", "nunique"),
    )
    order = {
        kind: i for i, kind in enumerate(dict.fromkeys(kinds[m] for m in sorted(kinds, key=natural_key)))
    }
    rows = []
    for (kind, config), g in grouped.iterrows():
        rows.append(
            {
                "kind": kind,
                "config": config,
                "bits_per_param": float(g["storage_bits"]) / float(g["numel"]),
                "rel_error": math.sqrt(g["error"] / g["norm_sq"]),
                "qlora_rel_error": math.sqrt(g["qlora_error"] / g["norm_sq"]),
                "matrices": int(g["matrices"]),
            }
        )
    return sorted(rows, key=lambda r: (order[r["kind"]], r["bits_per_param"], r["config"]))


def _draw_errors(figure_class, rows: list[dict], table):
    figure = figure_class(figsize=(9.5, 5.6), dpi=DPI, layout="constrained")
    ax = figure.subplots()
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for color, kind in zip(_colors(len(kinds)), kinds):
        points = [r for r in rows if r["kind"] == kind]
        best = _envelope(points, "rel_error")
        ax.plot(
            [r["bits_per_param"] for r in best],
            [r["rel_error"] for r in best],
            "-o",
            color=color,
            markersize=4,
            label=kind,
        )
        worse = [r for r in points if r not in best]
        ax.scatter(
            [r["bits_per_param"] for r in worse],
            [r["rel_error"] for r in worse],
            marker="o",
            s=16,
            facecolor="none",
            edgecolor=color,
            linewidth=0.8,
        )
        plain = _envelope(points, "qlora_rel_error")
        ax.plot(
            [r["bits_per_param"] for r in plain],
            [r["qlora_rel_error"] for r in plain],
            "--",
            color=color,
            linewidth=1,
            alpha=0.8,
        )
    ax.plot([], [], "-o", color="gray", markersize=4, label="LoftQ  ‖W − Q − BA‖/‖W‖")
    ax.scatter(
        [],
        [],
        marker="o",
        s=16,
        facecolor="none",
        edgecolor="gray",
        label="LoftQ, a config beaten by a cheaper one",
    )
    ax.plot([], [], "--", color="gray", label="plain quantization  ‖W − Q‖/‖W‖")
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter (exact storage of each config)")
    ax.set_ylabel("relative error, pooled over the layers (log scale)")
    ranks = sorted({int(r) for r in table["rank"].unique()})
    iters = sorted({int(t) for t in table["iters"].unique()})
    ax.set_title(
        f"Error vs bits per matrix type: {_source_name(table.attrs.get('source'))} "
        f"(LoftQ r={_join(ranks)}, T={_join(iters)})"
    )
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="matrix type")
    return figure


def _envelope(points: list[dict], column: str) -> list[dict]:
    """The configs no cheaper config beats (lower error at no more bits), by bits."""
    best, lowest = [], math.inf
    for r in sorted(points, key=lambda r: (r["bits_per_param"], r[column])):
        if r[column] < lowest:
            best.append(r)
            lowest = r[column]
    return best


def matrix_kinds(names: Iterable[str]) -> dict[str, str]:
    """Module name -> matrix type: the part after the layer number, shortened to its last
    component (``q_proj``) when that is unambiguous."""
    full = {name: re.split(r"(?:^|\.)\d+\.", name, maxsplit=1)[-1] for name in names}
    short = {name: kind.rsplit(".", 1)[-1] for name, kind in full.items()}
    per_short: dict[str, set[str]] = {}
    for name in full:
        per_short.setdefault(short[name], set()).add(full[name])
    if all(len(kinds) == 1 for kinds in per_short.values()):
        return short
    return full


def _layer(name: str) -> int | None:
    match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(match.group(1)) if match else None


def heatmap_rows(plan: Plan) -> list[dict]:
    """One row per matrix of the plan: layer, type, config, bits, block size (kept: 16 bits)."""
    names = sorted([*plan.modules, *plan.kept], key=natural_key)
    kinds = matrix_kinds(names)
    rows = []
    for name in names:
        entry = plan.modules.get(name)
        rows.append(
            {
                "module": name,
                "layer": _layer(name),
                "kind": kinds[name],
                "config": entry["config"] if entry else "kept (16-bit)",
                "bits": entry["bits"] if entry else 16,
                "block_size": entry["block_size"] if entry else None,
            }
        )
    return rows


def _draw_heatmap(figure_class, rows: list[dict], plan: Plan, name: str):
    from matplotlib.colors import BoundaryNorm, ListedColormap

    from ..planning.report import KIND_ORDER

    layers = list(dict.fromkeys(r["layer"] for r in rows))
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    short = [k.removesuffix("_proj") for k in kinds]
    order = sorted(
        range(len(kinds)), key=lambda i: KIND_ORDER.index(short[i]) if short[i] in KIND_ORDER else 99
    )
    kinds = [kinds[i] for i in order]
    bits = sorted({r["bits"] for r in rows})
    grid = np.full((len(layers), len(kinds)), np.nan)
    text = {}
    for r in rows:
        i, j = layers.index(r["layer"]), kinds.index(r["kind"])
        grid[i, j] = bits.index(r["bits"])
        text[i, j] = f"{r['bits']}" if r["block_size"] is None else f"{r['bits']}/{r['block_size']}"
    import matplotlib

    base = matplotlib.colormaps["viridis"]
    colors = [base(x) for x in np.linspace(0.12, 0.92, len(bits))] if len(bits) > 1 else [base(0.5)]
    cmap = ListedColormap(colors).with_extremes(bad="#eeeeee")
    norm = BoundaryNorm(np.arange(len(bits) + 1) - 0.5, len(bits))
    width = 2.6 + 1.05 * len(kinds)
    height = 1.6 + 0.3 * len(layers)
    figure = figure_class(figsize=(max(width, 6.0), max(height, 3.6)), dpi=DPI, layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    for (i, j), label in text.items():
        r, g, b, _ = colors[int(grid[i, j])]
        ax.text(
            j,
            i,
            label,
            ha="center",
            va="center",
            fontsize=8,
            color="black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white",
        )
    ax.set_xticks(
        range(len(kinds)),
        kinds,
        rotation=30 if max(map(len, kinds)) > 8 else 0,
        ha="right" if max(map(len, kinds)) > 8 else "center",
    )
    ax.set_yticks(range(len(layers)), ["-" if x is None else str(x) for x in layers])
    ax.set_xlabel("matrix type")
    ax.set_ylabel("layer")
    budget = plan.budget
    ax.set_title(
        f"Chosen config per matrix (cell: bits/block size): {name}\n"
        f"target {budget['target_bits']:g} bits/param, achieved {budget['achieved_bits']:.4g}, "
        f"objective {plan.objective}",
        fontsize=10,
    )
    bar = figure.colorbar(image, ax=ax, ticks=range(len(bits)), fraction=0.05, pad=0.02)
    bar.ax.set_yticklabels([f"{b} bits" for b in bits])
    bar.set_label("code bits")
    return figure


def eval_rows(evals: list[tuple[Path, dict]]) -> list[dict]:
    """One row per (eval file, start): the plan's bits and the start's numbers."""
    columns = ("perplexity", "nll", "kl_mean", "kl_p99", "top1_agreement", "cosine_mean", "cosine_p01")
    rows = []
    for path, data in evals:
        plan = data["plan"]
        for variant in VARIANTS:
            values = data["results"].get(variant, {})
            rows.append(
                {
                    "file": path.name,
                    "kind": data["model"]["kind"],
                    "source": data["model"]["source"],
                    "target_bits": plan["target_bits"],
                    "achieved_bits": plan["achieved_bits"],
                    "tokens": data["data"]["tokens"],
                    "variant": variant,
                    **{c: values.get(c) for c in columns},
                }
            )
    return sorted(
        rows, key=lambda r: (str(r["source"]), r["achieved_bits"], r["file"], VARIANTS.index(r["variant"]))
    )


def _draw_eval(figure_class, rows: list[dict], kind: str):
    sources = list(dict.fromkeys(str(r["source"]) for r in rows))
    if kind == "causal-lm":
        panels = [
            ("perplexity", "perplexity", "auto"),
            ("kl_mean", "KL(original ‖ start), nats per token", "always"),
            ("top1_agreement", "top-1 agreement with the original (fraction of tokens)", None),
        ]
    else:
        panels = [("cosine_mean", "cosine similarity of sentence embeddings", None)]
    figure = figure_class(figsize=(5.0 * len(panels) + 0.6, 4.8), dpi=DPI, layout="constrained")
    axes = np.atleast_1d(figure.subplots(1, len(panels)))
    tokens = sorted({int(r["tokens"]) for r in rows})
    for ax, (column, label, log) in zip(axes, panels):
        for s, source in enumerate(sources):
            dashes = ["-", "-.", ":"][s % 3]
            for variant in VARIANTS:
                points = [r for r in rows if str(r["source"]) == source and r["variant"] == variant]
                points = [r for r in points if r[column] is not None]
                if not points:
                    continue
                style = dict(VARIANT_STYLE[variant])
                label_text = style.pop("label") + (f" — {_source_name(source)}" if len(sources) > 1 else "")
                if variant == "original":
                    ax.axhline(points[0][column], color=style["color"], linestyle=":", label=label_text)
                    continue
                ax.plot(
                    [r["achieved_bits"] for r in points],
                    [r[column] for r in points],
                    linestyle=dashes,
                    label=label_text,
                    **style,
                )
            if column == "kl_mean":
                for variant in VARIANTS[1:]:
                    points = [r for r in rows if str(r["source"]) == source and r["variant"] == variant]
                    points = [r for r in points if r["kl_p99"] is not None]
                    if points:
                        ax.plot(
                            [r["achieved_bits"] for r in points],
                            [r["kl_p99"] for r in points],
                            linestyle="--",
                            color=VARIANT_STYLE[variant]["color"],
                            alpha=0.5,
                            linewidth=1,
                            label=f"{VARIANT_STYLE[variant]['label']}: 99th percentile",
                        )
        values = [r[column] for r in rows if r[column] is not None and r[column] > 0]
        if values and (log == "always" or (log == "auto" and max(values) > 20 * min(values))):
            ax.set_yscale("log")
            label += " (log scale)"
        ax.set_xlabel("plan bits per parameter (achieved)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.35)
        ax.legend(fontsize=7, loc="best")
    what = "perplexity, KL and top-1" if kind == "causal-lm" else "embedding fidelity"
    unit = "tokens" if kind == "causal-lm" else "sentence tokens"
    figure.suptitle(
        f"Quantized starts vs the original: {what} "
        f"({_join(tokens)} {unit}; {', '.join(_source_name(s) for s in sources)})"
    )
    return figure


# ---- files --------------------------------------------------------------------------------


def _save_rows(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow(
                {k: ("" if v is None else repr(v) if isinstance(v, float) else v) for k, v in row.items()}
            )


def _save_figure(figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI, facecolor="white", metadata={"Software": None})


def _readme(found: _Inputs, files: ReportFiles) -> str:
    lines = ["# bitalloc report", ""]
    if found.profile_path is not None:
        table = found.profile
        lines.append(
            f"Profile `{found.profile_path.name}`: {_source_name(table.attrs.get('source'))}, "
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


# ---- helpers ------------------------------------------------------------------------------


def _colors(count: int) -> list:
    import matplotlib

    name = "tab10" if count <= 10 else "tab20"
    cmap = matplotlib.colormaps[name]
    return [cmap(i % cmap.N) for i in range(count)]


def _unique(stem: str, seen: set[str]) -> str:
    name, i = stem, 2
    while name in seen:
        name, i = f"{stem}-{i}", i + 1
    seen.add(name)
    return name


def _source_name(source) -> str:
    if not source:
        return "model"
    return Path(str(source)).name if not str(source).startswith(("demo:", "<")) else str(source)


def _join(values) -> str:
    return "/".join(str(v) for v in values)
