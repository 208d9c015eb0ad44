"""The profiler: table contents, agreement with the LoftQ core, resume, torchrun, bad input."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
from _models import llama_module_names, make_tiny_gguf, make_tiny_llama, tiny_llama

from bitalloc.checkpoints import open_source
from bitalloc.cli import main
from bitalloc.errors import BitallocError
from bitalloc.lora import loftq, module_seed
from bitalloc.profiling.distributed import split_by_cost
from bitalloc.profiling.profiler import profile
from bitalloc.profiling.settings import ProfileSettings
from bitalloc.profiling.table import REQUIRED_COLUMNS, read_profile

CONFIGS = ["nf2-b64-s8b256", "nf4-b128-sfp16"]
FAST = dict(configs=CONFIGS, rank=4, iters=2, quiet=True)
CLI_FAST = ["--configs", ",".join(CONFIGS), "--rank", "4", "--iters", "2", "--quiet"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    make_tiny_llama(directory, seed=1)
    return directory


@pytest.fixture(scope="module")
def tiny_table(tiny_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("out") / "profile.parquet"
    return profile(tiny_dir, output, **FAST), output


def test_table_columns_and_rows(tiny_table):
    table, _ = tiny_table
    assert set(REQUIRED_COLUMNS) <= set(table.columns)
    assert len(table) == 14 * len(CONFIGS)
    assert list(table["module"].unique()) == llama_module_names()
    row = table[(table.module == "model.layers.0.mlp.down_proj") & (table.config == "nf2-b64-s8b256")].iloc[0]
    assert row["shape"] == "128x256" and row["numel"] == 128 * 256
    assert row["storage_bits"] == 128 * 256 * 2 + 512 * 8 + 2 * 32  # 512 blocks, 2 groups
    assert row["bits_per_param"] == pytest.approx(2 + 8 / 64 + 32 / (64 * 256))
    assert (row["bits"], row["block_size"], row["method"], row["rank"], row["iters"]) == (2, 64, "nf", 4, 2)
    assert row["rel_error"] ** 2 == pytest.approx(row["error"] / row["weight_norm_sq"], rel=1e-9)
    assert bool((table["error"] < table["qlora_error"]).all())


def test_errors_agree_with_the_core(tiny_table, tiny_dir):
    table, _ = tiny_table
    model = tiny_llama(seed=1)
    weights = dict(model.named_parameters())
    for row in table.itertuples():
        weight = weights[row.module + ".weight"].detach()
        direct = loftq(weight, row.config, rank=4, iters=2, seed=module_seed(row.module, row.config))
        assert row.error == pytest.approx(direct.error, rel=1e-5)
        assert row.qlora_error == pytest.approx(direct.qlora_error, rel=1e-5)


def test_metadata_and_round_trip(tiny_table, tiny_dir, tmp_path):
    table, output = tiny_table
    again = read_profile(output)
    pd.testing.assert_frame_equal(again, table)
    with open_source(tiny_dir) as source:
        assert again.attrs["fingerprint"] == source.fingerprint()
        assert again.attrs["content_digest"] == source.content_digest()
    assert again.attrs["settings"] == {"configs": CONFIGS, "rank": 4, "iters": 2, "lowrank": "randomized"}
    assert again.attrs["objective"] == "weight"
    table.to_csv(tmp_path / "p.csv", index=False)
    assert read_profile(tmp_path / "p.csv")["error"].tolist() == table["error"].tolist()


def test_module_source_and_gguf_give_the_same_table(tiny_table, tmp_path):
    table, _ = tiny_table
    model = tiny_llama(seed=1)
    in_memory = profile(model, **FAST)
    pd.testing.assert_frame_equal(in_memory.drop(columns=[]), table, check_exact=False, rtol=1e-5)
    make_tiny_gguf(tmp_path / "tiny.gguf", model)
    from_gguf = profile(tmp_path / "tiny.gguf", **FAST)
    pd.testing.assert_frame_equal(from_gguf, table, check_exact=False, rtol=1e-5)


def test_rerun_is_up_to_date_and_settings_change_is_refused(tiny_table, tiny_dir, capsys):
    table, output = tiny_table
    before = output.read_bytes()
    assert (
        main(
            [
                "profile",
                str(tiny_dir),
                "-o",
                str(output),
                *CLI_FAST,
            ]
        )
        == 0
    )
    assert output.read_bytes() == before
    assert (
        main(
            [
                "profile",
                str(tiny_dir),
                "-o",
                str(output),
                "--configs",
                CONFIGS[0],
                "--rank",
                "4",
                "--iters",
                "2",
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "other settings (configs)" in err
    assert output.read_bytes() == before


def test_other_model_or_weights_are_refused(tiny_table, tmp_path, capsys):
    _, output = tiny_table
    before = output.read_bytes()
    other_shapes = tmp_path / "wide"
    make_tiny_llama(other_shapes, intermediate_size=384)
    other_weights = tmp_path / "reseeded"
    make_tiny_llama(other_weights, seed=7)
    args = ["-o", str(output), *CLI_FAST]
    assert main(["profile", str(other_shapes), *args]) == 2
    assert "another model" in capsys.readouterr().err
    assert main(["profile", str(other_weights), *args]) == 2
    assert "other weights" in capsys.readouterr().err
    assert output.read_bytes() == before


def test_resume_after_sigkill_gives_the_same_table(tmp_path):
    model_dir = tmp_path / "model"
    make_tiny_llama(
        model_dir,
        seed=3,
        num_hidden_layers=4,
        hidden_size=512,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=4,
        shard_size=None,
    )
    reference = profile(model_dir, **FAST)
    output = tmp_path / "killed.parquet"
    command = [
        sys.executable,
        "-m",
        "bitalloc",
        "profile",
        str(model_dir),
        "-o",
        str(output),
        *CLI_FAST,
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    process = subprocess.Popen(command, env=env)
    log = tmp_path / "killed.parquet.partial" / "rank-0.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not log.exists() or log.read_text().count("\n") < 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = log.read_text().count("\n")
    assert 3 <= done < 28 and not output.exists()
    with open(log, "a") as handle:  # a record cut short by the kill
        handle.write('{"module": "model.layers.3.mlp.up_proj", "ro')
    resumed = profile(model_dir, output, **FAST)
    pd.testing.assert_frame_equal(resumed, reference, check_exact=False, rtol=1e-5)
    assert not (tmp_path / "killed.parquet.partial").exists()
    pd.testing.assert_frame_equal(read_profile(output), reference, check_exact=False, rtol=1e-5)


def test_torchrun_two_ranks_equal_one(tiny_table, tiny_dir, tmp_path):
    table, _ = tiny_table
    output = tmp_path / "ranks.parquet"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        "29533",
        "-m",
        "bitalloc",
        "profile",
        str(tiny_dir),
        "-o",
        str(output),
        *CLI_FAST,
        "--device",
        "cpu",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    merged = read_profile(output)
    pd.testing.assert_frame_equal(merged, table, check_exact=False, rtol=1e-5)


def test_split_by_cost_balances(tiny_dir):
    with open_source(tiny_dir) as source:
        parts = split_by_cost(source.modules(), source, 3, 2)
        assert sorted(parts[0] + parts[1]) == sorted(source.modules())
        loads = [sum(source.shape(m)[0] * source.shape(m)[1] for m in part) for part in parts]
        assert abs(loads[0] - loads[1]) <= 128 * 256


def test_default_grid():
    grid = [str(c) for c in ProfileSettings().grid()]
    assert len(grid) == 12 and "nf2-b64-s8b256" in grid and "nf8-b128-s8b256" in grid
    assert [
        str(c)
        for c in ProfileSettings(bits=[3], block_sizes=[64], methods=["nf", "int"], scales=["fp16"]).grid()
    ] == [
        "int3-b64-sfp16",
        "nf3-b64-sfp16",
    ]


def test_demo_model_profile(demo_profile):
    assert demo_profile["module"].nunique() == 36
    assert demo_profile.attrs["source"] == "demo:all-MiniLM-L6-v2"
    nf2 = demo_profile[demo_profile.config == "nf2-b64-s8b256"]
    assert bool((nf2["rel_error"] <= 0.9 * (nf2["qlora_error"] / nf2["weight_norm_sq"]) ** 0.5).all())


def _corrupt(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("case", ["missing", "not-a-model", "truncated", "nan"])
def test_bad_input_exit_2_and_nothing_written(case, tmp_path, capsys):
    model_dir = tmp_path / "model"
    if case != "missing":
        model_dir.mkdir()
    if case in ("truncated", "nan"):
        model = tiny_llama()
        if case == "nan":
            with torch.no_grad():
                model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
        model.save_pretrained(model_dir)
        if case == "truncated":
            _corrupt(model_dir / "model.safetensors")
    output = tmp_path / "profile.parquet"
    output.write_text("earlier output")
    capsys.readouterr()
    code = main(
        ["profile", str(model_dir), "-o", str(output), "--configs", CONFIGS[0], "--quiet", "--overwrite"]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("bitalloc: error:") and "\n" not in err
    assert {
        "missing": "not found",
        "not-a-model": "no *.safetensors",
        "truncated": "model.safetensors",
        "nan": "NaN",
    }[case] in err
    assert output.read_text() == "earlier output"


def test_bad_settings():
    with pytest.raises(BitallocError, match="rank 300 exceeds"):
        profile(tiny_llama(), configs=CONFIGS, rank=300, quiet=True)
    with pytest.raises(ValueError, match="unsupported bits"):
        ProfileSettings(bits=[5], block_sizes=[64]).grid()
    assert json.loads(json.dumps(module_seed("a", "nf2-b64-s8b256"))) == module_seed("a", "nf2-b64-s8b256")


def test_an_older_profile_is_rechecked_by_its_sampled_digest(tmp_path):
    """Profiles written before digest format 2 recorded a sampled content digest: they are
    recognised, re-checked against it (reused when it matches), and refused on other weights."""
    from safetensors.torch import load_file, save_file

    from bitalloc.profiling.table import write_profile

    make_tiny_llama(tmp_path / "model", seed=1, shard_size=None)
    output = tmp_path / "p.parquet"
    table = profile(tmp_path / "model", output, **FAST)
    assert table.attrs["digest_format"] == 2 and len(table.attrs["tensor_digests"]) == 14
    for key in ("digest_format", "tensor_digests", "file_stats"):
        table.attrs.pop(key)
    table.attrs["content_digest"] = open_source(tmp_path / "model").legacy_content_digest()
    write_profile(table, output)
    again = profile(tmp_path / "model", output, **FAST)  # reused: no recomputation
    assert again["error"].tolist() == table["error"].tolist() and "digest_format" not in again.attrs
    weights = load_file(tmp_path / "model" / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] *= 2  # every sampled span changes
    save_file(weights, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BitallocError, match="other weights"):
        profile(tmp_path / "model", output, **FAST)


def test_a_single_edited_value_is_noticed(tmp_path):
    from safetensors.torch import load_file, save_file

    make_tiny_llama(tmp_path / "model", seed=1, shard_size=None)
    output = tmp_path / "p.parquet"
    profile(tmp_path / "model", output, **FAST)
    weights = load_file(tmp_path / "model" / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"][17, 5] += 1e-3  # one value of 14 matrices
    save_file(weights, tmp_path / "model" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(BitallocError, match="model.layers.1.mlp.up_proj changed"):
        profile(tmp_path / "model", output, **FAST)
    profile(tmp_path / "model", output, overwrite=True, **FAST)  # the way out the message names
