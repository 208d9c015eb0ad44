"""Golden outputs: the profile values, plan JSON and quantized tensors of two fixed runs
(demo model weight-only via the API; SmolLM2's first two layers data-aware via the CLI)
equal those recorded before the layout move (`benchmarks/golden_outputs.py`, issue 9).
A change of the numbers or bytes on purpose regenerates `tests/data/golden.json` with it."""

import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "benchmarks"))
from golden_outputs import golden  # noqa: E402

EXPECTED = json.loads((Path(__file__).parent / "data" / "golden.json").read_text())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    return golden(tmp_path_factory.mktemp("golden"))


@pytest.mark.parametrize("key", ["demo_profile", "smol_profile"])
def test_profile_values_unchanged(outputs, key):
    assert len(outputs[key]) == len(EXPECTED[key]) > 0
    for got, want in zip(outputs[key], EXPECTED[key]):
        assert got[:3] == want[:3]  # module, config, storage bits: exact
        for value, expected in zip(got[3:], want[3:]):
            assert math.isclose(value, expected, rel_tol=1e-6, abs_tol=1e-12), (got, want)


@pytest.mark.parametrize("key", ["demo_plan_sha256", "smol_plan_sha256", "demo_tensors", "smol_tensors"])
def test_plans_and_tensors_byte_identical(outputs, key):
    assert outputs[key] == EXPECTED[key]
