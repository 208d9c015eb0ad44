"""Classes of hostile input that used to end in a traceback, a lost or wrong result, or work
thrown away, each driven through the CLI (the harness and runner of
tests/test_bad_input.py: one ``bitalloc: error:`` line, exit 2, no traceback, the folder
byte-for-byte unchanged, so nothing was started), plus tests of what the command
line cannot arrange (a full disk, counting profiler calls, tokenizer prefixes).
See docs/reliability.md, "Hostile classes".
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from _models import make_tiny_llama
from safetensors.torch import load_file, save_file
from test_bad_input import FAST, run, snapshot
from test_calibration import byte_tokenizer

import bitalloc
from bitalloc.cli import main

APPLY = ["apply", "model", "--plan", "plan.json", "-o", "out", "--quiet"]
EVAL = ["eval", "tmodel", "--plan", "plan.json", "--tokens", "64", "--context", "32", "--quiet"]
CALIBRATED = ["profile", "tmodel", "--calibration", "default", *FAST]
NON_UTF8 = "x\udcff"  # the bytes b"x\xff" as Python keeps a non-UTF-8 file name


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny llama without a tokenizer (``model``) and the same weights with one
    (``tmodel``), a weight-only profile and plan, an eval result and a data-aware CSV profile."""
    folder = tmp_path_factory.mktemp("hostile-base")
    make_tiny_llama(folder / "model", shard_size=None)
    make_tiny_llama(folder / "tmodel", shard_size=None)
    byte_tokenizer(folder / "tmodel")
    (folder / "empty.txt").write_text("")
    (folder / "blank.txt").write_text("  \n\n\t \n")
    steps = [
        ["profile", "model", "-o", "p.parquet", *FAST],
        ["plan", "--profile", "p.parquet", "--budget", "3", "-o", "plan.json"],
        [*EVAL, "-o", "eval.json"],
        [*CALIBRATED, "-o", "d.csv", "--calibration-tokens", "128"],
    ]
    for args in steps:
        result = run(folder, *args)
        assert result.returncode == 0, result.stderr
    return folder


# ---- setups ---------------------------------------------------------------------------------
def edit_json(name: str, edit: Callable[[dict], None]):
    def setup(folder: Path) -> None:
        data = json.loads((folder / name).read_text())
        edit(data)
        (folder / name).write_text(json.dumps(data, indent=2))

    return setup


def bad_config(model: str, edit: Callable[[dict], None]):
    return edit_json(f"{model}/config.json", edit)


def nan_in_eval(folder: Path) -> None:
    data = json.loads((folder / "eval.json").read_text())
    data["results"]["loftq"]["perplexity"] = 12345.5
    (folder / "eval.json").write_text(json.dumps(data).replace("12345.5", "NaN", 1))


def overflow_in_eval(folder: Path) -> None:
    """1e999 is valid JSON syntax and reads as inf."""
    text = (folder / "eval.json").read_text()
    (folder / "eval.json").write_text(text.replace('"perplexity": ', '"perplexity": 1e999, "p": ', 1))


def csv_without_metadata(folder: Path) -> None:
    lines = (folder / "d.csv").read_text().splitlines(keepends=True)
    assert lines[0].startswith("# bitalloc: ")
    (folder / "d.csv").write_text("".join(lines[1:]))


def extra_tensor(name: str):
    def setup(folder: Path) -> None:
        file = folder / "model" / "model.safetensors"
        tensors = load_file(file)
        tensors[name] = torch.arange(16, dtype=torch.float32)
        save_file(tensors, file, metadata={"format": "pt"})

    return setup


def nothing(folder: Path) -> None:
    pass


@dataclass
class Case:
    name: str
    args: list[str]
    message: str
    setup: Callable[[Path], None] = nothing


def no_model_type(config: dict) -> None:
    del config["model_type"]


CASES = [
    # tracebacks: configs transformers cannot read, for every command that builds the model
    Case("config-unknown-type-apply", APPLY, "model_type",
         bad_config("model", lambda c: c.update(model_type="nosuchmodel"))),
    Case("config-no-type-apply", APPLY, "model_type", bad_config("model", no_model_type)),
    Case("config-no-type-eval", EVAL, "model_type", bad_config("tmodel", no_model_type)),
    Case("config-no-type-calibration", [*CALIBRATED, "-o", "x.parquet"], "model_type",
         bad_config("tmodel", no_model_type)),
    # empty or blank texts (calibration, evaluation)
    Case("calibration-empty", ["profile", "tmodel", "-o", "x.parquet", "--calibration", "empty.txt", *FAST],
         "empty or only whitespace"),
    Case("calibration-blank", ["profile", "tmodel", "-o", "x.parquet", "--calibration", "blank.txt", *FAST],
         "empty or only whitespace"),
    Case("plan-calibration-blank", ["plan", "tmodel", "--budget", "3", "--calibration", "blank.txt", *FAST],
         "empty or only whitespace"),
    Case("eval-text-empty", [*EVAL, "--text", "empty.txt"], "empty or only whitespace"),
    # devices that compute nothing, for every command with --device
    Case("device-meta-profile", ["profile", "model", "-o", "x.parquet", "--device", "meta", *FAST], "device"),
    Case("device-meta-apply", [*APPLY, "--device", "meta"], "device"),
    Case("device-meta-eval", [*EVAL, "--device", "meta"], "device"),
    Case("device-other-type", ["profile", "model", "-o", "x.parquet", "--device", "ipu", *FAST], "device"),
    # output names that cannot be recorded: refused before the work, for every command
    Case("non-utf8-profile", ["profile", "model", "-o", f"{NON_UTF8}.parquet", *FAST], "UTF-8"),
    Case("non-utf8-plan-model", ["plan", "model", "--budget", "3", "-o", f"{NON_UTF8}.json", *FAST], "UTF-8"),
    Case("non-utf8-plan", ["plan", "--profile", "p.parquet", "--budget", "3", "-o", f"{NON_UTF8}.json"],
         "UTF-8"),
    Case("non-utf8-apply", ["apply", "model", "--plan", "plan.json", "-o", NON_UTF8, "--quiet"], "UTF-8"),
    Case("non-utf8-eval", [*EVAL, "-o", f"{NON_UTF8}.json"], "UTF-8"),
    Case("non-utf8-export", ["export", "plan.json", "--to", "llamacpp", "-o", f"{NON_UTF8}.txt"], "UTF-8"),
    Case("non-utf8-report", ["report", "p.parquet", "-o", NON_UTF8], "UTF-8"),
    # plan iterations edited by hand: LoftQ drifts to NaN, and each costs a factorization
    Case("plan-huge-iters-apply", APPLY, "iters",
         edit_json("plan.json", lambda d: d["defaults"].update(iters=100000))),
    Case("plan-huge-iters-eval", EVAL, "iters",
         edit_json("plan.json", lambda d: d["defaults"].update(iters=100000))),
    # exit 0 with a wrong or lost result
    Case("sweep-duplicate-budget", ["plan", "--profile", "p.parquet", "--sweep", "3,2.5,3.0", "-o", "s.json"],
         "twice"),
    Case("lora-alpha-tiny", [*APPLY, "--lora-alpha", "1e-300"], "lora_alpha"),
    Case("lora-alpha-huge", [*APPLY, "--lora-alpha", "1e308"], "lora_alpha"),
    Case("lora-alpha-rslora-tiny", [*APPLY, "--lora-alpha", "1e-40", "--use-rslora"], "lora_alpha"),
    Case("report-eval-nan", ["report", "eval.json", "-o", "rep"], "non-finite", nan_in_eval),
    Case("report-eval-overflow", ["report", "eval.json", "-o", "rep"], "non-finite", overflow_in_eval),
    # CSV profiles: a data-aware CSV whose metadata is gone is not planned weight-only
    Case("csv-data-aware-without-metadata", ["plan", "--profile", "d.csv", "--budget", "3", "-o", "dp.json"],
         "weighted_error", csv_without_metadata),
    # checked before the work: a tensor the model has no place for
    Case("extra-tensor-apply", APPLY, "no place", extra_tensor("model.layers.0.mystery.weight")),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_hostile_class(case: Case, base: Path, tmp_path: Path):
    folder = tmp_path / "work"
    shutil.copytree(base, folder, symlinks=True)
    case.setup(folder)
    before = snapshot(folder)
    result = run(folder, *case.args)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("bitalloc: error:")]
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert len(errors) == 1, result.stderr
    assert case.message.lower() in errors[0].lower(), errors[0]
    assert snapshot(folder) == before, "a refused command changed the folder (work was started)"


# ---- the valid side of the same classes ------------------------------------------------------
def test_sweep_budgets_that_print_alike_get_one_file_each(base, tmp_path):
    folder = tmp_path / "work"
    shutil.copytree(base, folder, symlinks=True)
    budgets = [3 + k * 1e-7 for k in range(1, 7)]  # all "3" with {:g}
    result = run(folder, "plan", "--profile", "p.parquet", "--sweep", ",".join(map(repr, budgets)),
                 "-o", "s.json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    written = sorted(folder.glob("s-*.json"))
    assert len(written) == 6
    assert sorted(json.loads(p.read_text())["budget"]["target_bits"] for p in written) == budgets


def test_csv_profile_keeps_its_metadata(base, tmp_path):
    folder = tmp_path / "work"
    shutil.copytree(base, folder, symlinks=True)
    parquet, csv = bitalloc.read_profile(folder / "p.parquet"), None
    assert run(folder, "profile", "model", "-o", "w.csv", *FAST).returncode == 0
    again = run(folder, "profile", "model", "-o", "w.csv", *FAST)  # the same command twice: reused
    assert again.returncode == 0, again.stderr
    csv = bitalloc.read_profile(folder / "w.csv")
    assert csv.attrs == parquet.attrs | {"file_stats": csv.attrs["file_stats"]}
    # a data-aware CSV profile is planned data-aware
    result = run(folder, "plan", "--profile", "d.csv", "--budget", "3", "-o", "dp.json")
    assert result.returncode == 0, result.stderr
    assert json.loads((folder / "dp.json").read_text())["objective"] == "output"


def test_old_rotary_buffers_are_accepted_and_left_out(base, tmp_path):
    folder = tmp_path / "work"
    shutil.copytree(base, folder, symlinks=True)
    extra_tensor("model.layers.0.self_attn.rotary_emb.inv_freq")(folder)
    result = run(folder, *APPLY)
    assert result.returncode == 0, result.stderr
    model = bitalloc.load_quantized(folder / "out" / "quantized")
    assert any(isinstance(m, bitalloc.QuantLinear) for m in model.modules())
    files = list((folder / "out" / "quantized").glob("*.safetensors"))
    assert files
    assert not any("rotary_emb" in name for file in files for name in load_file(file))


# ---- in process --------------------------------------------------------------------------------
def test_full_disk_during_apply_is_one_line_and_no_output(base, tmp_path, monkeypatch, capsys):
    """safetensors reports ENOSPC as a SafetensorError: it must end as one line, exit 2, and
    nothing renamed into place (the per-matrix work is kept for a resume)."""
    import safetensors.torch
    from safetensors import SafetensorError

    real, calls = safetensors.torch.save_file, []

    def full_after_three(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_after_three)
    out = tmp_path / "out"
    args = ["apply", str(base / "model"), "--plan", str(base / "plan.json"), "-o", str(out), "--quiet"]
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("bitalloc: error:")]
    assert len(lines) == 1 and "No space left on device" in lines[0], err
    assert not out.exists()
    assert len(calls) == 4
    monkeypatch.setattr(safetensors.torch, "save_file", real)  # the disk has room again: resumes
    assert main(args) == 0
    assert bitalloc.load_quantized(out / "quantized") is not None


def test_save_safetensors_raises_the_os_error(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    from bitalloc.fileio import save_safetensors

    def full(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as info:
        save_safetensors({"a": torch.zeros(2)}, tmp_path / "a.safetensors")
    assert info.value.errno == errno.ENOSPC


def test_replanning_does_not_profile_again(base, tmp_path, monkeypatch):
    """The profile cache is keyed by the model and the settings, not the plan's name."""
    import bitalloc.profiling.profiler as profiler
    from bitalloc.planning.pipeline import plan_files

    real, calls = profiler.decompose, []

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(profiler, "decompose", counted)
    options = dict(configs=["nf2-b64-s8b256", "nf4-b64-s8b256"], rank=4, iters=1, quiet=True)
    plan_files(base / "model", budget=3.5, output=tmp_path / "plan.json", **options)
    first = len(calls)
    assert first > 0
    plan_files(base / "model", budget=3, output=tmp_path / "plan4.json", **options)
    assert len(calls) == first  # another name and budget: the same profile, not measured again
    plan_files(base / "model", budget=3, output=tmp_path / "plan-r2.json", **{**options, "rank": 2})
    assert len(calls) > first  # another setting: profiled
    assert not list((base / "model").glob("*.parquet"))  # nothing written beside the model
