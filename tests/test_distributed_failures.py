"""torchrun: a failure on any rank, of any exception type, ends every rank with the same
one-line error and exit code 2 (no rank is left waiting in a collective). Two real
processes with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT on a free port,
gloo), each with a timeout, so that a hang fails the test instead of blocking it."""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _models import make_tiny_llama

# Rank FAIL_RANK raises a plain RuntimeError in the step named by FAIL_STEP.
SCRIPT = textwrap.dedent(
    """
    import os, sys
    import bitalloc.profiling.profiler as profiler
    from bitalloc.cli import main

    rank, step = int(os.environ["RANK"]), os.environ["FAIL_STEP"]
    fail = rank == int(os.environ["FAIL_RANK"])

    def broken(*args, **kwargs):
        raise RuntimeError("injected failure\\nsecond line")

    for name in ("_run_modules", "_assemble"):  # a rename must fail here, not pass silently
        assert callable(getattr(profiler, name)), name
    if fail and step == "run":
        profiler._run_modules = broken
    if fail and step == "merge":
        profiler._assemble = broken
    sys.exit(main(["profile", sys.argv[1], "-o", sys.argv[2], "--configs", "nf4-b32-sfp32", "--quiet"]))
    """
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    make_tiny_llama(root / "model", shard_size=None)
    (root / "fail.py").write_text(SCRIPT)
    return root


@pytest.mark.parametrize("fail_rank,step", [(1, "run"), (0, "run"), (0, "merge")])
def test_any_rank_failure_ends_every_rank(model, tmp_path, fail_rank, step):
    port = free_port()
    keep = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    procs = []
    for rank in range(2):
        env = dict(keep, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", OMP_NUM_THREADS="1")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FAIL_RANK=str(fail_rank), FAIL_STEP=step)
        command = [sys.executable, str(model / "fail.py"), str(model / "model"), str(tmp_path / "p.parquet")]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        procs.append(subprocess.Popen(command, env=env, **pipes))
    results = []
    try:
        for proc in procs:
            _, err = proc.communicate(timeout=240)
            results.append((proc.returncode, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    lines = [[line for line in err.splitlines() if line.startswith("bitalloc: error:")] for _, err in results]
    for code, err in results:
        assert code == 2, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
    assert len(lines[0]) == len(lines[1]) == 1 and lines[0] == lines[1], lines
    assert f"rank {fail_rank} of 2 failed: RuntimeError: injected failure second line" in lines[0][0]
    assert not (tmp_path / "p.parquet").exists()
