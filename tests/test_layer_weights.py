"""Layer weights in the profile: measured once (noise injection), cached beside the profile,
reused on resume, recorded in the plan and used by the planner."""

from __future__ import annotations

import json

import pytest
import torch
from _models import make_tiny_llama

import bitalloc.profiling.layer_weights as layer_weights_module
from bitalloc.errors import BitallocError
from bitalloc.planning.plan_file import Plan
from bitalloc.planning.planner import plan
from bitalloc.profiling.layer_weights import layer_weights_path, reference_config
from bitalloc.profiling.profiler import profile
from bitalloc.quant import QuantConfig

CONFIGS = ["nf2-b64-s8b256", "nf3-b64-s8b256", "nf4-b128-s8b256"]
FAST = dict(configs=CONFIGS, rank=4, iters=2, quiet=True)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(directory, seed=3)
    return directory


def test_reference_config_is_the_grid_config_nearest_three_bits():
    grid = [
        QuantConfig.parse(c) for c in ("nf2-b64-s8b256", "nf4-b64-s8b256", "nf3-b128-s8b256", "nf3-b64-sfp32")
    ]
    assert str(reference_config(grid)) == "nf3-b64-sfp32"
    assert str(reference_config(grid[:2])) == "nf2-b64-s8b256"  # a tie: the first by (distance, block, name)


def test_profile_measures_caches_and_plans_with_layer_weights(tiny, tmp_path, monkeypatch):
    output = tmp_path / "profile.parquet"
    table = profile(tiny, output, calibration_ids=ids(), layer_weights=True, layer_tokens=128, **FAST)
    record = table.attrs["layer_weights"]
    modules = sorted(set(table["module"]))
    assert sorted(record["coefficients"]) == modules
    values = list(record["coefficients"].values())
    assert all(v >= 0 for v in values) and max(values) > 0
    assert record["method"] == "noise-injection-kl" and record["tokens"] == 128
    assert record["reference_config"] == "nf3-b64-s8b256"
    assert layer_weights_path(output).is_file()

    # a repeated profile (another output) reuses nothing it did not make; the same output is
    # finished; a resumed one reuses the side file instead of running the model again
    def no_run(*args, **kwargs):
        raise AssertionError("the saved layer weights should have been reused")

    output.unlink()
    monkeypatch.setattr(layer_weights_module, "layer_coefficients", no_run)
    again = profile(tiny, output, calibration_ids=ids(), layer_weights=True, layer_tokens=128, **FAST)
    assert again.attrs["layer_weights"]["coefficients"] == record["coefficients"]

    result = plan(again, 3.2)
    data = json.loads(result.to_json())
    assert data["layer_weights"]["method"] == "noise-injection-kl"
    assert "coefficients" not in data["layer_weights"]
    for name, entry in data["modules"].items():
        assert entry["coefficient"] == record["coefficients"][name]
    assert result.total_error == pytest.approx(
        sum(e["coefficient"] * e["weighted_error"] for e in data["modules"].values()), rel=1e-12
    )
    saved = result.save(tmp_path / "plan.json")
    assert Plan.load(saved).to_json() == result.to_json()


def test_layer_weights_need_a_data_aware_objective(tiny, tmp_path):
    with pytest.raises(BitallocError, match="layer weights need"):
        profile(tiny, tmp_path / "p.parquet", objective="weight", layer_weights=True, **FAST)
    with pytest.raises(BitallocError, match="layer_tokens"):
        profile(
            tiny, tmp_path / "p.parquet", calibration_ids=ids(), layer_weights=True, layer_tokens=0, **FAST
        )
    assert not (tmp_path / "p.parquet").exists() and not layer_weights_path(tmp_path / "p.parquet").exists()
