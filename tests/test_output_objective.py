"""The output objective: full input covariances H, computed block by block, through profile,
plan and apply (which computes them again and must reproduce the profiled decomposition)."""

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
from bitalloc.profiling.calibration import calibrate, weighting
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
    found = calibrate(gguf, NAMES, input_ids=ids(), covariance=True).covariances
    for name in NAMES:
        torch.testing.assert_close(found[name].double(), expected[name], rtol=1e-4, atol=1e-5)
    # q/k/v read one tensor and gate/up another: one H each (the same tensor), 4 per layer
    for layer in (0, 1):
        attention = {id(found[f"model.layers.{layer}.self_attn.{p}_proj"]) for p in "qkv"}
        mlp = {id(found[f"model.layers.{layer}.mlp.{p}_proj"]) for p in ("gate", "up")}
        assert len(attention) == 1 and len(mlp) == 1
    assert len({id(h) for h in found.values()}) == 8
    assert tuple(found["model.layers.0.mlp.down_proj"].shape) == (256, 256)  # d_in: the intermediate size
    assert tuple(found["model.layers.0.self_attn.q_proj"].shape) == (128, 128)
    assert not list(tmp_path.glob("*.safetensors"))  # nothing is written


def test_covariances_leave_memory_one_block_at_a_time(tiny, tmp_path, monkeypatch):
    """Each block's H go to the consumer (the profile's matrices of that block) and are dropped
    before the next block runs: the profile measures block 0's matrices before block 1 runs."""
    import bitalloc.profiling.profiler as profiler_module
    from bitalloc.checkpoints.runnable import BlockRunner

    directory, _ = tiny
    events: list[str] = []
    real_step = BlockRunner.step

    def step(self, index, *args, **kwargs):
        events.append(f"run {index}")
        return real_step(self, index, *args, **kwargs)

    real_run = profiler_module._run_modules

    def run(context, modules, statistics=None, **kwargs):
        events.append("profile " + ",".join(sorted({m.split(".")[2] for m in modules})))
        assert sorted(statistics) == sorted(modules)  # only this block's statistics are handed over
        return real_run(context, modules, statistics, **kwargs)

    monkeypatch.setattr(BlockRunner, "step", step)
    monkeypatch.setattr(profiler_module, "_run_modules", run)
    profile(directory, tmp_path / "p.parquet", calibration_ids=ids(), **FAST)
    assert events == ["run 0", "profile 0", "run 1", "profile 1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.parquet"]  # no statistics on disk


def test_profile_plan_and_apply_reproduce_the_decomposition_exactly(tiny, output_profile, tmp_path):
    from bitalloc.artifacts.writer import apply

    directory, model = tiny
    table, output = output_profile
    assert table.attrs["objective"] == "output"
    info = table.attrs["calibration"]
    assert info["statistic"] == "covariance" and info["lambda"] == 0.01
    assert bool((table["weighted_error"] > 0).all())
    # the profile's weighted error is the true output error on the calibration tokens (λ aside)
    covariances = calibrate(directory, NAMES, input_ids=ids(), covariance=True).covariances
    source = open_source(directory)
    name, config = "model.layers.1.self_attn.o_proj", CONFIGS[1]
    seed = module_seed(name, config)
    result = loftq(source.read(name), config, 4, 2, seed=seed, weighting=weighting(covariances, name))
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
    assert data["calibration"]["text_sha256"] == data["calibration"]["ids_sha256"]  # 2-D ids: as given
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json"]  # self-contained: no side file
    # move the plan alone: apply computes H again from the same ids, given again
    moved = tmp_path / "moved"
    moved.mkdir()
    os.replace(saved, moved / "plan.json")
    with pytest.raises(BitallocError, match="give the same ids again"):
        apply(directory, moved / "plan.json", tmp_path / "out", quiet=True)
    with pytest.raises(BitallocError, match="not the plan's"):
        apply(directory, moved / "plan.json", tmp_path / "out", quiet=True, calibration_ids=ids(seed=5))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    apply(directory, moved / "plan.json", tmp_path / "out", quiet=True, calibration_ids=ids())
    adapter = {}
    with safe_open(str(tmp_path / "out/adapter/adapter_model.safetensors"), framework="pt") as handle:
        for key in handle.keys():
            adapter[key] = handle.get_tensor(key)
    for name, config in chosen.assignments.items():
        expected = loftq(
            source.read(name), config, 4, 2, seed=module_seed(name, config), lora_alpha=4,
            weighting=weighting(covariances, name),
        )  # fmt: skip
        row = table[(table.module == name) & (table.config == config)].iloc[0]
        assert expected.weighted_error == pytest.approx(row["weighted_error"], rel=1e-6)
        a = adapter[f"base_model.model.{name}.lora_A.weight"]
        b = adapter[f"base_model.model.{name}.lora_B.weight"]
        # same ids, same code: H equal to float rounding (identical on one machine and thread
        # count), so the factors are the profiled ones
        torch.testing.assert_close(a, expected.lora_A.to(a.dtype), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b, expected.lora_B.to(b.dtype), rtol=1e-4, atol=1e-6)


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


def test_plans_of_earlier_versions_compute_their_statistics_again(tiny, output_profile, tmp_path):
    """A plan written before statistics were recomputed records the sha256 of its side file
    (digest) and no ids_sha256: it still applies (its side file is not read), from the same
    ids; a hand-edited record without its data is one clear error."""
    from bitalloc.artifacts.writer import apply

    directory, _ = tiny
    table, _ = output_profile
    data = json.loads(plan(table, 3.2).to_json())
    data["calibration"].pop("ids_sha256")
    data["calibration"]["digest"] = "0" * 64
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    (tmp_path / "old.calibration.safetensors").write_bytes(b"not read any more")
    apply(directory, old, tmp_path / "out", quiet=True, calibration_ids=ids())
    new = tmp_path / "new"
    apply(directory, plan(table, 3.2), new, quiet=True, calibration_ids=ids())
    part = "adapter/adapter_model.safetensors"
    with safe_open(str(tmp_path / "out" / part), "pt") as a, safe_open(str(new / part), "pt") as b:
        for key in a.keys():
            torch.testing.assert_close(a.get_tensor(key), b.get_tensor(key), rtol=1e-5, atol=1e-7)
    data["calibration"] = {"digest": "0" * 64}
    old.write_text(json.dumps(data))
    with pytest.raises(BitallocError, match="does not record its calibration data"):
        apply(directory, old, tmp_path / "out2", quiet=True)
    assert not (tmp_path / "out2").exists()


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
    assert data["calibration"]["text_path"] == str(text.resolve())
    assert not list(tmp_path.glob("*.safetensors"))  # no statistics on disk
    assert (
        main(["apply", str(model_dir), "--plan", str(plan_path), "-o", str(tmp_path / "out"), "--quiet"]) == 0
    )
    # the text moved: apply says which text it needs; given it (checked by sha256), it works
    moved = tmp_path / "texts"
    moved.mkdir()
    os.replace(text, moved / "notes.txt")
    capsys.readouterr()
    apply_args = ["apply", str(model_dir), "--plan", str(plan_path), "--quiet"]
    assert main([*apply_args, "-o", str(tmp_path / "o2")]) == 2
    assert "notes.txt" in capsys.readouterr().err and not (tmp_path / "o2").exists()
    assert main([*apply_args, "-o", str(tmp_path / "o2"), "--calibration", str(plan_path)]) == 2
    assert "is not the plan's calibration text" in capsys.readouterr().err
    assert main([*apply_args, "-o", str(tmp_path / "o2"), "--calibration", str(moved / "notes.txt")]) == 0
    os.replace(moved / "notes.txt", text)
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


def test_load_input_statistics_computes_the_profiles_statistics_again(tiny, output_profile):
    from bitalloc.profiling.calibration import load_input_statistics

    directory, _ = tiny
    table, output = output_profile
    with pytest.raises(BitallocError, match="give the same ids again"):
        load_input_statistics(output, directory)
    found = load_input_statistics(output, directory, input_ids=ids())
    expected = calibrate(directory, NAMES, input_ids=ids(), covariance=True).covariances
    assert sorted(found) == sorted(NAMES) and found.damping == 0.01
    for name in NAMES:
        torch.testing.assert_close(found[name], expected[name], rtol=1e-6, atol=1e-9)
    assert weighting(found, NAMES[0]).damping == 0.01
