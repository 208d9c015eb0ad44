"""Drawing the report's figures with matplotlib (the ``report`` extra, Agg canvas): each
``draw_*`` takes the figure class and the rows of `report_rows` and returns the figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import BitallocError
from ..planning.plan_file import Plan
from .fidelity import VARIANTS
from .report_rows import envelope

DPI = 120
BITS_LABEL = "bits per parameter (exact storage, LoRA not counted)"
VARIANT_STYLE = {
    "original": {"color": "black", "linestyle": ":", "label": "original"},
    "loftq": {"color": "tab:blue", "marker": "o", "label": "LoftQ start (Q + BA)"},
    "qlora": {"color": "tab:red", "marker": "s", "label": "QLoRA start (Q, no LoRA)"},
}


def figure_class():
    """matplotlib's Figure (drawn on the Agg canvas: no display needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise BitallocError(
            "bitalloc report draws with matplotlib, which is not installed: pip install 'bitalloc[report]'"
        ) from None
    return Figure


def save_figure(figure, path: Path) -> None:
    figure.savefig(path, dpi=DPI, facecolor="white", metadata={"Software": None})


# ---- frontier -----------------------------------------------------------------------------


def draw_frontier(figure_class, rows: list[dict], table, ylabel: str):
    """The budget frontier (`report_rows.frontier_rows`); ``ylabel`` names the objective."""
    objective = table.attrs.get("objective") or "weight"
    figure = figure_class(figsize=(10.5, 5.6), dpi=DPI, layout="constrained")
    ax = figure.subplots()
    _frontier_lines(ax, rows)
    _frontier_points(ax, rows)
    ax.set_yscale("log")
    ax.set_xlabel(BITS_LABEL)
    ax.set_ylabel(ylabel)
    matrices = table["module"].nunique()
    ax.set_title(
        f"Budget frontier: {source_name(table.attrs.get('source'))}, {matrices} matrices, "
        f"objective {objective}"
    )
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    return figure


def _frontier_lines(ax, rows: list[dict]) -> None:
    """The ILP sweep and the LoftQ mix (every k) as lines."""
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


def _frontier_points(ax, rows: list[dict]) -> None:
    """Each uniform config and each given plan (labelled) as a marker."""
    uniform = [r for r in rows if r["series"] == "uniform"]
    colors = palette(len(uniform))
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


# ---- error vs bits ------------------------------------------------------------------------


def draw_errors(figure_class, rows: list[dict], table):
    """Relative error against bits per matrix type (`report_rows.error_rows`)."""
    figure = figure_class(figsize=(9.5, 5.6), dpi=DPI, layout="constrained")
    ax = figure.subplots()
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    for color, kind in zip(palette(len(kinds)), kinds):
        points = [r for r in rows if r["kind"] == kind]
        best = envelope(points, "rel_error")
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
        plain = envelope(points, "qlora_rel_error")
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
        f"Error vs bits per matrix type: {source_name(table.attrs.get('source'))} "
        f"(LoftQ r={join(ranks)}, T={join(iters)})"
    )
    ax.grid(True, which="major", alpha=0.35)
    ax.grid(True, which="minor", alpha=0.12)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False, title="matrix type")
    return figure


# ---- heatmap ------------------------------------------------------------------------------


def draw_heatmap(figure_class, rows: list[dict], plan: Plan, name: str):
    """The chosen bits (colour) and block size (text) per layer and matrix type of ``plan``
    (`report_rows.heatmap_rows`), titled with ``name``."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    layers, kinds, bits, grid, text = _heatmap_grid(rows)
    colors = _bit_colors(len(bits))
    cmap = ListedColormap(colors).with_extremes(bad="#eeeeee")
    norm = BoundaryNorm(np.arange(len(bits) + 1) - 0.5, len(bits))
    width = 2.6 + 1.05 * len(kinds)
    height = 1.6 + 0.3 * len(layers)
    figure = figure_class(figsize=(max(width, 6.0), max(height, 3.6)), dpi=DPI, layout="constrained")
    ax = figure.subplots()
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
    for (i, j), label in text.items():
        r, g, b, _ = colors[int(grid[i, j])]
        dark = 0.299 * r + 0.587 * g + 0.114 * b <= 0.5
        ax.text(j, i, label, ha="center", va="center", fontsize=8, color="white" if dark else "black")
    tilted = max(map(len, kinds)) > 8
    ax.set_xticks(range(len(kinds)), kinds, rotation=30 if tilted else 0, ha="right" if tilted else "center")
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


def _heatmap_grid(rows: list[dict]) -> tuple[list, list[str], list[int], np.ndarray, dict]:
    """(layers, matrix types in the usual order, bit widths, grid of bit-width indices with
    NaN where a layer lacks a type, cell texts by (layer index, type index))."""
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
    return layers, kinds, bits, grid, text


def _bit_colors(count: int) -> list:
    import matplotlib

    base = matplotlib.colormaps["viridis"]
    return [base(x) for x in np.linspace(0.12, 0.92, count)] if count > 1 else [base(0.5)]


# ---- eval ---------------------------------------------------------------------------------


def draw_eval(figure_class, rows: list[dict], kind: str):
    """The starts against the original (`report_rows.eval_rows`), one panel per measure of
    ``kind`` (causal-lm: perplexity, KL, top-1; encoder: embedding cosine)."""
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
            source_rows = [r for r in rows if str(r["source"]) == source]
            label_suffix = f" — {source_name(source)}" if len(sources) > 1 else ""
            _eval_lines(ax, source_rows, column, ["-", "-.", ":"][s % 3], label_suffix)
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
        f"({join(tokens)} {unit}; {', '.join(source_name(s) for s in sources)})"
    )
    return figure


def _eval_lines(ax, rows: list[dict], column: str, dashes: str, label_suffix: str) -> None:
    """One source's lines in one panel: each start against bits, the original as a level
    (and, for the mean KL, each start's 99th percentile)."""
    for variant in VARIANTS:
        points = [r for r in rows if r["variant"] == variant and r[column] is not None]
        if not points:
            continue
        style = dict(VARIANT_STYLE[variant])
        label_text = style.pop("label") + label_suffix
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
    if column != "kl_mean":
        return
    for variant in VARIANTS[1:]:
        points = [r for r in rows if r["variant"] == variant and r["kl_p99"] is not None]
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


# ---- labels and colours -------------------------------------------------------------------


def palette(count: int) -> list:
    import matplotlib

    name = "tab10" if count <= 10 else "tab20"
    cmap = matplotlib.colormaps[name]
    return [cmap(i % cmap.N) for i in range(count)]


def source_name(source) -> str:
    if not source:
        return "model"
    return Path(str(source)).name if not str(source).startswith(("demo:", "<")) else str(source)


def join(values) -> str:
    return "/".join(str(v) for v in values)
