"""Properties (hypothesis) of the three places user input enters: config strings, plan
files and profile tables. Whatever they are given, they answer with a result or a
BitallocError, never another exception; the planner's answer fits its budget exactly and is
optimal (brute force on tiny tables, an exact dynamic program on small ones).

Deterministic: derandomized, no example database, so CI sees the same examples every run.
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import re
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from bitalloc.errors import BitallocError
from bitalloc.planning.plan_file import Plan
from bitalloc.planning.planner import LORA_BITS, parse_sweep, plan, sweep
from bitalloc.quant import QuantConfig

SETTINGS = dict(
    derandomize=True,
    database=None,
    deadline=5000,  # ms per example (they take ~1-25 ms): generous for loaded CI machines
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FAST = settings(max_examples=500, **SETTINGS)
MEDIUM = settings(max_examples=300, **SETTINGS)


def only_bitalloc_errors(function, *args, **kwargs):
    """function(*args, **kwargs), or None when it raised BitallocError with a one-line message."""
    try:
        result = function(*args, **kwargs)
    except BitallocError as exc:
        message = str(exc)
        assert message and "\n" not in message, repr(message)
        event("BitallocError")  # --hypothesis-show-statistics: how many were refused
        return None
    event("accepted")
    return result


# ---- (a) config strings ----------------------------------------------------------------------
METHODS = ["nf", "int", "NF", "fp", "in", "", "nfint"]
FLOATS = ["fp32", "fp16", "bf16", "fp8", "FP32", ""]
SUFFIXES = ["", "fp16", "bf16", "fp32", "fp8", "x"]


def number_text():
    """Digit strings near and far from the supported values, with odd spellings."""
    return st.one_of(
        st.integers(-3, 70000).map(str),
        st.sampled_from(["2", "3", "4", "8", "7", "8", "4096", "4097", "65536", "65537", "0", "1"]),
        st.integers(0, 10**30).map(str),
        st.integers(1, 64).map(lambda n: "0" * 3 + str(n)),  # leading zeros
        st.sampled_from(["٤", "４", "²", "1_0", "+8", "8.0", " 8", "1e3", "9" * 5000]),
    )


@st.composite
def near_miss_configs(draw):
    """(text, canonical or None): strings built like the grammar, often slightly wrong; the
    canonical form is computed here independently of the parser."""
    method = draw(st.sampled_from(METHODS))
    bits, block = draw(number_text()), draw(number_text())
    if draw(st.booleans()):
        scale = draw(st.sampled_from(FLOATS))
        scale_bits = scale_block = suffix = None
    else:
        scale_bits, scale_block = draw(number_text()), draw(number_text())
        suffix = draw(st.sampled_from(SUFFIXES))
        scale = f"{scale_bits}b{scale_block}{suffix}"
    separators = draw(st.sampled_from([("-b", "-s"), ("-b", "-s"), ("_b", "-s"), ("-B", "-s"), ("-b", "s")]))
    text = f"{method}{bits}{separators[0]}{block}{separators[1]}{scale}"
    if draw(st.booleans()):
        text = draw(st.sampled_from(["", " ", "\t", "\n"])) + text + draw(st.sampled_from(["", " ", "\n"]))

    def value(digits, low, high, allowed=None):
        if not re.fullmatch(r"[0-9]+", digits or "") or len(digits.lstrip("0")) > 9:
            return None
        number = int(digits)
        ok = number in allowed if allowed else low <= number <= high
        return number if ok else None

    fields = [method in ("nf", "int"), separators == ("-b", "-s")]
    b, b0 = value(bits, 0, 0, (2, 3, 4, 8)), value(block, 8, 4096)
    if scale_bits is None:
        valid = all(fields) and b and b0 and scale in ("fp32", "fp16", "bf16")
        canonical = f"{method}{b}-b{b0}-s{scale}" if valid else None
    else:
        sb, b1 = value(scale_bits, 0, 0, (2, 3, 4, 8)), value(scale_block, 2, 65536)
        valid = all(fields) and b and b0 and sb and b1 and suffix in ("", "fp16", "bf16", "fp32")
        second = "" if suffix == "fp32" else suffix
        canonical = f"{method}{b}-b{b0}-s{sb}b{b1}{second}" if valid else None
    return text, canonical


@FAST
@given(st.text(max_size=40))
def test_any_text_parses_or_raises_bitalloc_error(text):
    config = only_bitalloc_errors(QuantConfig.parse, text)
    if config is not None:
        assert QuantConfig.parse(str(config)) == config
        assert str(QuantConfig.parse(str(config))) == str(config)


@FAST
@given(near_miss_configs())
def test_near_miss_configs_match_the_grammar_exactly(case):
    text, canonical = case
    config = only_bitalloc_errors(QuantConfig.parse, text)
    assert (config is None) == (canonical is None), (text, config)
    if config is not None:
        assert str(config) == canonical
        assert str(QuantConfig.parse(canonical)) == canonical
        assert config.storage_bits((3, 1000)) > 0


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**30), 10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
)


@FAST
@given(JUNK)
def test_non_strings_raise_bitalloc_error(value):
    with pytest.raises(BitallocError):
        QuantConfig.parse(value)


@FAST
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "method": st.one_of(st.sampled_from(["nf", "int", "fp"]), JUNK),
            "bits": st.one_of(st.sampled_from([2, 3, 4, 8, 5]), JUNK),
            "block_size": st.one_of(st.sampled_from([8, 64, 4096, 4097, 7]), JUNK),
            "scale_dtype": st.one_of(st.sampled_from(["fp32", "fp16", "bf16"]), JUNK),
            "scale_bits": st.one_of(st.sampled_from([None, 2, 8, 16]), JUNK),
            "scale_block_size": st.one_of(st.sampled_from([None, 2, 256, 65537]), JUNK),
            "second_level": st.one_of(st.sampled_from(["fp32", "fp16", "bf16"]), JUNK),
        },
    )
)
def test_config_fields_are_checked(fields):
    config = only_bitalloc_errors(QuantConfig, **fields)
    if config is not None:  # what can be built prints and parses back to itself
        assert QuantConfig.parse(str(config)) == config


@FAST
@given(st.one_of(st.text(max_size=30), st.builds(lambda a, b, c: f"{a}:{b}:{c}", *[st.floats()] * 3)))
def test_sweeps_are_bounded(text):
    budgets = only_bitalloc_errors(parse_sweep, text)
    if budgets is not None:
        assert 1 <= len(budgets) <= 1000
        assert all(math.isfinite(b) and b > 0 for b in budgets)


# ---- profile tables --------------------------------------------------------------------------
POOL = [
    "nf2-b64-s8b256",
    "nf3-b64-sfp16",
    "nf4-b64-s8b256",
    "int4-b128-sfp32",
    "nf8-b32-sbf16",
    "int2-b16-s4b32bf16",
    "nf3-b8-sfp32",
    "int8-b4096-s2b65536",
]
ERRORS = st.one_of(
    st.floats(0, 1e6),
    st.sampled_from([0.0, 1.0, 5e-324, 1e-300, 1e300]),
    st.floats(0, 1e300),
)


@st.composite
def tables(draw, max_matrices=8, max_configs=6):
    """A valid profile table: exact storage for each (shape, config), rank <= min(shape)."""
    n_matrices = draw(st.integers(1, max_matrices))
    configs = draw(st.lists(st.sampled_from(POOL), min_size=1, max_size=max_configs, unique=True))
    rows = []
    for index in range(n_matrices):
        shape = (draw(st.integers(1, 80)), draw(st.integers(1, 300)))
        for text in configs:
            config = QuantConfig.parse(text)
            error = draw(ERRORS)
            rows.append(
                {
                    "module": f"model.layers.{index // 3}.mlp.proj{index % 3}",
                    "shape": list(shape),
                    "numel": shape[0] * shape[1],
                    "config": text,
                    "method": config.method,
                    "bits": config.bits,
                    "block_size": config.block_size,
                    "bits_per_param": config.bits_per_param,
                    "storage_bits": config.storage_bits(shape),
                    "error": error,
                    "rel_error": 0.1,
                    "qlora_error": error,
                    "rank": draw(st.integers(0, min(shape))),
                    "iters": 1,
                }
            )
    return pd.DataFrame(rows)


def options_per_matrix(table, count_lora=False, min_bits=None, max_bits=None):
    """{module: [(storage counted by the budget, error)]} after the bit bounds."""
    options = {}
    for row in table.to_dict("records"):
        if (min_bits is not None and row["bits"] < min_bits) or (
            max_bits is not None and row["bits"] > max_bits
        ):
            options.setdefault(row["module"], [])
            continue
        lora = row["rank"] * sum(row["shape"]) * LORA_BITS if count_lora else 0
        options.setdefault(row["module"], []).append((row["storage_bits"] + lora, row["error"]))
    return options


def capacity(budget: float, numel: int) -> int:
    """The documented budget: its binary value or the decimal it prints as, whichever is more."""
    return max(math.floor(Fraction(budget) * numel), math.floor(Fraction(repr(budget)) * numel))


def brute_force(options: dict, limit: int) -> float | None:
    """Least total error over every assignment within ``limit`` bits, None if none fits."""
    best = None
    for choice in itertools.product(*options.values()):
        if sum(storage for storage, _ in choice) <= limit:
            total = math.fsum(error for _, error in choice)
            best = total if best is None else min(best, total)
    return best


def pareto_optimum(options: dict, limit: int) -> float | None:
    """The same optimum by an exact (storage, error) Pareto front, matrix by matrix."""
    front = [(0, ())]  # (storage, errors chosen)
    for choices in options.values():
        merged = sorted(
            ((s + storage, errors + (error,)) for s, errors in front for storage, error in choices),
            key=lambda item: (item[0], math.fsum(item[1])),
        )
        front, best = [], math.inf
        for s, errors in merged:
            total = math.fsum(errors)
            if s <= limit and total < best:
                front.append((s, errors))
                best = total
    return min((math.fsum(errors) for _, errors in front), default=None)


def check_plan(result: Plan, table: pd.DataFrame, budget: float, count_lora: bool, saved=True) -> None:
    """Within budget in exact integers, storage as the config says, and the file round-trips
    (or, where ``saved`` is False, refuses to be written with a BitallocError)."""
    entries = result.modules.values()
    numel = sum(e["numel"] for e in entries)
    storage = sum(
        e["storage_bits"] + (e["rank"] * sum(e["shape"]) * LORA_BITS if count_lora else 0) for e in entries
    )
    assert storage <= capacity(budget, numel)
    assert result.achieved_bits <= budget
    for entry in entries:
        assert entry["storage_bits"] == QuantConfig.parse(entry["config"]).storage_bits(entry["shape"])
    text = result.to_json() if saved else only_bitalloc_errors(result.to_json)
    if text is not None:
        assert Plan.from_json(text) == result


BUDGETS = st.one_of(
    st.floats(1.5, 40),
    st.integers(1, 40).map(lambda n: n / 4),
    st.sampled_from([2.3, 2.5, 3.0, 4.127, 1e-9, 1e300]),
)


@MEDIUM
@given(tables(max_matrices=4, max_configs=3), BUDGETS, st.booleans(), st.sampled_from([None, 3]), st.data())
def test_tiny_plans_are_brute_force_optimal(table, budget, count_lora, min_bits, data):
    if data.draw(st.booleans()):  # a budget inside the achievable range
        options = options_per_matrix(table, count_lora, min_bits)
        if all(options.values()):
            numel = table.groupby("module")["numel"].first().sum()
            low = sum(min(s for s, _ in o) for o in options.values()) / numel
            high = sum(max(s for s, _ in o) for o in options.values()) / numel
            budget = data.draw(st.floats(low, max(low, high)))
    options = options_per_matrix(table, count_lora, min_bits)
    numel = int(table.groupby("module")["numel"].first().sum())
    expected = brute_force(options, capacity(budget, numel)) if all(options.values()) else None
    result = only_bitalloc_errors(plan, table, budget, solver="dp", count_lora=count_lora, min_bits=min_bits)
    assert (result is None) == (expected is None), (expected, result)
    if result is not None:
        check_plan(result, table, budget, count_lora)
        assert result.total_error == pytest.approx(expected, rel=1e-9, abs=1e-300)
        assert result.total_error == math.fsum(e["error"] for e in result.modules.values())


@MEDIUM
@given(tables(), BUDGETS)
def test_small_plans_are_optimal_and_within_budget(table, budget):
    options = options_per_matrix(table)
    numel = int(table.groupby("module")["numel"].first().sum())
    expected = pareto_optimum(options, capacity(budget, numel))
    result = only_bitalloc_errors(plan, table, budget, solver="dp")
    assert (result is None) == (expected is None)
    if result is not None:
        check_plan(result, table, budget, False)
        assert result.total_error == pytest.approx(expected, rel=1e-9, abs=1e-300)


# ---- garbage tables and arguments ------------------------------------------------------------
GARBAGE = st.one_of(
    st.sampled_from(
        [
            True,
            False,
            float("nan"),
            float("inf"),
            -float("inf"),
            -1,
            0,
            0.5,
            10**30,
            10**400,
            2**53 + 1,
            "abc",
            "",
            None,
            "0x5",
            "5x0",
            "3x",
            [1, 2],
            [0, 5],
            [2.5, 4],
            [True, 4],
            (1, 2, 3),
            {"a": 1},
            "nf2-b64-s8b256",
            "nf4-b4097-sfp32",
            "²",
            "model.x²",
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-(2**70), 2**70),
    st.text(max_size=6),
)


@st.composite
def garbage_tables(draw):
    """A valid small table with a few cells replaced, columns dropped, rows repeated."""
    table = draw(tables(max_matrices=3, max_configs=3)).astype(object)
    for _ in range(draw(st.integers(0, 3))):
        column = draw(st.sampled_from(list(table.columns)))
        row = draw(st.integers(0, len(table) - 1))
        table.at[row, column] = draw(GARBAGE)
    action = draw(st.sampled_from(["none", "drop", "repeat", "empty", "rename", "same-module"]))
    if action == "drop":
        table = table.drop(columns=[draw(st.sampled_from(list(table.columns)))])
    elif action == "repeat":
        table = pd.concat([table, table.iloc[: draw(st.integers(1, len(table)))]], ignore_index=True)
    elif action == "empty":
        table = table.iloc[:0]
    elif action == "rename":
        table = table.rename(columns={"error": "rank"})
    elif action == "same-module":
        table["module"] = "model.layers.0.mlp.proj0"
    for key in draw(
        st.lists(st.sampled_from(["objective", "calibration", "source", "fingerprint"]), max_size=2)
    ):
        table.attrs[key] = draw(
            st.one_of(
                GARBAGE,
                st.sampled_from(["weight", "activation", "fisher"]),
                st.fixed_dictionaries({"digest": st.sampled_from(["0" * 64, "zz"]), "path": GARBAGE}),
            )
        )
    if "error" in table.columns and draw(st.booleans()):
        table["weighted_error"] = table["error"]
    return table


ARGUMENTS = st.fixed_dictionaries(
    {"budget": st.one_of(BUDGETS, GARBAGE)},
    optional={
        "count_lora": st.one_of(st.booleans(), GARBAGE),
        "min_bits": st.one_of(st.sampled_from([2, 3, 9]), GARBAGE),
        "max_bits": st.one_of(st.sampled_from([2, 4, 8]), GARBAGE),
        "keep": st.one_of(st.sampled_from([["proj0"], ["layers"], ["("]]), GARBAGE),
        "tie": st.one_of(st.sampled_from([["proj"], [r"proj(\d)"], ["nothing"]]), GARBAGE),
        "pin": st.one_of(st.sampled_from([{"proj0": "nf2-b64-s8b256"}, {"proj": "nf4-b64-s8b256"}]), GARBAGE),
    },
)


@MEDIUM
@given(garbage_tables(), ARGUMENTS)
def test_garbage_tables_and_arguments_raise_bitalloc_error(table, arguments):
    result = only_bitalloc_errors(plan, table, solver="dp", **arguments)
    if result is not None:
        # a garbage calibration record in the profile's metadata surfaces when the plan is written
        check_plan(result, table, arguments["budget"], arguments.get("count_lora", False), saved=False)


@MEDIUM
@given(
    tables(max_matrices=3, max_configs=2),
    st.one_of(st.lists(st.one_of(BUDGETS, GARBAGE), max_size=4), GARBAGE),
)
def test_sweep_budgets_raise_bitalloc_error(table, budgets):
    plans = only_bitalloc_errors(sweep, table, budgets, solver="dp")
    if plans is not None:
        assert len(plans) == len(parse_sweep(budgets) if isinstance(budgets, str) else budgets)


# ---- (b) plan files --------------------------------------------------------------------------
def _valid_plan() -> dict:
    rows = []
    for index, (shape, rank) in enumerate([((64, 128), 4), ((16, 60), 16), ((128, 64), 0)]):
        for text in ["nf2-b64-s8b256", "nf4-b64-sfp16", "int3-b32-s4b16bf16"]:
            config = QuantConfig.parse(text)
            rows.append(
                {
                    "module": f"model.layers.{index}.mlp.down_proj",
                    "shape": list(shape),
                    "numel": shape[0] * shape[1],
                    "config": text,
                    "method": config.method,
                    "bits": config.bits,
                    "block_size": config.block_size,
                    "bits_per_param": config.bits_per_param,
                    "storage_bits": config.storage_bits(shape),
                    "error": 2.0**-config.bits * (index + 1),
                    "rel_error": 0.1,
                    "qlora_error": 1.0,
                    "rank": rank,
                    "iters": 2,
                }
            )
    table = pd.DataFrame(rows)
    table.attrs.update(source="model", fingerprint="abc")
    return json.loads(plan(table, 3.0, solver="dp", keep=["layers.2"]).to_json())


VALID_PLAN = _valid_plan()
JSON_VALUES = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**20), 10**20),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=10),
        st.sampled_from(["nf2-b64-s8b256", "nf4-b64-sfp16", "nf4-b064-sfp16", "nf2-b8-s8b2", "fp32"]),
    ),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


def _stale(value):
    """A near-valid replacement: off by one, another config's field, a bigger number."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return st.sampled_from([value + 1, value - 1, 0, -1, 10**6, 2**64])
    if isinstance(value, float):
        return st.sampled_from([value * 2, -value, value + 1e-9, float("nan"), float("inf")])
    if isinstance(value, str):
        return st.sampled_from(["nf4-b64-s8b256", "nf2-b64-s8b256fp32", value.upper(), value + " ", ""])
    if isinstance(value, dict):
        return st.sampled_from(
            [{"dtype": "fp16"}, {"bits": 8, "block_size": 256, "second_level": "fp32"}, {}]
        )
    return st.just([])


@st.composite
def mutated_plans(draw):
    data = copy.deepcopy(VALID_PLAN)
    for _ in range(draw(st.integers(1, 3))):
        parent, key = None, None
        node = data
        while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)) > 0:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            parent, key = node, draw(st.sampled_from(keys))
            node = node[key]
        if parent is None:
            continue
        action = draw(st.sampled_from(["delete", "replace", "stale", "stale", "rename"]))
        if action == "delete":
            del parent[key]
        elif action == "replace":
            parent[key] = draw(JSON_VALUES)
        elif action == "stale":
            stale = _stale(parent[key])
            parent[key] = draw(stale) if isinstance(stale, st.SearchStrategy) else stale
        elif isinstance(parent, dict):
            parent[draw(st.text(max_size=6))] = parent.pop(key)
    return data


@MEDIUM
@given(mutated_plans())
def test_mutated_plans_load_or_raise_bitalloc_error(data):
    text = json.dumps(data)  # NaN and Infinity as Python writes them
    result = only_bitalloc_errors(Plan.from_json, text)
    if result is not None:  # whatever loads is consistent and writes back the same
        for entry in result.modules.values():
            config = QuantConfig.parse(entry["config"])
            assert entry["config"] == str(config)
            assert entry["storage_bits"] == config.storage_bits(entry["shape"])
            assert entry["rank"] <= min(entry["shape"])
        assert Plan.from_json(result.to_json()) == result


@MEDIUM
@given(st.integers(0, 5000), st.text(max_size=4), st.integers(0, 3))
def test_damaged_plan_text_raises_bitalloc_error(position, insert, cut):
    text = json.dumps(VALID_PLAN, indent=2)
    position %= len(text)
    damaged = text[:position] + insert + text[position + cut :]
    only_bitalloc_errors(Plan.from_json, damaged)
    only_bitalloc_errors(Plan.from_json, damaged.encode("utf-8"))


def test_valid_plan_is_loadable():
    assert Plan.from_json(json.dumps(VALID_PLAN)).to_dict() == VALID_PLAN
    assert VALID_PLAN["kept"] == ["model.layers.2.mlp.down_proj"]
    assert np.isfinite(VALID_PLAN["solver"]["objective"])
