"""Every CLI result has an API twin that reaches the same bytes (the library owns every
decision: defaults, cache names, sweep names, side files)."""

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
from _models import make_tiny_llama

import bitalloc
from bitalloc.cli import main
from bitalloc.export import export
from bitalloc.planning.pipeline import CACHE_FOLDER, PlanConstraints, plan_files

CONFIGS = "nf2-b64-s8b256,nf4-b64-s8b256,nf3-b128-sfp16"
OPTIONS = dict(configs=CONFIGS.split(","), rank=4, iters=1)
CLI_OPTIONS = ["--configs", CONFIGS, "--rank", "4", "--iters", "1", "--quiet"]


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("twins")
    make_tiny_llama(root / "model", shard_size=None)
    return root / "model"


def test_profile_cli_and_api_give_the_same_table(model_dir, tmp_path):
    assert main(["profile", str(model_dir), "-o", str(tmp_path / "cli.parquet"), *CLI_OPTIONS]) == 0
    api = bitalloc.profile(model_dir, tmp_path / "api.parquet", quiet=True, **OPTIONS)
    cli = bitalloc.read_profile(tmp_path / "cli.parquet")
    pd.testing.assert_frame_equal(cli, bitalloc.read_profile(tmp_path / "api.parquet"))
    pd.testing.assert_frame_equal(cli, api)


def test_plan_from_a_model_cli_and_api_write_the_same_files(model_dir, tmp_path):
    (tmp_path / "cli").mkdir()
    (tmp_path / "api").mkdir()
    args = ["plan", str(model_dir), "--budget", "3", "--tie", r"layers\.(\d+)\.self_attn\.(?:q|k|v)_proj"]
    assert main([*args, "-o", str(tmp_path / "cli" / "plan.json"), *CLI_OPTIONS]) == 0
    run = plan_files(
        model_dir, budget=3, output=tmp_path / "api" / "plan.json", quiet=True,
        constraints=PlanConstraints(tie=(r"layers\.(\d+)\.self_attn\.(?:q|k|v)_proj",)), **OPTIONS,
    )  # fmt: skip
    cli_files = sorted(p.name for p in (tmp_path / "cli").iterdir())
    assert cli_files == sorted(p.name for p in (tmp_path / "api").iterdir())
    caches = [sorted(p.name for p in (tmp_path / side / CACHE_FOLDER).iterdir()) for side in ("cli", "api")]
    assert caches[0] == caches[1] and any(n.startswith("profile-") for n in caches[0])  # the same cache name
    assert digest(tmp_path / "cli" / "plan.json") == digest(run.paths[0])


def test_sweep_cli_and_api_write_the_same_files(model_dir, tmp_path):
    table = bitalloc.profile(model_dir, tmp_path / "p.parquet", quiet=True, **OPTIONS)
    assert len(table)
    (tmp_path / "cli").mkdir()
    out = tmp_path / "cli" / "plan.json"
    assert (
        main(["plan", "--profile", str(tmp_path / "p.parquet"), "--sweep", "2.5:3.5:0.5", "-o", str(out)])
        == 0
    )
    run = plan_files(
        profile_path=tmp_path / "p.parquet", budgets="2.5:3.5:0.5", output=tmp_path / "plan.json"
    )
    assert [p.name for p in run.paths] == ["plan-2.5.json", "plan-3.json", "plan-3.5.json"]
    for path in run.paths:
        assert digest(path) == digest(tmp_path / "cli" / path.name)


def test_apply_and_export_cli_and_api_write_the_same_bytes(model_dir, tmp_path):
    table = bitalloc.profile(model_dir, tmp_path / "p.parquet", quiet=True, **OPTIONS)
    bitalloc.plan(table, 3.0).save(tmp_path / "plan.json")
    common = ["--plan", str(tmp_path / "plan.json"), "--quiet", "--device", "cpu"]
    assert main(["apply", str(model_dir), *common, "-o", str(tmp_path / "cli")]) == 0
    bitalloc.apply(model_dir, tmp_path / "plan.json", tmp_path / "api", device="cpu", quiet=True)
    for part in ("quantized/bitalloc-model.safetensors", "adapter/adapter_model.safetensors"):
        assert digest(tmp_path / "cli" / part) == digest(tmp_path / "api" / part)
    cli_config = json.loads((tmp_path / "cli" / "adapter" / "adapter_config.json").read_text())
    api_config = json.loads((tmp_path / "api" / "adapter" / "adapter_config.json").read_text())
    cli_config.pop("base_model_name_or_path")
    api_config.pop("base_model_name_or_path")
    assert cli_config == api_config
    assert (
        main(["export", str(tmp_path / "plan.json"), "--to", "gptqmodel", "-o", str(tmp_path / "g.json")])
        == 0
    )
    assert export(tmp_path / "plan.json", "gptqmodel").text == (tmp_path / "g.json").read_text()
