"""Data-aware plans are self-contained: no statistics file beside a profile or a plan, so the
scenarios that side files broke work (rerunning a plan command, naming a plan after its
profile, a moved profile folder, saving twice, a plan written into the model folder), and a
plan alone (with the model and its calibration text) applies."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from _models import make_tiny_llama
from safetensors import safe_open
from test_eval import byte_tokenizer

from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.planning.plan_file import Plan

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = "nf2-b64-s8b256,nf4-b64-s8b256"
FAST = ["--configs", CONFIGS, "--rank", "4", "--iters", "1", "--calibration-tokens", "512", "--quiet"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("selfcontained") / "model"
    make_tiny_llama(directory, seed=3)
    byte_tokenizer(directory)
    return directory


def files(folder) -> list[str]:
    """What a command left in ``folder``, but the profile cache (`.bitalloc-cache/`)."""
    return sorted(p.name for p in folder.iterdir() if p.name != ".bitalloc-cache")


def adapter(out) -> dict[str, torch.Tensor]:
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_rerunning_the_same_data_aware_plan_command_and_saving_twice(model_dir, tmp_path, capsys):
    plan_path = tmp_path / "plan.json"
    command = ["plan", str(model_dir), "--budget", "3", "-o", str(plan_path), *FAST]
    assert main(command) == 0
    first = plan_path.read_bytes()
    assert json.loads(first)["objective"] == "output"
    assert main(command) == 0, capsys.readouterr().err  # its own earlier output is no input
    assert plan_path.read_bytes() == first
    # saving the same plan over itself twice leaves the plan and the profile cache, nothing else
    plan = Plan.load(plan_path)
    plan.save(plan_path)
    plan.save(plan_path)
    assert not [name for name in files(tmp_path) if not name.startswith("plan.")]
    assert [name for name in files(tmp_path) if not name.endswith((".parquet", ".json"))] == []
    assert not list(tmp_path.glob("*.safetensors"))


def test_plan_named_after_its_profile_and_a_moved_profile_folder(model_dir, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    profile = folder / "p.parquet"
    assert main(["profile", str(model_dir), "-o", str(profile), "--calibration", "default", *FAST]) == 0
    assert files(folder) == ["p.parquet"]  # no statistics beside the profile
    assert main(["plan", "--profile", str(profile), "--budget", "3", "-o", str(folder / "p.json")]) == 0
    moved = tmp_path / "moved"
    shutil.move(folder, moved)
    plan_path = moved / "plan.json"
    assert main(["plan", "--profile", str(moved / "p.parquet"), "--budget", "3", "-o", str(plan_path)]) == 0
    assert plan_path.read_bytes() == (moved / "p.json").read_bytes()
    # the plan alone, moved anywhere, applies (the built-in text needs no path)
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.move(plan_path, alone / "plan.json")
    out = tmp_path / "out"
    assert main(["apply", str(model_dir), "--plan", str(alone / "plan.json"), "-o", str(out), "--quiet"]) == 0
    assert sorted(adapter(out))


def test_a_plan_written_into_the_model_folder_adds_no_shard(model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    before = sorted(p.name for p in model.glob("*.safetensors"))
    plan_path = model / "plan.json"
    assert main(["plan", str(model), "--budget", "3", "-o", str(plan_path), *FAST]) == 0
    assert sorted(p.name for p in model.glob("*.safetensors")) == before
    out = tmp_path / "out"
    assert main(["apply", str(model), "--plan", str(plan_path), "-o", str(out), "--quiet"]) == 0
    names = set(adapter(out))
    assert len(names) == 2 * len(json.loads(plan_path.read_text())["modules"])


def test_apply_recomputes_the_profiled_statistics(model_dir, tmp_path):
    """The property the side file guaranteed: apply's factors are the profile's decomposition.
    The plan is applied twice, once with the statistics computed in `apply` and once with
    H from an independent in-memory calibration fed to loftq: the factors agree."""
    from bitalloc.checkpoints import open_source
    from bitalloc.lora import loftq, module_seed
    from bitalloc.profiling.calibration import calibrate, weighting

    plan_path = tmp_path / "plan.json"
    assert main(["plan", str(model_dir), "--budget", "3", "-o", str(plan_path), *FAST]) == 0
    plan = Plan.load(plan_path)
    out = tmp_path / "out"
    assert main(["apply", str(model_dir), "--plan", str(plan_path), "-o", str(out), "--quiet"]) == 0
    found = adapter(out)
    record = plan.calibration
    covariances = calibrate(
        model_dir, list(plan.modules), tokens=record["tokens"], context=record["context"], covariance=True
    ).covariances
    with open_source(model_dir) as source:
        for name, entry in plan.modules.items():
            config = entry["config"]
            expected = loftq(
                source.read(name), config, rank=entry["rank"], iters=plan.defaults["iters"], lora_alpha=4,
                seed=module_seed(name, config), weighting=weighting(covariances, name, record["lambda"]),
            )  # fmt: skip
            assert expected.weighted_error == pytest.approx(entry["weighted_error"], rel=1e-5)
            b = found[f"base_model.model.{name}.lora_B.weight"]
            torch.testing.assert_close(b, expected.lora_B, rtol=1e-4, atol=1e-6)


def test_plans_from_given_column_weights_need_them_again(model_dir, tmp_path):
    """h given directly cannot be computed again: apply asks for the same h (sha256-checked)."""
    import bitalloc
    from bitalloc.checkpoints import open_source

    with open_source(model_dir) as source:
        h = {name: torch.rand(source.shape(name)[1]) + 0.5 for name in source.modules()}
    table = bitalloc.profile(model_dir, None, configs=CONFIGS.split(","), rank=4, iters=1, quiet=True,
                             column_weights=h)  # fmt: skip
    plan = bitalloc.plan(table, 3.0)
    assert plan.calibration["text"] == "column_weights"
    with pytest.raises(BitallocError, match="give the same ones again"):
        bitalloc.apply(model_dir, plan, tmp_path / "out", quiet=True)
    other = {name: value * 2 for name, value in h.items()}
    with pytest.raises(BitallocError, match="not the plan's"):
        bitalloc.apply(model_dir, plan, tmp_path / "out", quiet=True, column_weights=other)
    bitalloc.apply(model_dir, plan, tmp_path / "out", quiet=True, column_weights=h)
    assert len(adapter(tmp_path / "out")) == 2 * len(plan.modules)
