"""benchmarks/gpu_check.py --dry-run: the GPU check's code paths at tiny sizes on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "rows.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run(
        [sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads(out.read_text())
    checks = [row["check"][:3] for row in rows]
    assert checks == ["(a)", "(b)", "(c)", "(c)", "(c)", "(c)", "(d)"]
    assert all(row["ok"] for row in rows)
    assert "1 passed" in rows[0]["figure"]
    assert "2 layers, 12 configs, output, T=5" in rows[1]["check"]
    assert [row["check"].split()[-1] for row in rows[2:6]] == [
        "nn.Linear", "nf2-b64-s8b256", "nf3-b64-s8b256", "nf4-b64-s8b256",
    ]  # fmt: skip
    assert all(row["seconds"] > 0 for row in rows)
    assert rows[6]["figure"] == "max relative difference 0.00e+00"  # the CPU against itself
    table = done.stdout.splitlines()
    assert table[1].startswith("check") and len(table) == 2 + len(rows)
