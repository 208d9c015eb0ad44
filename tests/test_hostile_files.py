"""Files the user owns, driven through the CLI as a hostile user would.

- Outputs never overwrite inputs: every command counts as inputs every file it reads,
  including the config and tokenizer beside a MODEL given as one .safetensors file, the
  eval text, and an applied folder's parts (`checkpoints.model_input_files`).
- A report only ever replaces its own files.
- Files bitalloc wrote into a model folder never block a rerun, and its side files are
  never read as shards of the model.
- apply's final rename and clean-up are crash-safe; SIGTERM stops as Ctrl-C does.
- ``apply --verify`` re-hashes the weights of the matrices a resume keeps.

The table's harness is test_bad_input's: one ``bitalloc: error:`` line, exit 2, no
traceback, and the folder's paths, bytes and links unchanged. See docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _models import make_tiny_llama
from safetensors.torch import load_file, save_file
from test_bad_input import FAST, run, snapshot
from test_eval import byte_tokenizer

import bitalloc

EVAL = ["--tokens", "64", "--context", "16", "--quiet"]
WEIGHT_ONLY = [*FAST, "--objective", "weight"]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny llama with a tokenizer, its profile, a 3-bit plan, the plan applied (out/), an
    evaluation text and a report (rep/)."""
    folder = tmp_path_factory.mktemp("hostile-files")
    make_tiny_llama(folder / "model", shard_size=None, seed=1, initializer_range=0.05)
    byte_tokenizer(folder / "model")
    for args in (
        ["profile", "model", "-o", "p.parquet", *FAST],
        ["plan", "--profile", "p.parquet", "--budget", "3", "-o", "plan.json"],
        ["apply", "model", "--plan", "plan.json", "-o", "out", "--quiet"],
        ["report", "p.parquet", "plan.json", "-o", "rep"],
    ):
        result = run(folder, *args)
        assert result.returncode == 0, (args, result.stderr)
    (folder / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 20)
    return folder


def copy(base: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "work"
    shutil.copytree(base, folder, symlinks=True)
    return folder


def one_error(result: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("bitalloc: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def add_file(name: str, text: str = "the user's own notes\n"):
    def setup(folder: Path) -> None:
        (folder / name).write_text(text)

    return setup


def nothing(folder: Path) -> None:
    pass


def assert_loads(out: Path) -> None:
    model = bitalloc.load_quantized(out / "quantized")
    planned = json.loads((out / "quantized" / "bitalloc_plan.json").read_text())["modules"]
    assert sum(isinstance(m, bitalloc.QuantLinear) for m in model.modules()) == len(planned)


# (name, args, text the error line contains, setup)
REFUSED = [
    # eval -o over anything eval reads
    ("eval-over-weights", ["eval", "model", "--plan", "plan.json", "-o", "model/model.safetensors", *EVAL],
     "input", nothing),
    ("eval-over-config", ["eval", "model", "--plan", "plan.json", "-o", "model/config.json", *EVAL],
     "input", nothing),
    ("eval-over-tokenizer", ["eval", "model", "--plan", "plan.json", "-o", "model/tokenizer.json", *EVAL],
     "input", nothing),
    ("eval-over-text", ["eval", "model", "--plan", "plan.json", "--text", "text.txt", "-o", "text.txt",
                        *EVAL], "input", nothing),
    ("eval-applied-over-its-plan", ["eval", "out", "--reference", "model", "-o",
                                    "out/quantized/bitalloc_plan.json", *EVAL], "input", nothing),
    ("eval-applied-over-adapter", ["eval", "out", "--reference", "model", "-o",
                                   "out/adapter/adapter_model.safetensors", *EVAL], "input", nothing),
    ("eval-applied-over-reference", ["eval", "out", "--reference", "model", "-o", "model/config.json",
                                     *EVAL], "input", nothing),
    ("eval-over-model-via-symlink", ["eval", "model", "--plan", "plan.json", "-o", "link.json", *EVAL],
     "input", lambda f: os.symlink("model/config.json", f / "link.json")),
    # MODEL given as one .safetensors file: the config and tokenizer beside it are inputs
    ("profile-file-model-over-config", ["profile", "model/model.safetensors", "-o", "model/config.json",
                                        "--overwrite", *FAST], "input", nothing),
    ("plan-file-model-over-config", ["plan", "model/model.safetensors", "--budget", "3", "-o",
                                     "model/config.json", *WEIGHT_ONLY], "input", nothing),
    ("plan-file-model-over-tokenizer", ["plan", "model/model.safetensors", "--budget", "3", "-o",
                                        "model/tokenizer_config.json", *WEIGHT_ONLY], "input", nothing),
    ("plan-model-over-generation-config", ["plan", "model", "--budget", "3", "-o",
                                           "model/generation_config.json", *WEIGHT_ONLY], "input", nothing),
    ("eval-file-model-over-tokenizer", ["eval", "model/model.safetensors", "--plan", "plan.json", "-o",
                                        "model/tokenizer_config.json", *EVAL], "input", nothing),
    # apply and export
    ("apply-over-config", ["apply", "model", "--plan", "plan.json", "-o", "model/config.json", "--quiet"],
     "exists", nothing),
    ("export-over-plan", ["export", "plan.json", "--to", "gptqmodel", "-o", "plan.json"], "plan", nothing),
    # report: never deletes a file it did not write
    ("report-over-user-file", ["report", "p.parquet", "plan.json", "-o", "rep"], "notes.txt",
     add_file("rep/notes.txt")),
    ("report-over-user-folder", ["report", "p.parquet", "-o", "rep"], "mine",
     lambda f: ((f / "rep" / "mine").mkdir(), add_file("rep/mine/a.txt")(f))),
    ("report-over-model-folder", ["report", "p.parquet", "-o", "model"], "not written by", nothing),
]  # fmt: skip


@pytest.mark.parametrize("name,args,message,setup", REFUSED, ids=[case[0] for case in REFUSED])
def test_refused_and_nothing_changed(name, args, message, setup, base, tmp_path):
    folder = copy(base, tmp_path)
    setup(folder)
    before = snapshot(folder)
    line = one_error(run(folder, *args))
    assert message.lower() in line.lower(), line
    assert snapshot(folder) == before, "a refused command changed the folder"


def test_a_second_report_replaces_its_own_files_only(base, tmp_path):
    folder = copy(base, tmp_path)
    listed = json.loads((folder / "rep" / ".bitalloc-report").read_text())["files"]
    assert "README.md" in listed and "frontier.png" in listed
    result = run(folder, "report", "p.parquet", "-o", "rep")  # fewer figures than before
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (folder / "rep").iterdir() if p.name != ".bitalloc-report") == sorted(
        json.loads((folder / "rep" / ".bitalloc-report").read_text())["files"]
    )


# ---- outputs bitalloc wrote into a model folder ------------------------------------------
def test_plan_into_the_model_folder_reruns(base, tmp_path):
    """`plan MODEL -o MODEL/plan.json` (data-aware: its side file lands in MODEL too), twice."""
    folder = copy(base, tmp_path)
    args = ["plan", "model", "--budget", "3", "-o", "model/plan.json", *FAST, "--calibration-tokens", "256"]
    first = run(folder, *args)
    assert first.returncode == 0, first.stderr
    written = (folder / "model" / "plan.json").read_bytes()
    second = run(folder, *args)
    assert "Traceback" not in second.stderr, second.stderr
    assert second.returncode == 0, second.stderr
    assert (folder / "model" / "plan.json").read_bytes() == written  # the same inputs: the same plan


def test_side_files_in_a_model_folder_are_not_shards(tmp_path):
    """A folder without model.safetensors or an index reads every *.safetensors as a shard,
    except bitalloc's own side files (by name, or by the ``bitalloc`` header metadata)."""
    from bitalloc.checkpoints import SafetensorsSource, model_input_files

    model = tmp_path / "model"
    make_tiny_llama(model, shard_size=None)
    os.rename(model / "model.safetensors", model / "weights.safetensors")
    names = SafetensorsSource(model).tensor_names()
    stray = {"model.layers.0.self_attn.q_proj": load_file(model / "weights.safetensors")[
        "model.layers.0.self_attn.q_proj.weight"][0].contiguous()}  # fmt: skip
    save_file(stray, model / "plan.calibration.safetensors", metadata={"bitalloc": "{}"})
    save_file(stray, model / "renamed-side-file.safetensors", metadata={"bitalloc": "{}"})
    source = SafetensorsSource(model)
    assert source.tensor_names() == names
    inputs = {p.name for p in model_input_files(model)}
    assert "weights.safetensors" in inputs and "config.json" in inputs
    assert not inputs & {"plan.calibration.safetensors", "renamed-side-file.safetensors"}


def test_model_input_files_lists_what_the_readers_read(base):
    from bitalloc.checkpoints import model_input_files

    by_folder = {p.name for p in model_input_files(base / "model")}
    by_file = {p.name for p in model_input_files(base / "model" / "model.safetensors")}
    assert by_folder == by_file
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= by_folder  # fmt: skip


# ---- apply: crash-safe finish, SIGTERM, --verify ------------------------------------------
def _killed(monkeypatch, target, attribute: str, after: int = 0):
    """Make ``target.attribute`` raise KeyboardInterrupt (a kill) on its call number after+1."""
    real, calls = getattr(target, attribute), []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) > after:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(target, attribute, dies)


def test_kill_during_the_final_clean_up_then_rerun_finishes_it(base, tmp_path, monkeypatch):
    from bitalloc.fileio import WorkFolder

    folder = copy(base, tmp_path)
    _killed(monkeypatch, WorkFolder, "remove")
    with pytest.raises(KeyboardInterrupt):
        bitalloc.apply(folder / "model", folder / "plan.json", folder / "new", quiet=True)
    monkeypatch.undo()
    assert (folder / "new").is_dir() and (folder / "new.partial").is_dir()
    built = snapshot(folder / "new")
    result = run(folder, "apply", "model", "--plan", "plan.json", "-o", "new", "--quiet")
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr
    assert "already complete" in result.stderr
    assert not (folder / "new.partial").exists()
    assert snapshot(folder / "new") == built  # untouched by the rerun
    # a rerun now: the output exists, nothing is left to finish
    assert "already exists" in one_error(run(folder, "apply", "model", "--plan", "plan.json", "-o", "new"))


def test_kill_while_deleting_the_work_folder_leaves_nothing_behind(base, tmp_path, monkeypatch):
    from bitalloc.fileio import WorkFolder

    folder = copy(base, tmp_path)
    real = WorkFolder.sweep

    def dies_after_the_rename(path):  # the work folder is renamed to its trash: killed there
        if WorkFolder.trash_path(path).is_dir():
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(WorkFolder, "sweep", staticmethod(dies_after_the_rename))
    with pytest.raises(KeyboardInterrupt):
        bitalloc.apply(folder / "model", folder / "plan.json", folder / "new", quiet=True)
    monkeypatch.undo()
    trash = WorkFolder.trash_path(folder / "new.partial")
    assert (trash / WorkFolder.MARKER).is_file() and not (folder / "new.partial").exists()
    built = snapshot(folder / "new")
    assert "already exists" in one_error(run(folder, "apply", "model", "--plan", "plan.json", "-o", "new"))
    assert not trash.exists() and not (folder / "new.partial").exists()
    assert snapshot(folder / "new") == built


def test_a_users_folder_named_like_the_trash_is_never_deleted(tmp_path):
    from bitalloc.fileio import WorkFolder

    trash = WorkFolder.trash_path(tmp_path / "x.partial")
    trash.mkdir()
    (trash / "precious.txt").write_text("mine")
    WorkFolder(tmp_path / "x.partial").open().remove()
    assert (trash / "precious.txt").read_text() == "mine"


SIGTERM_DURING_APPLY = """
import os, signal, sys
import bitalloc.artifacts.writer as writer
from bitalloc.cli import main
real, calls = writer.decompose, []
def loftq(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)
writer.decompose = loftq
sys.exit(main(["apply", "model", "--plan", "plan.json", "-o", "new", "--quiet"]))
"""


def test_sigterm_stops_like_ctrl_c_and_the_rerun_resumes(base, tmp_path):
    folder = copy(base, tmp_path)
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error"}
    result = subprocess.run([sys.executable, "-c", SIGTERM_DURING_APPLY], cwd=folder, capture_output=True,
                            text=True, env=env, timeout=300)  # fmt: skip
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 143, (result.returncode, result.stderr)
    assert [line for line in result.stderr.splitlines() if line.startswith("bitalloc:")] == [
        "bitalloc: interrupted (a rerun of the same command resumes)"
    ]
    done = list((folder / "new.partial" / "matrices").glob("*.safetensors"))
    assert len(done) == 2 and not list((folder / "new.partial" / "matrices").glob(".*"))
    rerun = run(folder, "apply", "model", "--plan", "plan.json", "-o", "new", "--quiet")
    assert rerun.returncode == 0, rerun.stderr
    assert_loads(folder / "new")


def _interrupted_apply(folder: Path, monkeypatch) -> str:
    """apply killed after its first matrix; returns that matrix's name."""
    import bitalloc.artifacts.writer as writer

    _killed(monkeypatch, writer, "decompose", after=1)
    with pytest.raises(KeyboardInterrupt):
        bitalloc.apply(folder / "model", folder / "plan.json", folder / "new", quiet=True)
    monkeypatch.undo()
    return next(iter(json.loads((folder / "plan.json").read_text())["modules"]))


def _edit_keeping_size_and_time(folder: Path, module: str) -> None:
    file = folder / "model" / "model.safetensors"
    stat = file.stat()
    tensors = load_file(file)
    tensors[f"{module}.weight"][:2] *= 1.5
    save_file(tensors, file, metadata={"format": "pt"})
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file.stat().st_size == stat.st_size


def test_apply_verify_refuses_work_from_weights_edited_in_place(base, tmp_path, monkeypatch):
    folder = copy(base, tmp_path)
    module = _interrupted_apply(folder, monkeypatch)
    _edit_keeping_size_and_time(folder, module)
    before = snapshot(folder)
    line = one_error(run(folder, "apply", "model", "--plan", "plan.json", "-o", "new", "--verify", "--quiet"))
    assert "other weights" in line and module in line, line
    assert snapshot(folder) == before
    with pytest.raises(bitalloc.BitallocError, match="other weights"):  # the API twin
        bitalloc.apply(folder / "model", folder / "plan.json", folder / "new", quiet=True, verify=True)


def test_apply_verify_resumes_unchanged_weights(base, tmp_path, monkeypatch):
    folder = copy(base, tmp_path)
    _interrupted_apply(folder, monkeypatch)
    result = run(folder, "apply", "model", "--plan", "plan.json", "-o", "new", "--verify", "--quiet")
    assert result.returncode == 0, result.stderr
    assert_loads(folder / "new")
