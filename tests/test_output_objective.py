"""The output objective: full input covariances H, streamed to a file, through profile,
plan and apply (which must reproduce the profiled decomposition exactly)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from _models import llama_module_names, make_tiny_gguf, make_tiny_llama
from safetensors import safe_open

from bitalloc.checkpoints import open_source
from bitalloc.errors import BitallocError
from bitalloc.lora import loftq, module_seed
from bitalloc.planning.plan_file import Plan
from bitalloc.planning.planner import plan
from bitalloc.profiling.calibration import Covariances, calibrate, calibration_path, weighting
from bitalloc.profiling.profiler import profile

NAMES = llama_module_names()
CONFIGS = ["nf2-b64-s8b256", "nf3-b64-s8b256", "nf4-b128-s8b256"]
FAST = dict(configs=CONFIGS, rank=4, iters=2, quiet=True)


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (6, 64), generator=torch.Generator().manual_seed(seed))


def direct_covariances(model, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """XᵀX/n of every Linear's input from one whole-model forward, in float64."""
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x

        return record

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in NAMES]
    with torch.no_grad():
        model(input_ids)
    for handle in handles:
        handle.remove()
    return {name: total / input_ids.numel() for name, total in sums.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    model = make_tiny_llama(directory, seed=1)
    return directory, model.eval()


@pytest.fixture(scope="module")
def output_profile(tiny, tmp_path_factory):
    directory, _ = tiny
    output = tmp_path_factory.mktemp("profile") / "profile.parquet"
    table = profile(directory, output, calibration_ids=ids(), **FAST)
    return table, output


def test_covariances_match_a_whole_model_computation_and_share_inputs(tiny, tmp_path):
    directory, model = tiny
    expected = direct_covariances(model, ids())
    for where in (model, directory):
        found = calibrate(where, NAMES, input_ids=ids(), covariance=True).covariances
        assert sorted(found) == sorted(NAMES)
        for name in NAMES:
            torch.testing.assert_close(found[name].double(), expected[name], rtol=1e-5, atol=1e-6)
    gguf = tmp_path / "tiny.gguf"
    make_tiny_gguf(gguf, model)
    found = calibrate(gguf, NAMES, input_ids=ids(), covariance=True, path=tmp_path / "h.safetensors")
    for name in NAMES:
        torch.testing.assert_close(found.covariances[name].double(), expected[name], rtol=1e-4, atol=1e-5)
    # q/k/v read one tensor and gate/up another: one stored H each, 4 per layer
    groups = found.covariances.groups
    for layer in (0, 1):
        attention = {groups[f"model.layers.{layer}.self_attn.{p}_proj"] for p in "qkv"}
        mlp = {groups[f"model.layers.{layer}.mlp.{p}_proj"] for p in ("gate", "up")}
        assert len(attention) == 1 and len(mlp) == 1
    with safe_open(str(tmp_path / "h.safetensors"), framework="pt") as handle:
        assert len(list(handle.keys())) == 8
        sizes = {k: handle.get_slice(k).get_shape() for k in handle.keys()}
    assert sizes["model.layers.0.mlp.down_proj"] == [256, 256]  # d_in of down_proj: the intermediate size
    assert sizes["model.layers.0.self_attn.q_proj"] == [128, 128]


def test_covariances_are_written_one_block_at_a_time(tiny, tmp_path, monkeypatch):
    """Each block's H leave memory (to the writer) before the next block runs."""
    import bitalloc.profiling.calibration as calibration_module

    directory, _ = tiny
    events: list[str] = []
    real_add = calibration_module.CovarianceWriter.add

    def add(self, key, covariance, modules):
        events.append(f"write {key.split('.')[2]}")
        return real_add(self, key, covariance, modules)

    real_run = calibration_module.run_blocks

    def run_blocks(net, input_ids, modules, on_block, **kwargs):
        def spy(prefix, block):
            hooks = on_block(prefix, block)
            events.append(f"run {prefix.split('.')[2]}")
            return hooks

        return real_run(net, input_ids, modules, spy, **kwargs)

    monkeypatch.setattr(calibration_module.CovarianceWriter, "add", add)
    monkeypatch.setattr(calibration_module, "run_blocks", run_blocks)
    calibrate(directory, NAMES, input_ids=ids(), covariance=True, path=tmp_path / "h.safetensors")
    assert events == ["run 0"] + ["write 0"] * 4 + ["run 1"] + ["write 1"] * 4


def test_profile_plan_and_apply_reproduce_the_decomposition_exactly(tiny, output_profile, tmp_path):
    from bitalloc.artifacts.writer import apply

    directory, model = tiny
    table, output = output_profile
    assert table.attrs["objective"] == "output"
    info = table.attrs["calibration"]
    assert info["statistic"] == "covariance" and info["lambda"] == 0.01
    assert bool((table["weighted_error"] > 0).all())
    # the profile's weighted error is the true output error on the calibration tokens (λ aside)
    covariances = Covariances(calibration_path(output), info["digest"], damping=0.01)
    source = open_source(directory)
    name, config = "model.layers.1.self_attn.o_proj", CONFIGS[1]
    seed = module_seed(name, config)
    result = loftq(source.read(name), config, 4, 2, seed=seed, **weighting(covariances, name))
    row = table[(table.module == name) & (table.config == config)].iloc[0]
    assert row["weighted_error"] == pytest.approx(result.weighted_error, rel=1e-6)
    exact = loftq(
        source.read(name), config, 4, 2, seed=module_seed(name, config),
        input_covariance=direct_covariances(model, ids())[name].float(), damping=0.0,
    )  # fmt: skip
    assert exact.weighted_error < row["weighted_error"] * 1.05
    assert exact.weighted_error > row["weighted_error"] * 0.95

    chosen = plan(table, 3.2)
    assert chosen.objective == "output" and chosen.calibration["lambda"] == 0.01
    saved = chosen.save(tmp_path / "plan.json")
    data = json.loads(saved.read_text())
    assert data["format"] == "bitalloc.plan/v2" and data["calibration"]["statistic"] == "covariance"
    # move the plan with its side file: apply finds H beside it and checks its digest
    moved = tmp_path / "moved"
    moved.mkdir()
    os.replace(saved, moved / "plan.json")
    os.replace(calibration_path(saved), calibration_path(moved / "plan.json"))
    apply(directory, moved / "plan.json", tmp_path / "out", quiet=True)
    adapter = {}
    with safe_open(str(tmp_path / "out/adapter/adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            adapter[key] = handle.get_tensor(key)
    for name, config in chosen.assignments.items():
        expected = loftq(
            source.read(name), config, 4, 2, seed=module_seed(name, config), lora_alpha=4,
            **weighting(covariances, name),
        )  # fmt: skip
        row = table[(table.module == name) & (table.config == config)].iloc[0]
        assert expected.weighted_error == pytest.approx(row["weighted_error"], rel=1e-6)
        a = adapter[f"base_model.model.{name}.lora_A.weight"]
        b = adapter[f"base_model.model.{name}.lora_B.weight"]
        assert torch.equal(a, expected.lora_A.to(a.dtype)) and torch.equal(b, expected.lora_B.to(b.dtype))


def test_damping_is_part_of_the_profile_and_changes_the_result(tiny, output_profile, tmp_path):
    directory, _ = tiny
    table, output = output_profile
    other = profile(directory, tmp_path / "p.parquet", calibration_ids=ids(), damping=0.1, **FAST)
    assert other.attrs["calibration"]["lambda"] == 0.1
    assert not other["weighted_error"].equals(table["weighted_error"])
    with pytest.raises(BitallocError, match="other settings"):
        profile(directory, output, calibration_ids=ids(), damping=0.1, **FAST)
    with pytest.raises(BitallocError, match="damping"):
        profile(directory, tmp_path / "q.parquet", calibration_ids=ids(), damping=-0.5, **FAST)


def test_objectives_resolve_and_diagonal_remains_an_option(tiny, tmp_path):
    directory, _ = tiny
    output = tmp_path / "a.parquet"
    diagonal = profile(directory, output, calibration_ids=ids(), objective="activation", **FAST)
    assert diagonal.attrs["objective"] == "activation"
    assert "statistic" not in diagonal.attrs["calibration"]
    with pytest.raises(BitallocError, match="diagonal"):
        ones = {n: torch.ones(64) for n in NAMES}
        profile(directory, None, objective="output", column_weights=ones, **FAST)


def test_tampered_or_missing_covariances_are_refused(output_profile, tmp_path):
    table, output = output_profile
    chosen = plan(table, 3.2)
    saved = chosen.save(tmp_path / "plan.json")
    side = calibration_path(saved)
    data = bytearray(side.read_bytes())
    data[-1] ^= 1
    side.unlink()  # may be a hard link to the profile's file: never edit it in place
    side.write_bytes(bytes(data))
    with pytest.raises(BitallocError, match="does not hold"):
        Plan.load(saved).input_statistics()
    side.unlink()
    with pytest.raises(BitallocError, match="cannot be read"):
        Plan.load(saved).input_statistics()
    assert calibration_path(output).is_file()  # the profile's own file was never touched


def test_version_1_plans_still_load(output_profile, tmp_path):
    table, _ = output_profile
    weight_only = table.drop(columns="weighted_error")
    weight_only.attrs = {k: v for k, v in table.attrs.items() if k != "calibration"} | {"objective": "weight"}
    weight_plan = plan(weight_only, 3.2)
    text = weight_plan.to_json().replace("bitalloc.plan/v2", "bitalloc.plan/v1")
    assert Plan.from_json(text).assignments == weight_plan.assignments


def test_cli_output_objective_damping_and_bad_combinations(tmp_path, capsys):
    from test_calibration import byte_tokenizer

    from bitalloc.cli import main
    from bitalloc.profiling.table import read_profile
    from bitalloc.texts import calibration_text

    model_dir = tmp_path / "model"
    make_tiny_llama(model_dir, seed=2)
    byte_tokenizer(model_dir)
    text = tmp_path / "notes.txt"
    text.write_text(calibration_text()[:3000], encoding="utf-8")
    common = ["--configs", ",".join(CONFIGS), "--rank", "4", "--iters", "1", "--quiet"]
    out = tmp_path / "profile.parquet"
    base = [
        "profile",
        str(model_dir),
        "-o",
        str(out),
        "--calibration",
        str(text),
        "--calibration-tokens",
        "512",
    ]
    assert main([*base, "--damping", "0.05", *common]) == 0
    attrs = read_profile(out).attrs
    assert attrs["objective"] == "output" and attrs["calibration"]["lambda"] == 0.05
    plan_path = tmp_path / "plan.json"
    assert main(["plan", "--profile", str(out), "--budget", "3", "-o", str(plan_path)]) == 0
    data = json.loads(plan_path.read_text())
    assert data["objective"] == "output" and data["calibration"]["lambda"] == 0.05
    assert (
        main(["apply", str(model_dir), "--plan", str(plan_path), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    )
    capsys.readouterr()
    before = sorted(p.name for p in tmp_path.iterdir())
    for args, message in (
        (
            [*base[:3], str(tmp_path / "w.parquet"), "--objective", "weight", "--layer-weights"],
            "layer weights",
        ),
        ([*base[:3], str(tmp_path / "d.parquet"), "--calibration", str(text), "--damping", "-1"], "damping"),
        (
            [*base[:3], str(tmp_path / "t.parquet"), "--calibration", str(text), "--layer-tokens", "0"],
            "layer_tokens",
        ),
    ):
        assert main([*args, *common]) == 2, args
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("bitalloc: error:") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
