"""The built wheel holds every file the package reads: each non-Python file under
bitalloc/ is in it, and a plan saves and loads (its JSON schema is package data) with the
package imported from the unpacked wheel, from a folder outside the repository.
`.ci/run` also installs the wheel in a fresh venv and runs the quickstart."""

import json
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_has_every_data_file_and_plans_load_from_it(tmp_path):
    source = tmp_path / "src"  # a clean copy: no stale build/ can add or hide files
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "bitalloc", source / "bitalloc", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
         str(source), "-w", str(tmp_path / "dist")],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("bitalloc-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        archive.extractall(tmp_path / "site")
    data = {
        str(path.relative_to(source)) for path in (source / "bitalloc").rglob("*")
        if path.is_file() and path.suffix not in (".py", ".pyc")
    }  # fmt: skip
    assert "bitalloc/planning/plan.schema.json" in data
    assert data <= names, f"missing from the wheel: {sorted(data - names)}"
    script = textwrap.dedent(
        """
        import sys
        import bitalloc
        assert bitalloc.__file__.startswith(sys.argv[1]), bitalloc.__file__
        plan = bitalloc.Plan.load("plan.json")
        plan.save("copy.json")
        again = bitalloc.Plan.load("copy.json")
        assert again.assignments == plan.assignments
        print(len(again.assignments), "matrices")
        """
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    golden = json.loads((ROOT / "tests" / "data" / "golden.json").read_text())
    (work / "plan.json").write_text(json.dumps(golden["demo_plan"]))  # a weight-only plan
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path / "site")}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "site")], cwd=work, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["12", "matrices"]
