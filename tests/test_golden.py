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


def test_api_applies_its_own_data_aware_plan(tmp_path):
    """The issue-9 path: data-aware profile -> plan -> save -> apply from the Python API alone
    gives the CLI's plan JSON and quantized tensors; the plan still applies after it is moved
    alone (apply computes its statistics again), and what it wrote loads with PEFT."""
    import shutil

    from common import smollm2_path
    from golden_outputs import SMOL_CONFIGS, SMOL_INCLUDE, sha, tensor_digests
    from peft import PeftModel

    import bitalloc

    gguf = smollm2_path()
    table = bitalloc.profile(gguf, tmp_path / "p.parquet", calibration="default", objective="activation",
                             configs=SMOL_CONFIGS, include=SMOL_INCLUDE, iters=2, quiet=True)  # fmt: skip
    plan = bitalloc.plan(table, 3.0)
    plan.save(tmp_path / "plan.json")
    assert sha(plan.to_json().replace(str(gguf), "<source>")) == EXPECTED["smol_plan_sha256"]
    assert not list(tmp_path.glob("*.safetensors"))  # self-contained: no statistics beside it
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(tmp_path / "plan.json", moved / "plan.json")  # apply computes h again
    bitalloc.apply(gguf, moved / "plan.json", tmp_path / "out", quiet=True)
    digests = tensor_digests(tmp_path / "out" / "quantized")
    digests.update(tensor_digests(tmp_path / "out" / "adapter"))
    assert digests == EXPECTED["smol_tensors"]
    model = bitalloc.load_quantized(tmp_path / "out" / "quantized")
    model = PeftModel.from_pretrained(model, str(tmp_path / "out" / "adapter"))
    layers = {n for n, m in model.named_modules() if isinstance(m, bitalloc.QuantLinear)}
    assert len(layers) == 14 and all(".layers.0." in n or ".layers.1." in n for n in layers)
