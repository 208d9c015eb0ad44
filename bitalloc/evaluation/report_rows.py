"""The data behind each report figure, as rows (one dict per point): the budget frontier,
error against bits per matrix type, the chosen config per matrix, and eval results. Pure
table arithmetic, no drawing: `plots` draws these rows and the report saves them as CSV."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..names import natural_key
from ..planning.plan_file import Plan
from ..quant import QuantConfig
from .fidelity import VARIANTS

FRONTIER_POINTS = 25  # budgets in the frontier sweep, evenly spaced over the achievable range
FRONTIER_SOLVER = "dp"  # exact, and fast for many budgets
LOFTQ_MIX = ("nf4-b64-s8b256", "nf2-b64-s8b256")  # the LoftQ paper's mix: first k layers high, rest low
UNIFORM_BUDGET = 64.0  # bits/param: every uniform config fits


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


def envelope(points: list[dict], column: str) -> list[dict]:
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
                "config": entry.config if entry is not None else "kept (16-bit)",
                "bits": entry.bits if entry is not None else 16,
                "block_size": entry.block_size if entry is not None else None,
            }
        )
    return rows


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
