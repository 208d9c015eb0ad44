"""The package layout rule (docs/architecture.md): each package imports only packages before
it, no import cycles, no ``_private`` name across a package line; the public surface."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import bitalloc

ROOT = Path(bitalloc.__file__).parent
# In order: each layer may import the ones before it (base modules are layer 0).
LAYERS = [
    {"errors", "fileio", "names", "devices"},
    {"quant"},
    {"lora"},
    {"checkpoints"},
    {"texts"},
    {"profiling"},
    {"planning"},
    {"artifacts"},
    {"export"},
    {"evaluation"},
    {"cli", "__init__", "__main__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def unit_of(path: Path, root: Path = ROOT) -> str:
    """The package (or base module) a file of bitalloc belongs to."""
    return path.relative_to(root).parts[0].removesuffix(".py")


def imports(path: Path, root: Path = ROOT) -> list[tuple[str, list[str], int]]:
    """(absolute bitalloc module, imported names, line) for every import in a file."""
    module = ".".join(("bitalloc", *path.relative_to(root).with_suffix("").parts))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target == "bitalloc" or target.startswith("bitalloc."):
                found.append((target, [alias.name for alias in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("bitalloc"):
                    found.append((alias.name, [], node.lineno))
    return found


def violations(root: Path = ROOT) -> list[str]:
    problems = []
    for path in sorted(root.rglob("*.py")):
        unit = unit_of(path, root)
        if unit not in RANK:
            problems.append(f"{path.relative_to(root)}: {unit} is in no layer of the rule")
            continue
        for target, names, line in imports(path, root):
            parts = target.split(".")
            if len(parts) == 1:  # `from bitalloc import X` inside the package: only the top level may
                if unit not in LAYERS[-1]:
                    problems.append(f"{path.relative_to(root)}:{line}: imports the top-level bitalloc")
                continue
            other = parts[1]
            if other not in RANK:
                continue
            if other != unit and RANK[other] > RANK[unit] and unit not in LAYERS[-1]:
                problems.append(f"{path.relative_to(root)}:{line}: {unit} imports {other}, a later package")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if other != unit and (private or any(p.startswith("_") and p != "__init__" for p in parts[2:])):
                problems.append(f"{path.relative_to(root)}:{line}: private name from {target}: {private}")
    return problems


def test_packages_import_only_earlier_packages():
    assert violations() == []


def test_rule_catches_a_planted_violation(tmp_path):
    """A copy of the package with one bad module: the rule must report it."""
    import shutil

    copy = tmp_path / "bitalloc"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns("__pycache__"))
    bad = "from ..planning.planner import plan\nfrom ..lora.lowrank import _x\n"
    (copy / "quant" / "bad.py").write_text(bad)
    found = violations(copy)
    assert any("quant imports planning" in p for p in found)
    assert any("private name" in p and "_x" in p for p in found)


def test_every_public_name_imports():
    for name in bitalloc.__all__:
        assert getattr(bitalloc, name) is not None, name


@pytest.mark.parametrize("module", ["bitalloc.artifacts.writer", "bitalloc.artifacts.nn"])
def test_apply_loads_neither_pandas_nor_pulp(module):
    code = f"import sys, {module}; print(sorted(m for m in ('pandas', 'pulp') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_package_names_do_not_shadow_the_public_functions():
    """No public name may change meaning with import order: a subpackage or module named like
    a public function would replace it once imported. Checked in a fresh interpreter that
    imports every submodule of bitalloc first, then reads every public name."""
    code = """
import importlib, inspect, pkgutil, types
import bitalloc
for info in pkgutil.walk_packages(bitalloc.__path__, "bitalloc."):
    if info.name != "bitalloc.__main__":
        importlib.import_module(info.name)
bad = [n for n in bitalloc.__all__ if isinstance(getattr(bitalloc, n), types.ModuleType)]
for package in ("evaluation", "export", "lora", "checkpoints", "quant"):
    module = importlib.import_module("bitalloc." + package)
    bad += [f"{package}.{n}" for n in getattr(module, "__all__", [])
            if isinstance(getattr(module, n), types.ModuleType)]
print(bad)
print(inspect.isfunction(bitalloc.loftq), inspect.isfunction(bitalloc.perplexity))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["[]", "True True"], out


HELPERS_DEFINED_ONCE = [
    "most_common",
    "resolve_device",
    "one_cpu_thread",
    "calibration_path",
    "REQUIRED_COLUMNS",
    "module_seed",
    "read_profile",
]


@pytest.mark.parametrize("name", HELPERS_DEFINED_ONCE)
def test_helpers_defined_once(name):
    definitions = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            defined = []
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                defined = [node.name]
            elif isinstance(node, ast.Assign):
                defined = [t.id for t in node.targets if isinstance(t, ast.Name)]
            if any(d.lstrip("_") == name for d in defined):
                definitions.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert len(definitions) == 1, definitions


def test_no_module_level_getattr_shim_but_the_top_level():
    shims = [
        str(path.relative_to(ROOT))
        for path in ROOT.rglob("*.py")
        if path != ROOT / "__init__.py"
        and any(
            isinstance(node, ast.FunctionDef) and node.name == "__getattr__"
            for node in ast.parse(path.read_text(encoding="utf-8")).body
        )
    ]
    assert shims == []
