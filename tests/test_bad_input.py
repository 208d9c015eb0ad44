"""The CLI as a hostile user drives it, from a table of cases.

Each case builds a folder (a tiny model, its profile and plan, and whatever the case
breaks), runs one command there and checks the outcome it states:

- ``error``: exit 2, exactly one ``bitalloc: error:`` line on stderr that contains the
  expected text, and the folder is byte-for-byte what it was (same paths, bytes, links);
- ``warn``: exit 0 with a ``bitalloc: warning:`` line, and the output loads;
- ``ok``: exit 0 and the output loads.

No case may print a Python traceback. See docs/reliability.md for the rules.

``run`` drives ``bitalloc.cli.main`` in this process by default: the same argument parsing,
error handling and exit codes as ``python -m bitalloc`` (whose ``__main__`` is only
``sys.exit(main())``), without paying a Python + torch + transformers start-up per case.
An exception that escapes ``main`` is printed as the interpreter would (a ``Traceback``)
with exit 1, so the no-traceback assertions keep their meaning. ``test_subprocess_smoke``
runs a few cases as real subprocesses, and ``BITALLOC_TEST_SUBPROCESS=1`` runs them all so.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from _models import make_tiny_llama
from safetensors.torch import load_file, save_file

FAST = ["--configs", "nf2-b64-s8b256,nf4-b64-s8b256", "--rank", "4", "--iters", "1", "--quiet"]
Q_PROJ = "model.layers.0.self_attn.q_proj"
FIRST = "model.layers.0.mlp.down_proj"  # the first matrix profiled (natural order)


SUBPROCESS = os.environ.get("BITALLOC_TEST_SUBPROCESS") == "1"
DISTRIBUTED = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def run(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """``bitalloc ARGS`` run in ``folder``: in this process, or a subprocess (see above)."""
    return run_subprocess(folder, *args) if SUBPROCESS else run_in_process(folder, *args)


def run_subprocess(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(DISTRIBUTED)}
    env["TRANSFORMERS_VERBOSITY"] = "error"
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    return subprocess.run(
        [sys.executable, "-m", "bitalloc", *args],
        cwd=folder,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def run_in_process(folder: Path, *args: str) -> subprocess.CompletedProcess:
    from bitalloc.cli import main

    out, err = io.StringIO(), io.StringIO()
    cwd = os.getcwd()
    hidden = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(DISTRIBUTED)}
    try:
        os.chdir(folder)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            # a fresh interpreter's filters (mutating them also resets the once-per-location
            # registries, so a warning shown in an earlier case is shown again)
            warnings.resetwarnings()
            warnings.simplefilter("default")
            for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", category)
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse: usage errors exit 2, --help exits 0
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            except BaseException:  # noqa: BLE001 - what the interpreter would print
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(cwd)
        os.environ.update(hidden)
    return subprocess.CompletedProcess(["bitalloc", *args], code, out.getvalue(), err.getvalue())


def snapshot(folder: Path) -> dict[str, tuple]:
    """Every path below ``folder``: a link's target, a file's sha256, or 'dir' / 'fifo'."""
    state = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = ("link", os.readlink(path))
        elif path.is_dir():
            state[key] = ("dir",)
        elif path.is_file():
            state[key] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            state[key] = ("other",)
    return state


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A tiny llama (no tokenizer: weight-only plans), its profile and a 3-bit plan."""
    folder = tmp_path_factory.mktemp("bad-input-base")
    make_tiny_llama(folder / "model", shard_size=None)
    assert run(folder, "profile", "model", "-o", "p.parquet", *FAST).returncode == 0
    assert run(folder, "plan", "--profile", "p.parquet", "--budget", "3", "-o", "plan.json").returncode == 0
    return folder


# ---- setups: each edits a fresh copy of the base folder ------------------------------------
def edit_plan(edit: Callable[[dict], None], text: Callable[[str], str] | None = None):
    def setup(folder: Path) -> None:
        data = json.loads((folder / "plan.json").read_text())
        edit(data)
        out = json.dumps(data, indent=2)
        (folder / "plan.json").write_text(text(out) if text else out)

    return setup


def scale_rows(folder: Path, module: str = Q_PROJ) -> None:
    """Rescale a few rows of one matrix in place (same size, same header): other weights."""
    file = folder / "model" / "model.safetensors"
    tensors = load_file(file)
    tensors[f"{module}.weight"][:3] *= 1.5
    save_file(tensors, file, metadata={"format": "pt"})


def set_weight(name: str, value: Callable[[torch.Tensor], torch.Tensor]):
    def setup(folder: Path) -> None:
        file = folder / "model" / "model.safetensors"
        tensors = load_file(file)
        tensors[name] = value(tensors[name])
        save_file(tensors, file, metadata={"format": "pt"})
        for stale in ("p.parquet", "plan.json"):
            (folder / stale).unlink()

    return setup


def with_trailing_bytes(folder: Path) -> None:
    with open(folder / "model" / "model.safetensors", "ab") as handle:
        handle.write(b"\0" * 64)


def truncated_gguf(folder: Path) -> None:
    data = (folder / "model" / "model.safetensors").read_bytes()
    (folder / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + data[:100])


def interrupted_profile_with(line: bytes):
    """A profile killed after its first matrix (its resume log has one record), then a bad
    line appended to the log."""

    def setup(folder: Path) -> None:
        import bitalloc.profiling.profiler as profiler

        real, calls = profiler.decompose, []

        def dies_on_the_second_matrix(*args, **kwargs):
            calls.append(1)
            if len(calls) > 2:  # two configs per matrix
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        profiler.decompose = dies_on_the_second_matrix
        try:
            with pytest.raises(KeyboardInterrupt):
                profiler.profile(folder / "model", folder / "new.parquet", configs=FAST[1].split(","), rank=4,
                                 iters=1, quiet=True)  # fmt: skip
        finally:
            profiler.decompose = real
        with open(folder / "new.parquet.partial" / "rank-0.jsonl", "ab") as handle:
            handle.write(line)

    return setup


def user_folder(name: str):
    def setup(folder: Path) -> None:
        (folder / name).mkdir()
        (folder / name / "precious.txt").write_text("the user's own file\n")

    return setup


def fifo(name: str):
    def setup(folder: Path) -> None:
        os.mkfifo(folder / name)

    return setup


def symlink(name: str, target: str):
    def setup(folder: Path) -> None:
        os.symlink(target, folder / name)

    return setup


def locked_work_folder(name: str):
    """A second process: the work folder exists and its lock is held by this test."""

    def setup(folder: Path) -> None:
        from bitalloc.fileio import WorkFolder

        LOCKS.append(WorkFolder(folder / name).open())

    return setup


LOCKS: list = []


def nothing(folder: Path) -> None:
    pass


@dataclass
class Case:
    name: str
    args: list[str]
    expect: str  # error | warn | ok
    message: str = ""
    setup: Callable[[Path], None] = nothing
    check: Callable[[Path], None] | None = None
    extra: dict = field(default_factory=dict)


def loads_profile(path: str):
    def check(folder: Path) -> None:
        from bitalloc.profiling.table import read_profile

        table = read_profile(folder / path)
        assert (
            table[["error", "rel_error", "qlora_error"]]
            .map(float)
            .map(lambda v: v == v and abs(v) < 1e300)
            .all()
            .all()
        )

    return check


def loads_quantized(folder: Path) -> None:
    import bitalloc

    model = bitalloc.load_quantized(folder / "out" / "quantized")
    assert any(isinstance(m, bitalloc.QuantLinear) for m in model.modules())
    json.loads((folder / "out" / "quantized" / "bitalloc_quant.json").read_text())  # strict JSON


PROFILE = ["profile", "model", "-o", "new.parquet", *FAST]
APPLY = ["apply", "model", "--plan", "plan.json", "-o", "out", "--quiet"]

CASES = [
    # grid typos and bounds
    Case(
        "configs-garbage", ["profile", "model", "-o", "x.parquet", "--configs", "garbage"], "error", "garbage"
    ),
    Case("bits-5", ["profile", "model", "-o", "x.parquet", "--bits", "5"], "error", "bits 5"),
    Case("method-fp", ["profile", "model", "-o", "x.parquet", "--method", "fp"], "error", "fp"),
    Case("scales-9b9", ["profile", "model", "-o", "x.parquet", "--scales", "9b9"], "error", "9b9"),
    Case("block-0", ["profile", "model", "-o", "x.parquet", "--block-sizes", "0"], "error", "block"),
    Case("block-huge", ["profile", "model", "-o", "x.parquet", "--block-sizes", "1000000"], "error", "block"),
    Case("rank-negative", [*PROFILE, "--rank", "-1"], "error", "rank"),
    Case("rank-float", ["profile", "model", "-o", "x.parquet", "--rank", "4.5"], "error", "rank"),
    Case("rank-too-big", [*PROFILE, "--rank", "999"], "error", "rank 999"),
    Case("device-missing-gpu", [*PROFILE, "--device", "cuda:7"], "error", "CUDA"),
    Case("sweep-huge", ["plan", "--profile", "p.parquet", "--sweep", "2:1e9:1e-9"], "error", "1,000"),
    Case("plan-no-budget", ["plan", "model"], "error", "budget"),
    Case(
        "plan-profile-with-settings",
        [
            "plan",
            "--profile",
            "p.parquet",
            "--budget",
            "3",
            "--configs",
            "garbage",
            "--rank",
            "999",
            "--device",
            "cuda:7",
        ],
        "error",
        "do not apply",
    ),  # fmt: skip
    # outputs that are inputs or not files
    Case(
        "profile-over-model",
        ["profile", "model", "-o", "model/model.safetensors", "--overwrite", *FAST],
        "error",
        "input",
    ),  # fmt: skip
    Case(
        "plan-over-profile",
        ["plan", "--profile", "p.parquet", "--budget", "3", "-o", "p.parquet"],
        "error",
        "input",
    ),
    Case(
        "output-symlink-to-model",
        ["profile", "model", "-o", "link.parquet", "--overwrite", *FAST],
        "error",
        "input",
        symlink("link.parquet", "model/model.safetensors"),
    ),  # fmt: skip
    Case(
        "output-fifo",
        ["plan", "--profile", "p.parquet", "--budget", "3", "-o", "fifo.json"],
        "error",
        "not a regular file",
        fifo("fifo.json"),
    ),  # fmt: skip
    Case(
        "output-directory",
        ["plan", "--profile", "p.parquet", "--budget", "3", "-o", "model"],
        "error",
        "folder",
    ),
    Case(
        "output-under-a-file",
        ["plan", "--profile", "p.parquet", "--budget", "3", "-o", "plan.json/x.json"],
        "error",
        "",
    ),  # fmt: skip
    Case("user-partial-folder", APPLY, "error", "not made by bitalloc", user_folder("out.partial")),
    Case("partial-is-a-file", APPLY, "error", "not a folder", lambda f: (f / "out.partial").write_text("x")),
    Case("second-process", APPLY, "error", "another bitalloc process", locked_work_folder("out.partial")),
    # changed inputs
    Case(
        "edited-weights-reuse",
        ["profile", "model", "-o", "p.parquet", *FAST],
        "error",
        "other weights",
        scale_rows,
    ),  # fmt: skip
    Case(
        "edited-weights-resume",
        PROFILE,
        "error",
        "other weights",
        lambda f: (interrupted_profile_with(b"")(f), scale_rows(f, FIRST)),
    ),  # fmt: skip
    Case(
        "resume-other-include",
        [*PROFILE, "--include", r"layers\.1\."],
        "error",
        "other matrices",
        interrupted_profile_with(b""),
    ),  # fmt: skip
    Case("resume-log-null", PROFILE, "error", "not a profile record", interrupted_profile_with(b"null\n")),
    Case(
        "resume-log-garbage",
        PROFILE,
        "error",
        "not a profile record",
        interrupted_profile_with(b"{garbage\n"),
    ),
    # corrupt checkpoints: profile and apply reject them alike
    Case("trailing-bytes-profile", PROFILE, "error", "after the last tensor", with_trailing_bytes),
    Case("trailing-bytes-apply", APPLY, "error", "after the last tensor", with_trailing_bytes),
    Case(
        "corrupt-config-profile",
        PROFILE,
        "error",
        "config.json",
        lambda f: (f / "model" / "config.json").write_text("{not json"),
    ),  # fmt: skip
    Case(
        "corrupt-config-apply",
        APPLY,
        "error",
        "config.json",
        lambda f: (f / "model" / "config.json").write_text("{not json"),
    ),  # fmt: skip
    Case(
        "truncated-gguf", ["profile", "model.gguf", "-o", "x.parquet", *FAST], "error", "GGUF", truncated_gguf
    ),
    Case("empty-matrix", PROFILE, "error", "empty", set_weight(f"{Q_PROJ}.weight", lambda t: t[:0])),
    # bad plans and LoRA settings
    Case("lora-alpha-0", [*APPLY, "--lora-alpha", "0"], "error", "lora_alpha"),
    Case("lora-alpha-nan", [*APPLY, "--lora-alpha", "nan"], "error", "lora_alpha"),
    Case("lora-alpha-inf", [*APPLY, "--lora-alpha", "inf"], "error", "lora_alpha"),
    Case("lora-alpha-negative", [*APPLY, "--lora-alpha", "-5"], "error", "lora_alpha"),
    Case(
        "plan-nan-error",
        APPLY,
        "error",
        "NaN",
        edit_plan(
            lambda d: next(iter(d["modules"].values())).update(error=0.5),
            lambda t: t.replace('"error": 0.5', '"error": NaN', 1),
        ),
    ),  # fmt: skip
    Case(
        "plan-stale-scale",
        APPLY,
        "error",
        "scale",
        edit_plan(lambda d: next(iter(d["modules"].values()))["scale"].update(bits=4)),
    ),  # fmt: skip
    Case("plan-missing-module", APPLY, "error", "by hand", edit_plan(lambda d: d["modules"].pop(Q_PROJ))),
    Case("plan-not-linear", APPLY, "error", "not a Linear", lambda f: _embedding_plan(f)),
    Case(
        "plan-format-version",
        APPLY,
        "error",
        "format",
        edit_plan(lambda d: d.update(format="bitalloc.plan/v9")),
    ),
    Case("export-unknown-target", ["export", "plan.json", "--to", "nothing"], "error", "nothing"),
    # degenerate but valid input: defined numbers, a warning
    Case(
        "zero-matrix",
        PROFILE,
        "warn",
        "all zeros",
        set_weight(f"{Q_PROJ}.weight", torch.zeros_like),
        loads_profile("new.parquet"),
    ),  # fmt: skip
    Case(
        "huge-outlier",
        PROFILE,
        "ok",
        "",
        set_weight(f"{Q_PROJ}.weight", lambda t: t.index_fill(0, torch.tensor([0]), 3.8e36)),
        loads_profile("new.parquet"),
    ),  # fmt: skip
    # configs that used to write unloadable output
    Case(
        "float-scales-apply",
        ["apply", "model", "--plan", "fp.json", "-o", "out", "--quiet"],
        "ok",
        "",
        lambda f: _plan_for(f, "nf4-b64-sfp32,int3-b32-sbf16", "fp.json"),
        loads_quantized,
    ),  # fmt: skip
    Case(
        "rank-0-apply",
        ["apply", "model", "--plan", "r0.json", "-o", "out", "--quiet"],
        "ok",
        "",
        lambda f: _plan_for(f, "nf2-b64-s8b256,nf4-b64-s8b256", "r0.json", rank=0),
        lambda f: (loads_quantized(f), _assert_no_adapter(f)),
    ),  # fmt: skip
]


def _plan_for(folder: Path, configs: str, name: str, rank: int = 4) -> None:
    args = ["--configs", configs, "--rank", str(rank), "--iters", "1", "--quiet"]
    assert run(folder, "profile", "model", "-o", f"{name}.parquet", *args).returncode == 0
    assert run(folder, "plan", "--profile", f"{name}.parquet", "--budget", "9", "-o", name).returncode == 0


def _embedding_plan(folder: Path) -> None:
    """An honest route to a plan naming a non-Linear matrix: profile --include embed_tokens."""
    args = ["--include", "embed_tokens", *FAST]
    assert run(folder, "profile", "model", "-o", "embed.parquet", *args).returncode == 0
    assert (
        run(folder, "plan", "--profile", "embed.parquet", "--budget", "9", "-o", "plan.json").returncode == 0
    )


def _assert_no_adapter(folder: Path) -> None:
    assert not (folder / "out" / "adapter").exists()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: Case, base: Path, tmp_path: Path):
    check_case(case, base, tmp_path, run)


# one case of each outcome through a real ``python -m bitalloc`` (the in-process runner's twin)
SMOKE = ["rank-negative", "zero-matrix"]


@pytest.mark.parametrize("name", SMOKE)
def test_subprocess_smoke(name: str, base: Path, tmp_path: Path):
    (case,) = [c for c in CASES if c.name == name]
    check_case(case, base, tmp_path, run_subprocess)


def check_case(case: Case, base: Path, tmp_path: Path, runner) -> None:
    folder = tmp_path / "work"
    shutil.copytree(base, folder, symlinks=True)
    case.setup(folder)
    before = snapshot(folder)
    try:
        result = runner(folder, *case.args)
    finally:
        while LOCKS:
            LOCKS.pop().close()
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("bitalloc: error:")]
    if case.expect == "error":
        assert result.returncode == 2, (result.returncode, result.stderr)
        assert len(errors) == 1, result.stderr
        assert case.message.lower() in errors[0].lower(), errors[0]
        assert snapshot(folder) == before, "a failed command changed the folder"
        return
    assert result.returncode == 0, result.stderr
    assert not errors
    if case.expect == "warn":
        assert any(
            line.startswith("bitalloc: warning:") and case.message in line
            for line in result.stderr.splitlines()
        ), result.stderr
    if case.check is not None:
        case.check(folder)
