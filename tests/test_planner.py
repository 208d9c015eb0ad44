"""The planner: ILP optimality against brute force, constraints, budgets, the plan file."""

from __future__ import annotations

import itertools
import json
import math
import re
from fractions import Fraction

import jsonschema
import numpy as np
import pandas as pd
import pytest

from bitalloc.errors import BitallocError
from bitalloc.planning.plan_file import Plan, plan_schema
from bitalloc.planning.planner import feasible_range, parse_sweep, plan, sweep
from bitalloc.planning.report import first_k_layers_baseline, summarize, uniform_baselines
from bitalloc.quant import QuantConfig

CONFIGS = ("nf2-b64-s8b256", "nf3-b64-sfp16", "nf4-b64-s8b256", "int4-b128-sfp32")
KINDS = {  # sizes divisible by the block sizes
    "self_attn.q_proj": (128, 256),
    "self_attn.k_proj": (64, 256),
    "self_attn.v_proj": (64, 256),
    "mlp.down_proj": (256, 128),
}
QKV_PER_LAYER = r"layers\.(\d+)\.self_attn\.(?:q|k|v)_proj"


def make_table(seed=0, layers=2, configs=CONFIGS, kinds=KINDS, objective=None, shape_str=False):
    """A profile-like table: error ~ numel * 2^(-2 bits/param), scaled per matrix, noisy."""
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(layers):
        for kind, shape in kinds.items():
            scale = rng.lognormal(0.0, 1.0)
            numel = shape[0] * shape[1]
            for text in configs:
                config = QuantConfig.parse(text)
                error = scale * numel * 2.0 ** (-2 * config.bits_per_param) * rng.uniform(0.7, 1.3)
                rows.append(
                    {
                        "module": f"model.layers.{layer}.{kind}",
                        "shape": f"{shape[0]}x{shape[1]}" if shape_str else list(shape),
                        "numel": numel,
                        "config": text,
                        "method": config.method,
                        "bits": config.bits,
                        "block_size": config.block_size,
                        "bits_per_param": config.bits_per_param,
                        "storage_bits": config.storage_bits(shape),
                        "error": error,
                        "rel_error": math.sqrt(error / numel),
                        "qlora_error": error * 1.5,
                        "rank": 16,
                        "iters": 5,
                        "weighted_error": error * rng.uniform(0.2, 5.0),
                    }
                )
    table = pd.DataFrame(rows)
    if objective:
        table.attrs["objective"] = objective
    return table


_COMBOS: dict[tuple[int, int], np.ndarray] = {}


def brute_force(
    table,
    budget,
    *,
    count_lora=False,
    tie=(),
    min_bits=None,
    max_bits=None,
    pin=None,
    keep=(),
    column="error",
):
    """Minimum total error over every assignment (numpy enumeration), or None if infeasible."""
    modules = list(dict.fromkeys(table["module"]))
    free = [m for m in modules if not any(re.search(p, m) for p in keep)]
    configs = sorted(set(table["config"]))
    rows = {(r["module"], r["config"]): r for r in table.to_dict("records")}
    storage = np.zeros((len(free), len(configs)), dtype=np.int64)
    error = np.full((len(free), len(configs)), np.inf)
    for i, module in enumerate(free):
        for j, config in enumerate(configs):
            row = rows.get((module, config))
            pinned = [c for p, c in (pin or {}).items() if re.search(p, module)]
            if row is None or (pinned and pinned[0] != config):
                continue
            if (min_bits is not None and row["bits"] < min_bits) or (
                max_bits is not None and row["bits"] > max_bits
            ):
                continue
            out, inp = row["shape"]
            storage[i, j] = row["storage_bits"] + (16 * row["rank"] * (out + inp) if count_lora else 0)
            error[i, j] = row[column]
    key = (len(configs), len(free))
    if key not in _COMBOS:
        _COMBOS[key] = np.array(list(itertools.product(range(len(configs)), repeat=len(free))))
    combos = _COMBOS[key]
    columns = np.arange(len(free))
    ok = np.ones(len(combos), dtype=bool)
    for pattern in tie:
        groups: dict[tuple, list[int]] = {}
        for i, module in enumerate(free):
            match = re.search(pattern, module)
            if match:
                groups.setdefault(match.groups(), []).append(i)
        for members in groups.values():
            for other in members[1:]:
                ok &= combos[:, members[0]] == combos[:, other]
    numel = sum(rows[(m, configs[0])]["numel"] for m in free)
    ok &= storage[columns, combos].sum(axis=1) <= math.floor(Fraction(budget) * numel)
    totals = error[columns, combos].sum(axis=1)[ok]
    totals = totals[np.isfinite(totals)]
    return float(totals.min()) if len(totals) else None


def total_storage(result: Plan, count_lora=False) -> int:
    return sum(
        e["storage_bits"] + (16 * e["rank"] * sum(e["shape"]) if count_lora else 0)
        for e in result.modules.values()
    )


def dyadic_budgets(table, fractions=(0.1, 0.45, 0.8), **constraints):
    """Budgets inside the feasible range, multiples of 1/256 (binary == decimal value)."""
    lo, hi = feasible_range(table, **constraints)
    return [math.ceil((lo + t * (hi - lo)) * 256) / 256 for t in fractions]


# ---- optimality --------------------------------------------------------------------------
SOLVERS = ["cbc", "highs", "dp"]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("solver", SOLVERS)
def test_optimum_equals_brute_force(seed, solver):
    table = make_table(seed)
    for budget in dyadic_budgets(table):
        result = plan(table, budget, solver=solver)
        assert result.solver["objective"] == pytest.approx(brute_force(table, budget), rel=1e-12)
        assert math.fsum(e["error"] for e in result.modules.values()) == result.total_error
        assert total_storage(result) <= Fraction(budget) * sum(e["numel"] for e in result.modules.values())
        assert result.achieved_bits <= budget
        assert result.solver == {**result.solver, "name": solver, "status": "optimal", "gap": 0.0}


CONSTRAINTS = {
    "tie": {"tie": [QKV_PER_LAYER]},
    "tie_all_down": {"tie": [r"mlp\.down_proj"]},
    "pin": {"pin": {r"layers\.0\.mlp": "nf4-b64-s8b256", r"k_proj": "nf2-b64-s8b256"}},
    "keep": {"keep": [r"layers\.1\.mlp\.down_proj"]},
    "bits": {"min_bits": 3, "max_bits": 4},
    "lora": {"count_lora": True},
    "all": {
        "tie": [QKV_PER_LAYER],
        "pin": {r"layers\.1\.mlp": "nf3-b64-sfp16"},
        "keep": [r"layers\.0\.mlp"],
        "max_bits": 3,
        "count_lora": True,
    },
}


@pytest.mark.parametrize("name", list(CONSTRAINTS))
@pytest.mark.parametrize("seed", [4, 5])
def test_constrained_optimum_equals_brute_force(name, seed):
    constraints = CONSTRAINTS[name]
    table = make_table(seed)
    for budget in dyadic_budgets(table, fractions=(0.2, 0.7), **constraints):
        for solver in SOLVERS:
            result = plan(table, budget, solver=solver, **constraints)
            expected = brute_force(table, budget, **constraints)
            assert result.total_error == pytest.approx(expected, rel=1e-12), (name, solver, budget)
            count_lora = constraints.get("count_lora", False)
            assert result.budget["includes_lora"] is count_lora
            numel = sum(e["numel"] for e in result.modules.values())
            assert total_storage(result, count_lora) <= Fraction(budget) * numel
            check_constraints(result, **constraints)


def check_constraints(result, tie=(), pin=None, keep=(), min_bits=None, max_bits=None, **_):
    for name, entry in result.modules.items():
        assert (min_bits or 0) <= entry["bits"] <= (max_bits or 99)
        for pattern, config in (pin or {}).items():
            if re.search(pattern, name):
                assert entry["config"] == config
    kept = [n for n in {r for r in _module_names(result)} if any(re.search(p, n) for p in keep)]
    assert sorted(result.kept) == sorted(kept) and not set(result.kept) & set(result.modules)
    for pattern in tie:
        shared: dict[tuple, set] = {}
        for name, entry in result.modules.items():
            if match := re.search(pattern, name):
                shared.setdefault(match.groups(), set()).add(entry["config"])
        assert all(len(configs) == 1 for configs in shared.values())


def _module_names(result):
    return [*result.modules, *result.kept]


def pareto_optimum(table, budget, column="error"):
    """Exact optimum by dynamic programming: the (storage, error) Pareto front, matrix by matrix."""
    capacity = math.floor(Fraction(budget) * table.groupby("module")["numel"].first().sum())
    storage, error = np.zeros(1, dtype=np.int64), np.zeros(1)
    for _, rows in table.groupby("module"):
        storage = (storage[:, None] + rows["storage_bits"].to_numpy()[None, :]).ravel()
        error = (error[:, None] + rows[column].to_numpy()[None, :]).ravel()
        fits = storage <= capacity
        order = np.lexsort((error[fits], storage[fits]))
        storage, error = storage[fits][order], error[fits][order]
        front = np.ones(len(error), dtype=bool)
        front[1:] = error[1:] < np.minimum.accumulate(error)[:-1]
        storage, error = storage[front], error[front]
    return float(error.min())


def test_solvers_agree_with_dynamic_programming_on_a_larger_problem():
    configs = [f"{m}{b}-b{bs}-s8b256" for m in ("nf", "int") for b in (2, 3, 4) for bs in (64, 128)]
    table = make_table(seed=11, layers=8, configs=configs)  # 32 matrices x 12 configs
    for budget in (2.25, 2.5, 3.0, 3.5, 4.0):
        expected = pareto_optimum(table, budget)
        cbc, highs, dp = (plan(table, budget, solver=solver) for solver in SOLVERS)
        assert cbc.total_error == pytest.approx(highs.total_error, rel=1e-5)
        for result in (cbc, highs, dp):
            assert result.total_error == pytest.approx(expected, rel=1e-12)
            assert result.achieved_bits <= budget


def test_weighted_objective_uses_weighted_error():
    table = make_table(seed=6, objective="activation")
    budget = dyadic_budgets(table, fractions=(0.5,))[0]
    result = plan(table, budget)
    assert result.objective == "activation"
    assert result.total_error == pytest.approx(brute_force(table, budget, column="weighted_error"), rel=1e-12)
    assert all("weighted_error" in entry for entry in result.modules.values())
    assert "weighted_error" not in next(iter(plan(make_table(6), budget).modules.values()))
    with pytest.raises(BitallocError, match="unknown objective 'fisher'"):  # not implemented: refused
        plan(make_table(seed=6, objective="fisher"), budget)


def test_beats_uniform_and_first_k_baselines():
    table = make_table(seed=7, layers=6)
    for budget in (2.5, 3.0, 3.5, 4.0):
        result = plan(table, budget)
        uniform = uniform_baselines(table, budget)
        assert uniform and all(result.total_error <= b.error * (1 + 1e-12) for b in uniform)
        assert [b.error for b in uniform] == sorted(b.error for b in uniform)
        first_k = first_k_layers_baseline(table, budget)
        assert first_k is not None and result.total_error <= first_k.error
        assert first_k.achieved_bits <= budget
        k = int(first_k.name.split()[1])
        if k < 6:  # one more 4-bit layer would not fit
            bigger = {
                m: "nf4-b64-s8b256" if int(m.split(".")[2]) <= k else c
                for m, c in first_k.assignments.items()
            }
            storage = sum(
                QuantConfig.parse(c).storage_bits(KINDS[m.split(".", 3)[3]]) for m, c in bigger.items()
            )
            assert storage > budget * 6 * sum(rows * cols for rows, cols in KINDS.values())
    assert uniform_baselines(table, 2.0) == [] and first_k_layers_baseline(table, 2.0) is None


# ---- budgets -------------------------------------------------------------------------------------
def test_feasible_range_is_exact_and_reported():
    table = make_table(seed=8)
    lo, hi = feasible_range(table)
    numel = 2 * sum(rows * cols for rows, cols in KINDS.values())
    storage = table.groupby("module")["storage_bits"]
    assert Fraction(lo) >= Fraction(int(storage.min().sum()), numel) > Fraction(lo) - 1e-12
    lowest = plan(table, lo)
    assert total_storage(lowest) == storage.min().sum()
    highest = plan(table, hi)  # every matrix gets its most accurate config
    assert highest.total_error == pytest.approx(table.groupby("module")["error"].min().sum())
    with pytest.raises(BitallocError) as info:
        plan(table, 1.5)
    message = str(info.value)
    assert message.startswith("budget 1.5 is infeasible: achievable average bits/param")
    assert f"is {math.ceil(lo * 1e4) / 1e4:g} to {round(hi, 4):g}" in message
    with pytest.raises(BitallocError, match="infeasible"):
        plan(table, lo - 1e-6)
    pinned_lo, _ = feasible_range(table, pin={"q_proj": "nf4-b64-s8b256"})
    assert pinned_lo > lo
    plan(table, pinned_lo, pin={"q_proj": "nf4-b64-s8b256"})


def test_budget_is_read_as_its_decimal_value():
    # 2.3 is slightly below 2.3 in binary; 960 params at exactly 2208 bits (nf2-b64-s8b256 on
    # 16x60, its cheapest config) must still fit.
    table = make_table(seed=9, layers=1, kinds={"mlp.down_proj": (16, 60)})
    assert sorted(table["storage_bits"])[0] == 2208 and Fraction(2.3) * 960 < 2208
    assert total_storage(plan(table, 2.3)) == 2208


def test_sweep_parse_and_reuse():
    assert parse_sweep("2.25:4.5:0.25") == [2.25 + 0.25 * i for i in range(10)]
    assert parse_sweep("2:3:0.1") == [2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6, 2.7, 2.8, 2.9, 3.0]
    assert parse_sweep(" 2.5, 3 ") == [2.5, 3.0]
    for bad in ("", "2:1:0.5", "2:3:0", "2:3", "a,b", "0,1", "2:3:nan"):
        with pytest.raises(BitallocError, match="bad sweep"):
            parse_sweep(bad)
    table = make_table(seed=10)
    budgets = [2.25, 2.75, 3.5]
    plans = sweep(table, budgets, solver="highs", tie=[QKV_PER_LAYER])
    assert [p.to_json() for p in plans] == [
        plan(table, b, solver="highs", tie=[QKV_PER_LAYER]).to_json() for b in budgets
    ]
    errors = [p.total_error for p in plans]
    assert errors == sorted(errors, reverse=True)


# ---- the plan file ----------------------------------------------------------------------
def test_plan_json_is_valid_deterministic_and_round_trips(tmp_path):
    table = make_table(seed=12)
    table.attrs.update(source="tiny-model", fingerprint="abc123")
    result = plan(table, 3.0, keep=[r"layers\.0\.mlp"])
    text = result.to_json()
    data = json.loads(text)
    jsonschema.Draft202012Validator.check_schema(plan_schema())
    jsonschema.validate(data, plan_schema(), cls=jsonschema.Draft202012Validator)
    assert list(data) == [
        "format",
        "model",
        "budget",
        "objective",
        "solver",
        "defaults",
        "kept",
        "modules",
    ]
    assert data["model"] == {"source": "tiny-model", "fingerprint": "abc123"}
    assert data["kept"] == ["model.layers.0.mlp.down_proj"]
    entry = data["modules"]["model.layers.0.self_attn.q_proj"]
    assert list(entry) == [
        "config",
        "method",
        "bits",
        "block_size",
        "scale",
        "bits_per_param",
        "storage_bits",
        "shape",
        "numel",
        "rank",
        "error",
    ]
    assert entry["storage_bits"] == QuantConfig.parse(entry["config"]).storage_bits((128, 256))
    assert text.endswith("}\n") and data["defaults"] == {"rank": 16, "iters": 5}
    # Same inputs, or the same rows in another order or shape spelling: the same bytes.
    shuffled = make_table(seed=12, shape_str=True).sample(frac=1.0, random_state=3)
    shuffled.attrs.update(table.attrs)
    assert plan(shuffled, 3.0, keep=[r"layers\.0\.mlp"]).to_json() == text
    assert plan(table, 3.0, keep=[r"layers\.0\.mlp"], source="other").model["source"] == "other"
    # Round trips: text, path, save/load (atomic: no temporary file left behind).
    assert Plan.from_json(text) == result
    path = result.save(tmp_path / "plan.json")
    assert Plan.load(path) == result and Plan.from_json(str(path)) == result
    assert path.read_text() == text and [p.name for p in tmp_path.iterdir()] == ["plan.json"]
    assert result.assignments == {n: e["config"] for n, e in data["modules"].items()}


def test_equal_error_ties_are_broken_deterministically():
    table = make_table(seed=13, layers=1)
    twin = table[table["module"] == "model.layers.0.self_attn.q_proj"].copy()
    twin["module"] = "model.layers.0.self_attn.o_proj"  # identical rows: many equal optima
    table = pd.concat([table, twin], ignore_index=True)
    for solver in SOLVERS:
        texts = {plan(table, 2.75, solver=solver).to_json() for _ in range(3)}
        texts.add(plan(table.iloc[::-1], 2.75, solver=solver).to_json())
        assert len(texts) == 1


@pytest.mark.parametrize(
    "mutate, message",
    [
        (
            lambda d: d.update(format="bitalloc.plan/v9"),
            "unsupported plan format 'bitalloc.plan/v9'",
        ),
        (lambda d: d.pop("solver"), "'solver' is a required property"),
        (lambda d: d["budget"].update(target_bits=-1), "budget/target_bits"),
        (lambda d: next(iter(d["modules"].values())).update(bits=5), "bits"),
        (lambda d: next(iter(d["modules"].values())).update(numel=7), "numel does not match"),
        (lambda d: next(iter(d["modules"].values())).update(extra=1), "extra"),
        (lambda d: d["kept"].append(next(iter(d["modules"]))), "both kept and quantized"),
    ],
)
def test_from_json_rejects_bad_plans(mutate, message):
    data = json.loads(plan(make_table(seed=14), 3.0).to_json())
    mutate(data)
    with pytest.raises(BitallocError, match=re.escape(message)):
        Plan.from_json(json.dumps(data))


def test_from_json_bad_text_and_missing_file(tmp_path):
    with pytest.raises(BitallocError, match="not valid JSON"):
        Plan.from_json("{not json")
    with pytest.raises(BitallocError, match="cannot read plan"):
        Plan.load(tmp_path / "missing.json")


# ---- bad input --------------------------------------------------------------------------
def _without(column):
    return make_table().drop(columns=[column])


def _with(column, index, value):
    table = make_table()
    table[column] = table[column].astype(object)
    table.at[index, column] = value
    return table


BAD_TABLES = [
    ([1, 2, 3], "not a profile table: expected a pandas DataFrame"),
    (make_table().iloc[:0], "the profile table is empty"),
    (_without("storage_bits"), "missing column(s) storage_bits"),
    (pd.DataFrame({"a": [1]}), "not a profile table: missing column(s) module, shape"),
    (_with("error", 3, float("nan")), "profile column 'error' has a bad value nan"),
    (_with("storage_bits", 0, 10.5), "'storage_bits' has a bad value 10.5"),
    (_with("shape", 0, "128 by 256"), "bad shape '128 by 256'"),
    (
        _with("config", 1, "nf5-b64-sfp16"),
        "profile table: config 'nf5-b64-sfp16': unsupported bits 5",
    ),
    (pd.concat([make_table(), make_table().iloc[:1]]), "two rows for 'model.layers.0.self_attn"),
]


@pytest.mark.parametrize("table, message", BAD_TABLES)
def test_bad_tables(table, message):
    with pytest.raises(BitallocError, match=re.escape(message)):
        plan(table, 3.0)


def test_weighted_objective_needs_its_column():
    table = make_table(objective="activation").drop(columns=["weighted_error"])
    with pytest.raises(BitallocError, match="missing column.*weighted_error"):
        plan(table)
    table.attrs["objective"] = "hessian"
    with pytest.raises(BitallocError, match="unknown objective 'hessian'"):
        plan(table)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": 0}, "budget must be a positive number"),
        ({"budget": -2.5}, "budget must be a positive number"),
        ({"budget": float("nan")}, "budget must be a positive number"),
        ({"budget": float("inf")}, "budget must be a positive number"),
        ({"budget": "3"}, "budget must be a number"),
        ({"solver": "gurobi"}, "unknown solver 'gurobi'"),
        ({"tie": [r"layers\.(\d+)\.attn"]}, r"tie regex 'layers\\.(\\d+)\\.attn' matches no"),
        ({"keep": ["lm_head"]}, "keep regex 'lm_head' matches no matrix"),
        ({"pin": {"nothing": "nf2-b64-s8b256"}}, "pin regex 'nothing' matches no matrix"),
        ({"tie": ["(unclosed"]}, "invalid tie regex '(unclosed'"),
        ({"pin": {"q_proj": "nf8-b64-sfp16"}}, "config 'nf8-b64-sfp16' is not in the profile"),
        ({"pin": {"q_proj": "bogus"}}, "unknown config string 'bogus'"),
        ({"pin": {"q_proj": "nf2-b64-s8b256", "self_attn": "nf3-b64-sfp16"}}, "pinned to both"),
        ({"pin": {"q_proj": "nf2-b64-s8b256"}, "keep": ["q_proj"]}, "both kept and pinned"),
        ({"pin": {"q_proj": "nf2-b64-s8b256"}, "min_bits": 3}, "pinned to 'nf2-b64-s8b256'"),
        ({"min_bits": 4, "max_bits": 3}, "min_bits 4 is above max_bits 3"),
        ({"min_bits": 8}, "no config left for"),
        ({"keep": ["layers"]}, "keep leaves no matrix to quantize"),
        (
            {
                "tie": ["k_proj"],
                "pin": {r"0\.self_attn\.k": "nf2-b64-s8b256", r"1\.self_attn\.k": "nf4-b64-s8b256"},
            },
            "no allowed config",
        ),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(BitallocError, match=re.escape(message)):
        plan(make_table(), **{"budget": 3.0, **kwargs})


def test_tie_groups_by_all_capture_groups():
    table = make_table(seed=15)
    untied = plan(table, 2.75)
    # Capturing (q|k|v) makes every group a single matrix: no constraint at all.
    assert plan(table, 2.75, tie=[r"layers\.(\d+)\.self_attn\.(q|k|v)_proj"]) == untied
    tied = plan(table, 2.75, tie=[QKV_PER_LAYER])
    for layer in range(2):
        configs = {tied.assignments[f"model.layers.{layer}.self_attn.{k}_proj"] for k in "qkv"}
        assert len(configs) == 1
    assert tied.total_error >= untied.total_error


def test_summarize_names_the_best_uniform_config():
    table = make_table(seed=16, layers=3)
    result = plan(table, 3.0, keep=[r"layers\.2\.mlp"])
    text = summarize(result, table)
    best = uniform_baselines(table, 3.0, keep=[r"layers\.2\.mlp"])[0]
    assert f"best uniform config within 3 bits: {best.name}" in text
    assert f"{best.error / result.total_error:.2f}x" in text
    assert "11 matrices quantized, 1 kept in 16 bits" in text
    header, *rows = text.split("per layer (bits/block):\n")[1].splitlines()
    assert header.split() == ["layer", "q", "k", "v", "down"]
    assert rows[2].split()[0] == "2" and rows[2].split()[-1] == "16bit"
    cell = result.modules["model.layers.0.self_attn.q_proj"]
    assert rows[0].split()[1] == f"{cell['method']}{cell['bits']}/{cell['block_size']}"


@pytest.mark.parametrize("budget", [2.25, 2.5, 3.0, 3.5, 4.0])
def test_demo_plan_beats_uniform_and_first_k(demo_profile, budget):
    """On the real demo profile, the optimum is never worse than any baseline that fits."""
    result = plan(demo_profile, budget)
    assert result.achieved_bits <= budget
    baselines = uniform_baselines(demo_profile, budget)
    assert baselines, "some uniform config fits every tested budget"
    for baseline in baselines:
        assert result.total_error <= baseline.error * (1 + 1e-12), baseline.name
    for high, low in [("nf4-b64-s8b256", "nf2-b64-s8b256"), ("nf3-b64-s8b256", "nf2-b128-s8b256")]:
        mix = first_k_layers_baseline(demo_profile, budget, high=high, low=low)
        if mix is not None:
            assert result.total_error <= mix.error * (1 + 1e-12), mix.name


# ---- hardening: every bad input is one BitallocError line naming the value -------------------
def test_sweep_size_is_bounded_before_building_the_list():
    with pytest.raises(BitallocError, match=r"'2:1e9:1e-9': more than 1,000 budgets \(at most 1,000\)"):
        parse_sweep("2:1e9:1e-9")  # once: a list of 10^18 floats
    assert len(parse_sweep("1:1000.9:1")) == 1000
    for bad in ("1:1001:1", "0:1e308:1e-308", "1:2:1e-320", "-1e308:1e308:1", ",".join(["3"] * 1001)):
        with pytest.raises(BitallocError, match="at most 1,000"):
            parse_sweep(bad)
    for bad in ("-inf:3:1", "1:inf:1", "1:3:inf", "nan:3:1"):
        with pytest.raises(BitallocError, match="need finite START <= STOP and STEP > 0"):
            parse_sweep(bad)
    with pytest.raises(BitallocError, match="bad sweep 3.0: expected a string"):
        parse_sweep(3.0)


def test_sweep_checks_its_budgets_first():
    table = make_table(seed=10)
    assert [p.to_json() for p in sweep(table, "2.5,3", solver="dp")] == [
        p.to_json() for p in sweep(table, [2.5, 3.0], solver="dp")
    ]
    with pytest.raises(BitallocError, match="budgets must be a list of numbers or a sweep"):
        sweep(table, 3.0)
    with pytest.raises(BitallocError, match="too many budgets to sweep: at most 1,000"):
        sweep(table, itertools.count(2))
    with pytest.raises(
        BitallocError, match="budget must be a positive number of bits per parameter, got nan"
    ):
        sweep(table, [3.0, float("nan")])
    with pytest.raises(BitallocError, match="budget must be a number of bits per parameter, got '3'"):
        sweep(table, [3.0, "3"])


def _plan_text(**changes) -> str:
    data = json.loads(plan(make_table(seed=14), 3.0).to_json())
    first = next(iter(data["modules"].values()))
    first.update(changes)
    return json.dumps(data)


MODULE = "modules/model.layers.0.mlp.down_proj"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            _plan_text(error=0.5).replace('"error": 0.5', '"error": NaN'),
            f"{MODULE}/error: NaN is not a finite",
        ),
        (
            _plan_text(error=0.5).replace('"error": 0.5', '"error": -Infinity'),
            "error: -Infinity is not a finite",
        ),
        (
            _plan_text(error=0.5).replace('"error": 0.5', '"error": 1e999'),
            "error: 1e999 is not a finite number",
        ),
        (_plan_text(rank=7).replace('"rank": 7', '"rank": 7, "rank": 8'), "the key 'rank' appears twice"),
        (
            _plan_text(storage_bits=1),
            f"{MODULE}/storage_bits: 1 does not match config 'nf2-b64-s8b256' on shape",
        ),
        (_plan_text(bits_per_param=2.5), f"{MODULE}/bits_per_param: 2.5 does not match config"),
        (_plan_text(scale={"dtype": "fp16"}), f"{MODULE}/scale: {{'dtype': 'fp16'}} does not match config"),
        (_plan_text(method="int"), f"{MODULE}/method: 'int' does not match config"),
        (_plan_text(block_size=128), f"{MODULE}/block_size: 128 does not match config"),
        (_plan_text(config="nf4-b64-s8b256"), f"{MODULE}/bits: 2 does not match config 'nf4-b64-s8b256'"),
        (_plan_text(config="nf2-b064-s8b256"), f"{MODULE}/config: 'nf2-b064-s8b256' is not canonical"),
        (_plan_text(config="nf2-b4-s8b256"), f"{MODULE}/config: config 'nf2-b4-s8b256': unsupported block"),
        (_plan_text(rank=999), f"{MODULE}/rank: 999 exceeds the matrix size [256, 128]"),
        (_plan_text(rank=True), f"{MODULE}/rank: True is not of type 'integer'"),
        (_plan_text(error=-1.0), f"{MODULE}/error: -1.0 is less than the minimum of 0"),
        ('{"format": "bitalloc.plan/v1", "model": ' + "[" * 100000 + "]" * 100000 + "}", "nested too deeply"),
        ('{"format": "bitalloc.plan/v1", "defaults": {"rank": 1' + "0" * 5000 + "}}", "not valid JSON"),
    ],
)
def test_from_json_rejects_non_finite_and_stale_fields(text, message):
    with pytest.raises(BitallocError) as info:
        Plan.from_json(text)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_from_json_inputs(tmp_path):
    text = plan(make_table(seed=14), 3.0).to_json()
    assert Plan.from_json(text.encode()) == Plan.from_json(text)
    for bad, message in [(5, "a plan is JSON text or a path, got int"), (None, "got NoneType")]:
        with pytest.raises(BitallocError, match=message):
            Plan.from_json(bad)
    with pytest.raises(BitallocError, match="cannot read plan 'plan\\\\x00.json': embedded null byte"):
        Plan.from_json("plan\x00.json")
    with pytest.raises(BitallocError, match="plan is not UTF-8 text"):
        Plan.from_json(b"\xff{}")


def test_save_refuses_a_non_finite_plan_before_writing(tmp_path):
    result = plan(make_table(seed=14), 3.0)
    path = result.save(tmp_path / "plan.json")
    before = path.read_bytes()
    name = next(iter(result.modules))
    result.modules[name].error = float("nan")
    for write in (lambda: result.save(path), lambda: result.save(tmp_path / "new.json"), result.to_json):
        with pytest.raises(
            BitallocError, match=f"modules/{re.escape(name)}/error: nan is not a finite number"
        ):
            write()
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]
    del result.budget["achieved_bits"]
    with pytest.raises(BitallocError, match="invalid plan: missing field 'achieved_bits'"):
        result.to_json()


def test_achieved_bits_is_never_printed_above_the_budget():
    # 168 bits for 23 parameters: 7.3043478..., which rounds up to 7.304348, above the lowest
    # feasible budget (the next float above 168/23)
    table = make_table(seed=3, layers=1, kinds={"mlp.down_proj": (1, 23)})
    table["rank"] = 0
    budget, _ = feasible_range(table)
    assert Fraction(168, 23) <= Fraction(budget) < Fraction(7304348, 10**6)
    result = plan(table, budget)
    assert total_storage(result) == 168
    assert result.achieved_bits == 7.304347 <= budget
    assert plan(table, 7.5).achieved_bits == 7.304348  # rounded to nearest where that fits


def _table_with(**columns):
    table = make_table()
    for column, value in columns.items():
        table[column] = table[column].astype(object)
        table.at[0, column] = value
    return table


@pytest.mark.parametrize(
    "table, message",
    [
        (
            _table_with(storage_bits=69697),
            "storage_bits 69697 is not the exact storage of the config on shape",
        ),
        (_table_with(bits=3), "with config 'nf2-b64-s8b256': bits 3 disagrees with the config (2)"),
        (_table_with(method="int"), "method 'int' disagrees with the config ('nf')"),
        (_table_with(block_size=128), "block_size 128 disagrees with the config (64)"),
        (_table_with(rank=129), "rank 129 exceeds the matrix size [128, 256]"),
        (_table_with(module=float("nan")), "profile column 'module' has a bad value nan (row 0)"),
        (_table_with(module=""), "profile column 'module' has a bad value '' (row 0)"),
        (_table_with(shape="0x5"), "bad shape '0x5', expected [out, in]"),
        (_table_with(shape=[128.5, 256]), "bad shape '[128.5, 256]'"),
        (_table_with(shape=[64, 512]), "disagree on its shape: (64, 512) and (128, 256)"),
        (_table_with(numel=2**60), "'numel' has a bad value 1.152921504606847e+18"),
        (
            make_table().assign(error=1e308),
            "profile column 'error': values too large (their sum is not finite)",
        ),
        (_table_with(error="abc"), "profile column 'error' is not numeric"),
        (pd.concat([make_table(), make_table()[["error"]]], axis=1), "duplicate column(s) error"),
    ],
)
def test_bad_tables_name_the_column(table, message):
    with pytest.raises(BitallocError) as info:
        plan(table, 3.0)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": True}, "budget must be a number of bits per parameter, got True"),
        ({"budget": 10**400}, "budget must be a positive number of bits per parameter, got 1000"),
        ({"count_lora": "no"}, "count_lora must be True or False, got 'no'"),
        ({"keep": float("nan")}, "invalid keep regex nan: expected a string"),
        ({"tie": [b"q_proj"]}, "invalid tie regex b'q_proj': expected a string"),
        ({"pin": {"q_proj": None}}, "config must be a string such as nf2-b64-s8b256, got NoneType"),
        ({"solver": ["dp"]}, "unknown solver ['dp']"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, message):
    with pytest.raises(BitallocError, match=re.escape(message)):
        plan(make_table(), **{"budget": 3.0, **kwargs})


def test_bad_objective_attribute():
    table = make_table()
    table.attrs["objective"] = ["weight"]
    with pytest.raises(BitallocError, match=re.escape("unknown objective ['weight'] in the profile")):
        feasible_range(table)


@pytest.mark.parametrize("scale", [1e300 / 1.5, 2.0**-1060, 1.0])
@pytest.mark.parametrize("solver", SOLVERS)
def test_extreme_error_magnitudes_stay_exact(scale, solver):
    """Errors near the float limits (a sum just below overflow; subnormals) plan exactly."""
    table = make_table(seed=17, layers=1)
    rng = np.random.default_rng(0)
    table["error"] = [float(v) * scale for v in rng.integers(1, 64, len(table))]  # exact multiples
    if scale > 1:
        table.loc[0, "error"] = 1.7e308 - table["error"].iloc[1:].sum() * 2  # the sum stays finite
    for budget in dyadic_budgets(table):
        result = plan(table, budget, solver=solver)
        assert result.total_error == brute_force(table, budget)
        assert total_storage(result) <= Fraction(budget) * sum(e["numel"] for e in result.modules.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_layer_weights_minimize_the_coefficient_weighted_error(seed):
    """With layer coefficients the optimum is that of Σ c·weighted_error (brute force); the
    plan records each matrix's coefficient and its raw weighted error; without them (or with
    layer_weights=False) the plain weighted optimum."""
    table = make_table(seed=seed, objective="output")
    rng = np.random.default_rng(100 + seed)
    modules = list(dict.fromkeys(table["module"]))
    coefficients = {m: float(rng.lognormal(0.0, 1.5)) for m in modules}
    record = {"method": "noise-injection-kl", "tokens": 512, "coefficients": coefficients}
    table.attrs["layer_weights"] = record
    scaled = table.assign(scaled=table["weighted_error"] * table["module"].map(coefficients))
    budget = dyadic_budgets(table, fractions=(0.5,))[0]
    result = plan(table, budget)
    assert result.total_error == pytest.approx(brute_force(scaled, budget, column="scaled"), rel=1e-12)
    for name, entry in result.modules.items():
        row = table[(table.module == name) & (table.config == entry["config"])].iloc[0]
        assert entry["coefficient"] == coefficients[name]
        assert entry["weighted_error"] == row["weighted_error"]
    data = json.loads(result.to_json())
    assert data["layer_weights"] == {"method": "noise-injection-kl", "tokens": 512}
    jsonschema.validate(data, plan_schema())
    assert Plan.from_json(result.to_json()).to_json() == result.to_json()
    plain = plan(table, budget, layer_weights=False)
    assert plain.total_error == pytest.approx(brute_force(table, budget, column="weighted_error"), rel=1e-12)
    assert plain.layer_weights is None and "coefficient" not in next(iter(plain.modules.values()))


@pytest.mark.parametrize("bad", [-1.0, float("nan"), None, "2"])
def test_bad_layer_coefficients_are_refused(bad):
    table = make_table(seed=3, objective="output")
    modules = list(dict.fromkeys(table["module"]))
    coefficients = dict.fromkeys(modules, 1.0)
    coefficients[modules[1]] = bad
    table.attrs["layer_weights"] = {"method": "x", "coefficients": coefficients}
    with pytest.raises(BitallocError, match="layer coefficient"):
        plan(table, 4.0)
