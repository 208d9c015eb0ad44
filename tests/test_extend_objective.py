"""A new objective is one module plus its registration.

The toy objective below (each input column j of a matrix with `in` columns weighted by
1 + j/in, no calibration data) is defined only here and added through
`bitalloc.profiling.objectives.register`; nothing else in the package knows it. It runs
through profile -> plan -> apply -> eval of a tiny generated model; apply's factors are the
profile's decompositions, and eval's the ones apply wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from _models import make_tiny_llama

import bitalloc
from bitalloc.checkpoints import open_source
from bitalloc.errors import BitallocError
from bitalloc.lora import Diagonal, loftq, module_seed
from bitalloc.planning.plan_file import Plan
from bitalloc.profiling.objectives import Objective, Statistics, register, unregister

CONFIGS = ["nf2-b64-s8b256", "nf4-b64-s8b256"]
FAST = dict(configs=CONFIGS, rank=4, iters=2, quiet=True)


def ramp(columns: int) -> torch.Tensor:
    """The toy's fixed weight of each input column: 1 + j/in."""
    return 1.0 + torch.arange(columns, dtype=torch.float32) / columns


@dataclass(frozen=True)
class FixedColumns(Objective):
    """‖(W − Q − B A)·diag(√(1 + j/in))‖²_F: a fixed per-column weighting, no calibration."""

    column: str = "ramp_error"
    label: str = "total error, log scale\nΣ ‖(W − Q − BA)·diag(√ramp)‖²_F"
    data_aware: bool = True

    def weighting(self, statistic, damping):
        return Diagonal(statistic)

    def profile_statistics(self, model, calibration, shapes):
        return None, self._statistics(shapes)

    def plan_statistics(self, model, record, shapes, data):
        return self._statistics(shapes)

    def _statistics(self, shapes) -> Statistics:
        found = {name: ramp(shape[1]) for name, shape in shapes.items() if shape is not None}
        return Statistics(found, self.name)


@pytest.fixture
def toy_objective():
    objective = register(FixedColumns("ramp"))
    yield objective
    unregister(objective.name)


def test_a_registered_objective_runs_through_profile_plan_and_apply(tmp_path, toy_objective):
    model_dir = tmp_path / "model"
    make_tiny_llama(model_dir)
    table = bitalloc.profile(str(model_dir), objective="ramp", **FAST)
    assert table.attrs["objective"] == "ramp" and "ramp_error" in table.columns
    assert "weighted_error" not in table.columns  # the objective names its own column

    # the column is the toy's weighted error: LoftQ weighted by the ramp, seeded as profiled
    name = "model.layers.1.mlp.down_proj"
    row = table[(table["module"] == name) & (table["config"] == CONFIGS[0])].iloc[0]
    with open_source(str(model_dir)) as source:
        weight = source.read(name)
    expected = loftq(weight, CONFIGS[0], 4, 2, seed=module_seed(name, CONFIGS[0]), column_weights=ramp(256))
    assert row["ramp_error"] == pytest.approx(expected.weighted_error, rel=1e-5)
    plain = loftq(weight, CONFIGS[0], 4, 2, seed=module_seed(name, CONFIGS[0]))
    assert abs(row["rel_error"] - plain.rel_error) > 1e-4  # the weighting changed the decomposition

    plan = bitalloc.plan(table, budget=3.0)
    assert plan.objective == "ramp"
    assert set(plan.assignments.values()) == set(CONFIGS)  # the budget mixes both configs
    for module, entry in plan.modules.items():
        picked = table[(table["module"] == module) & (table["config"] == entry["config"])].iloc[0]
        assert entry["weighted_error"] == pytest.approx(picked["ramp_error"], rel=1e-12)
    plan_path = plan.save(tmp_path / "plan.json")
    assert Plan.load(plan_path).objective == "ramp"

    out = bitalloc.apply(str(model_dir), plan_path, tmp_path / "out", quiet=True)
    info = json.loads((out / "quantized" / "bitalloc_quant.json").read_text())
    for module, entry in plan.modules.items():
        picked = table[(table["module"] == module) & (table["config"] == entry["config"])].iloc[0]
        assert info["modules"][module]["rel_error"] == pytest.approx(picked["rel_error"], rel=1e-5, abs=1e-7)

    # eval decomposes the plan as apply did: the same starts as read back from the folder
    ids = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    from_plan = bitalloc.evaluate(str(model_dir), plan_path, input_ids=ids)["results"]
    from_out = bitalloc.evaluate(str(out), reference=str(model_dir), input_ids=ids)["results"]
    assert from_plan["loftq"]["kl_mean"] > 0
    for variant in ("loftq", "qlora"):
        expected = from_out[variant]["kl_mean"]
        assert from_plan[variant]["kl_mean"] == pytest.approx(expected, rel=1e-3, abs=1e-9)


def test_an_unregistered_objective_is_refused(tmp_path, toy_objective):
    model_dir = tmp_path / "model"
    make_tiny_llama(model_dir)
    plan = bitalloc.plan(bitalloc.profile(str(model_dir), objective="ramp", **FAST), budget=3.0)
    text = plan.to_json()
    unregister("ramp")
    with pytest.raises(BitallocError, match="objective"):
        Plan.from_json(text)
    with pytest.raises(BitallocError, match="unknown objective 'ramp'"):
        bitalloc.profile(str(model_dir), objective="ramp", **FAST)
